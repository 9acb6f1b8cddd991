"""Tokenize documents and cut them into fixed-length chunks."""

from __future__ import annotations

import torch


def chunk_tokens(docs: list[str], encoder, seq_len: int) -> torch.Tensor:
    """Concatenate documents (each followed by EOS) and cut into [N, seq_len] chunks.

    The last partial chunk is dropped; a user with less than one chunk of text gets N = 0.
    """
    ids: list[int] = []
    for doc in docs:
        ids.extend(encoder.encode(doc))
        ids.append(encoder.eos_token_id)
    n = len(ids) // seq_len
    if n == 0:
        return torch.empty(0, seq_len, dtype=torch.long)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)  # [N, T]
