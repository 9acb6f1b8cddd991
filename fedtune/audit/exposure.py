"""Exposure (Carlini et al., 2019, "The Secret Sharer"): how far a model ranks a secret above its peers.

Pure maths first, then the one function that asks a model:

- ``exposure_of(score, pool)``: rank a canary's log-perplexity among the log-perplexities of other
  candidates of the same format; exposure = log2(N) - log2(rank), N = len(pool) + 1, rank 1 = the
  canary is the most likely (lowest log-perplexity) of all N. Rank 1 gives log2(N) bits; a canary in
  the middle of the pool gives about 1 bit; a canary the model knows nothing of gives ~1.44 bits on
  average (E[log2 N - log2 U{1..N}]).
- ``secret_log_perplexities(model, encoder, prefix, secrets)``: -log2 Pr(secret | EOS + prefix),
  summed over the secret's tokens (bits), for many secrets in batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Exposure:
    rank: int  # 1 = lowest log-perplexity among all N candidates
    n_candidates: int  # N: the canary plus the pool it was ranked against
    exposure: float  # log2(N) - log2(rank), in bits; 0 .. log2(N)


def exposure_of(score: float, pool: torch.Tensor) -> Exposure:
    """Rank ``score`` (the canary's log-perplexity) among ``pool`` [P] (other candidates' scores).

    Ties count in the canary's favour (only strictly lower scores rank above it), as in the paper's
    rank over the whole randomness space.
    """
    if pool.ndim != 1 or pool.numel() == 0:
        raise ValueError(f"the candidate pool must be a non-empty 1-d tensor of scores, got shape {tuple(pool.shape)}")
    rank = 1 + int((pool < score).sum().item())
    n = int(pool.numel()) + 1
    return Exposure(rank=rank, n_candidates=n, exposure=math.log2(n) - math.log2(rank))


def _encode_pair(encoder, prefix: str, secret: str) -> tuple[list[int], int]:
    """Token ids of EOS + prefix + secret, and where the secret's tokens start."""
    context = encoder.encode(prefix)
    full = encoder.encode(prefix + secret)
    start = 0
    while start < min(len(context), len(full)) and context[start] == full[start]:
        start += 1  # a subword tokenizer may merge across the boundary: score from the first change
    if start == len(full):
        raise ValueError(f"secret {secret!r} encodes to no tokens after the prefix {prefix!r}")
    return [encoder.eos_token_id, *full], start + 1


@torch.no_grad()
def secret_log_perplexities(model, encoder, prefix: str, secrets: list[str], batch_size: int = 256) -> torch.Tensor:
    """-log2 Pr(secret | EOS, prefix) for each secret, in bits: [S] float64.

    The EOS in front matches training, where each canary copy follows an EOS (``chunk_tokens``
    layout). Sequences are right-padded; padding never influences earlier positions of a causal LM.
    """
    if not secrets:
        return torch.empty(0, dtype=torch.float64)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    encoded = [_encode_pair(encoder, prefix, s) for s in secrets]
    for i in range(0, len(encoded), batch_size):
        part = encoded[i : i + batch_size]
        length = max(len(ids) for ids, _ in part)
        x = torch.full((len(part), length), encoder.eos_token_id, dtype=torch.long)  # [B, L]
        mask = torch.zeros(len(part), length - 1, dtype=torch.bool)  # [B, L-1]: which targets to score
        for j, (ids, start) in enumerate(part):
            x[j, : len(ids)] = torch.tensor(ids)
            mask[j, start - 1 : len(ids) - 1] = True  # target position t is predicted at t-1
        x = x.to(device)
        logits = model(input_ids=x).logits[:, -length:, :][:, :-1, :].float()  # [B, L-1, V]
        logp = torch.log_softmax(logits, dim=-1).gather(-1, x[:, 1:, None]).squeeze(-1)  # [B, L-1]
        nll = -(logp * mask.to(device)).sum(dim=1) / math.log(2)  # [B] bits
        out.append(nll.double().cpu())
    model.train(was_training)
    return torch.cat(out)
