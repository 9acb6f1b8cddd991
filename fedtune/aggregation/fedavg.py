"""FedAvg (McMahan et al., 2017) over adapter tensors, weighted by example counts."""

from __future__ import annotations

import torch

from fedtune.types import AdapterState


def weighted_average(states: list[AdapterState], weights: list[float]) -> AdapterState:
    """sum_i w_i * state_i / sum_i w_i, key by key (fp32 accumulation)."""
    if not states:
        raise ValueError("nothing to aggregate: no updates")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} updates but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to > 0, got {weights}")
    out: AdapterState = {}
    for key in states[0]:
        acc = torch.zeros_like(states[0][key], dtype=torch.float32)
        for s, w in zip(states, weights):
            acc += s[key].float() * (w / total)
        out[key] = acc
    return out
