"""User-level DP-FedAvg building blocks (McMahan et al. 2018, fixed denominator); pure, no Flower, no models.

One round, as the server uses these parts:

1. ``poisson_cohort``: every device joins independently with probability q = cohort / population
   (the sampling the amplification analysis assumes; see ``fedtune.privacy.cohort``).
2. ``clip_delta``: each returned delta is scaled to global L2 norm <= C.
3. ``noisy_mean``: (Σ clipped + N(0, (σC)² I)) / (qN). The denominator is the *expected* cohort
   qN, not the number of replies, so adding or removing one user moves the output by at most
   C / (qN) and the noise-to-sensitivity ratio is σ.
4. ``UserLevelLedger.record_round(σ, q)``; ``user_level_epsilon`` / ``calibrate_noise`` /
   ``max_rounds_within_budget`` compute ε over (σ, q, rounds) with opacus' accountants.

This module holds the mechanism (2, 3) and re-exports the rest, so ``fedtune.privacy.user_level``
is the one import for all of user-level DP.
"""

from __future__ import annotations

import math

import torch

from fedtune.privacy.cohort import poisson_cohort
from fedtune.privacy.csprng import as_stream
from fedtune.privacy.user_level_accounting import (
    calibrate_noise,
    max_rounds_within_budget,
    user_level_epsilon,
)
from fedtune.privacy.user_level_ledger import UserLevelLedger
from fedtune.types import AdapterState

__all__ = [
    "UserLevelLedger",
    "calibrate_noise",
    "clip_delta",
    "global_l2_norm",
    "max_rounds_within_budget",
    "noised_mean_of_sum",
    "noisy_mean",
    "poisson_cohort",
    "user_level_epsilon",
]

_CLIP_SLACK = 1e-5  # relative float32 rounding allowed above C when checking clipped inputs


def global_l2_norm(state: AdapterState) -> float:
    """L2 norm of all tensors of ``state`` taken together, as if flattened into one vector."""
    if not state:
        return 0.0
    per_tensor = torch.stack([torch.linalg.vector_norm(t.detach().double()) for t in state.values()])  # [K]
    return float(torch.linalg.vector_norm(per_tensor))


def clip_delta(delta: AdapterState, clip_norm: float) -> tuple[AdapterState, float]:
    """Scale ``delta`` by min(1, C / ||delta||) (global L2 over all tensors); returns (clipped, pre-clip norm).

    The direction is kept; the output is float32 with the input's keys, shapes and devices.
    """
    if not clip_norm > 0 or math.isinf(clip_norm):
        raise ValueError(f"clip_delta: clip_norm must be a finite number > 0, got {clip_norm!r}")
    for name, t in delta.items():
        if not t.is_floating_point():
            raise ValueError(f"clip_delta: tensor {name!r} has dtype {t.dtype}; deltas must be floating point")
    norm = global_l2_norm(delta)
    if not math.isfinite(norm):
        raise ValueError(f"clip_delta: the delta's norm is {norm}; reject non-finite updates before clipping")
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    clipped = {name: t.detach().float() * scale for name, t in delta.items()}  # same shapes, float32
    return clipped, norm


def noisy_mean(
    clipped: list[AdapterState],
    clip_norm: float,
    noise_multiplier: float,
    expected_cohort: float,
    generator: torch.Generator,
    *,
    template: AdapterState | None = None,
) -> AdapterState:
    """(Σ clipped + N(0, (σ·C)² I)) / expected_cohort, float32; the noise is drawn from ``generator``.

    ``clipped`` must come from ``clip_delta`` (each of norm <= C). With no updates at all the result is
    the noise alone, shaped like ``template`` (required then: nothing else says the shapes).
    Keys are visited in sorted order, so the same generator state gives the same noise.
    """
    if not clip_norm > 0:
        raise ValueError(f"noisy_mean: clip_norm must be > 0, got {clip_norm!r}")
    if not noise_multiplier >= 0:
        raise ValueError(f"noisy_mean: noise_multiplier must be >= 0, got {noise_multiplier!r}")
    if not expected_cohort > 0:
        raise ValueError(
            f"noisy_mean: expected_cohort must be > 0, got {expected_cohort!r}; pass q * population, "
            "not the number of replies"
        )
    if not clipped and template is None:
        raise ValueError("noisy_mean: no updates and no template; pass template=<the global adapter state>")
    ref = clipped[0] if clipped else template
    assert ref is not None
    for i, state in enumerate(clipped):
        if state.keys() != ref.keys():
            raise ValueError(
                f"noisy_mean: update {i} has keys {sorted(set(state) ^ set(ref))} that update 0 lacks or has; "
                "all updates must cover the same adapter tensors"
            )
        norm = global_l2_norm(state)
        if norm > clip_norm * (1 + _CLIP_SLACK):
            raise ValueError(
                f"noisy_mean: update {i} has norm {norm:.6g} > clip_norm {clip_norm}; clip it with clip_delta first"
            )

    total: AdapterState = {}
    for name in sorted(ref):
        shape, device = ref[name].shape, ref[name].device
        acc = torch.zeros(shape, dtype=torch.float32, device=device)  # [*shape]
        for state in clipped:
            if state[name].shape != shape:
                raise ValueError(
                    f"noisy_mean: tensor {name!r} has shape {tuple(state[name].shape)} in one update and "
                    f"{tuple(shape)} in another"
                )
            acc += state[name].to(device=device, dtype=torch.float32)
        total[name] = acc
    return noised_mean_of_sum(total, clip_norm, noise_multiplier, expected_cohort, generator)


def _device_of(source) -> torch.device:
    return source.device if isinstance(source, torch.Generator) else torch.device("cpu")


def noised_mean_of_sum(total: AdapterState, clip_norm: float, noise_multiplier: float, expected_cohort: float,
                       generator) -> AdapterState:
    """(total + N(0, (σ·C)² I)) / expected_cohort: the server's step once it holds the sum of clipped deltas
    (from ``noisy_mean``'s own sum, or from a secure-aggregation masked sum). Keys in sorted order.
    ``generator``: a ``torch.Generator`` (simulations) or a ``fedtune.privacy.csprng.RandomStream`` (a
    deployed server's AES-CTR stream)."""
    if not expected_cohort > 0:
        raise ValueError(f"noised_mean_of_sum: expected_cohort must be > 0, got {expected_cohort!r}")
    std = noise_multiplier * clip_norm
    out: AdapterState = {}
    for name in sorted(total):
        acc = total[name].to(torch.float32).clone()
        if std > 0:  # a torch generator (simulation) draws exactly what torch.randn drew before streams
            noise = as_stream(generator).normal(1.0, acc.numel(), _device_of(generator), torch.float32)
            acc += std * noise.view(acc.shape).to(acc.device)  # [*shape], N(0, (σC)²) per coordinate
        out[name] = acc / expected_cohort
    return out
