"""Held-out loss, perplexity and next-token accuracy of a causal LM on fixed-length chunks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean next-token NLL over all predicted tokens
    perplexity: float
    accuracy: float  # greedy next-token accuracy
    tokens: int


def _predictions(model, chunks: torch.Tensor, batch_size: int):
    """(logits [B, T-1, V] as float, targets [B, T-1]) batch by batch, the model in eval mode meanwhile."""
    if chunks.shape[0] == 0:
        raise ValueError("nothing to evaluate: no held-out chunks")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for i in range(0, chunks.shape[0], batch_size):
            x = chunks[i : i + batch_size].to(device)  # [B, T]
            logits = model(input_ids=x).logits  # [B, T', V]  (T' = T + virtual tokens for prompt tuning)
            yield logits[:, -x.shape[1] :, :][:, :-1, :].float(), x[:, 1:]
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_chunks(model, chunks: torch.Tensor, batch_size: int = 8) -> EvalResult:
    """Token-weighted mean NLL over ``chunks`` [N, T]; every chunk predicts T-1 tokens."""
    nll, correct, count = 0.0, 0, 0
    for logits, target in _predictions(model, chunks, batch_size):
        nll += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
        ).item()
        correct += (logits.argmax(-1) == target).sum().item()
        count += target.numel()
    loss = nll / count
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 50.0)), accuracy=correct / count, tokens=count)


@torch.no_grad()
def token_losses(model, chunks: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Every predicted token's NLL over ``chunks`` [N, T], flattened in order: [N * (T-1)] float64 on the CPU
    (its mean is ``evaluate_chunks``' loss; paired across two models, its spread is the comparison's noise)."""
    out = [torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none").reshape(-1)
           for logits, target in _predictions(model, chunks, batch_size)]
    return torch.cat(out).double().cpu()
