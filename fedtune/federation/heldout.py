"""The server's evaluation set: a fixed, user-balanced pool of held-out chunks, the same on both backends."""

from __future__ import annotations

from pathlib import Path

from fedtune.types import ClientData


def pooled_heldout(clients: list[ClientData], limit: int):
    """Round-robin over users' held-out chunks, capped: a fixed, user-balanced evaluation set."""
    import torch

    chunks, depth = [], 0
    while len(chunks) < limit and any(depth < c.heldout.shape[0] for c in clients):
        chunks += [c.heldout[depth] for c in clients if depth < c.heldout.shape[0]]
        depth += 1
    return torch.stack(chunks[:limit])


def heldout_from_disk(data_dir: Path, n_clients: int, limit: int):
    """``pooled_heldout`` over prepared data on disk, reading only as many users' files as the cap needs
    (10,000 users: a few files)."""
    from fedtune.data.partition import load_client_data

    clients = []
    for i in range(n_clients):
        clients.append(load_client_data(data_dir, i))
        if sum(c.heldout.shape[0] for c in clients) >= limit and len(clients) >= min(limit, n_clients):
            break
    return pooled_heldout(clients, limit)  # [M, T]
