"""Aggregation rules over same-shape adapter tensors, in a small registry; robust ones resist poisoned updates.

    fedavg        sum_i w_i x_i / sum_i w_i                      (McMahan et al., 2017; example-weighted)
    median        coordinate-wise median of the n updates       (Yin et al., 2018)
    trimmed_mean  per coordinate, drop the k = floor(f * n) smallest and k largest, average the rest

The robust rules are unweighted on purpose: a device that claims many examples must not buy more influence.
With n updates, the median tolerates up to ceil(n/2) - 1 arbitrary ones per coordinate, the trimmed mean k.
Tensors in, tensors out; no Flower, no configs. ``create_aggregator(name, trim_fraction=...)``.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from fedtune.aggregation.fedavg import weighted_average
from fedtune.types import AdapterState


class Aggregator(Protocol):
    name: str

    def __call__(self, states: list[AdapterState], weights: list[float]) -> AdapterState: ...


_REGISTRY: dict[str, Callable[..., Aggregator]] = {}


def register_aggregator(name: str):
    def deco(factory):
        if name in _REGISTRY:
            raise ValueError(f"aggregator {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def available_aggregators() -> list[str]:
    return sorted(_REGISTRY)


def create_aggregator(name: str, **options) -> Aggregator:
    if name not in _REGISTRY:
        raise ValueError(f"unknown aggregation {name!r}; available: {available_aggregators()}")
    return _REGISTRY[name](**options)


def _stacked(states: list[AdapterState], key: str) -> torch.Tensor:
    return torch.stack([s[key].float() for s in states])  # [n, *shape]


def _check(states: list[AdapterState]) -> None:
    if not states:
        raise ValueError("nothing to aggregate: no updates")
    keys = set(states[0])
    for i, s in enumerate(states[1:], 1):
        if set(s) != keys:
            raise ValueError(f"update {i} has other keys than update 0: {sorted(set(s) ^ keys)[:3]}")


class FedAvg:
    name = "fedavg"

    def __init__(self, **_):
        pass

    def __call__(self, states: list[AdapterState], weights: list[float]) -> AdapterState:
        return weighted_average(states, weights)


class Median:
    name = "median"

    def __init__(self, **_):
        pass

    def __call__(self, states: list[AdapterState], weights: list[float]) -> AdapterState:
        _check(states)
        # torch.median returns the lower of the two middle values for even n; use the mean of both (the
        # textbook median), so two honest updates give their mean
        out = {}
        for key in states[0]:
            x = _stacked(states, key).sort(dim=0).values  # [n, *shape]
            n = x.shape[0]
            out[key] = (x[(n - 1) // 2] + x[n // 2]) / 2
        return out


class TrimmedMean:
    name = "trimmed_mean"

    def __init__(self, trim_fraction: float = 0.1, **_):
        if not 0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        self.trim_fraction = trim_fraction

    def trimmed(self, n: int) -> int:
        return int(self.trim_fraction * n)

    def __call__(self, states: list[AdapterState], weights: list[float]) -> AdapterState:
        _check(states)
        k = self.trimmed(len(states))
        out = {}
        for key in states[0]:
            x = _stacked(states, key).sort(dim=0).values  # [n, *shape]
            out[key] = x[k: x.shape[0] - k].mean(dim=0)
        return out


register_aggregator("fedavg")(FedAvg)
register_aggregator("median")(Median)
register_aggregator("trimmed_mean")(TrimmedMean)
