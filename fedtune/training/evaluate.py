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


@torch.no_grad()
def evaluate_chunks(model, chunks: torch.Tensor, batch_size: int = 8) -> EvalResult:
    """Token-weighted mean NLL over ``chunks`` [N, T]; every chunk predicts T-1 tokens."""
    if chunks.shape[0] == 0:
        raise ValueError("nothing to evaluate: no held-out chunks")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, correct, count = 0.0, 0, 0
    for i in range(0, chunks.shape[0], batch_size):
        x = chunks[i : i + batch_size].to(device)  # [B, T]
        logits = model(input_ids=x).logits  # [B, T', V]  (T' = T + virtual tokens for prompt tuning)
        logits = logits[:, -x.shape[1] :, :][:, :-1, :].float()  # [B, T-1, V]
        target = x[:, 1:]  # [B, T-1]
        nll += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
        ).item()
        correct += (logits.argmax(-1) == target).sum().item()
        count += target.numel()
    model.train(was_training)
    loss = nll / count
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 50.0)), accuracy=correct / count, tokens=count)
