"""Fleet mixtures: which device profile each virtual device has, as a pure function of (index, seed).

A mixture maps profile names to shares (any non-negative weights; they are normalized). Device ``i`` of a
run with ``seed`` draws u = blake2b(f"{seed}:{i}") / 2**64 in [0, 1) and takes the first profile, in name
order, whose cumulative normalized share exceeds u. No table of the population is ever built, so a fleet
of 10 million devices costs nothing until a device is sampled.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from functools import lru_cache

from fedtune.fleet.hashing import stable_uniform


class MixtureError(ValueError):
    """Every problem of one mixture."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"fleet mixture has {len(problems)} problem(s):\n{lines}")


def _share_problems(mixture: Mapping[str, float]) -> list[str]:
    p: list[str] = []
    if not mixture:
        return ["empty mixture; give at least one profile name with a positive share, e.g. {phone-high: 1.0}"]
    for name, share in mixture.items():
        if isinstance(share, bool) or not isinstance(share, int | float) or not math.isfinite(share):
            p.append(f"{name}: share must be a finite number, got {share!r}")
        elif share < 0:
            p.append(f"{name}: share must be >= 0, got {share}")
    if not p and sum(mixture.values()) <= 0:
        p.append(f"shares must sum to more than 0, got {dict(mixture)}")
    return p


def validate_mixture(mixture: Mapping[str, float], catalog: Mapping[str, object] | None = None) -> None:
    """Raise MixtureError listing every bad share and every name not in ``catalog`` (when given)."""
    p = _share_problems(mixture)
    if catalog is not None:
        unknown = sorted(n for n in mixture if n not in catalog)
        if unknown:
            p.append(f"unknown profile name(s) {unknown}; the catalog has {sorted(catalog)}")
    if p:
        raise MixtureError(p)


@lru_cache(maxsize=64)
def _cumulative(items: tuple[tuple[str, float], ...]) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Names sorted, and their cumulative normalized shares (the last forced to exactly 1.0)."""
    names = tuple(sorted(n for n, s in items if s > 0))
    shares = dict(items)
    total = sum(shares[n] for n in names)
    cum, acc = [], 0.0
    for n in names:
        acc += shares[n] / total
        cum.append(acc)
    cum[-1] = 1.0
    return names, tuple(cum)


def _table(mixture: Mapping[str, float]) -> tuple[tuple[str, ...], tuple[float, ...]]:
    items = tuple(sorted(mixture.items()))
    try:
        return _cumulative(items)
    except TypeError:  # unhashable share values: let validation say what is wrong
        validate_mixture(mixture)
        raise


def assign_profile(device_index: int, seed: int, mixture: Mapping[str, float]) -> str:
    """The profile name of device ``device_index`` in a run seeded ``seed`` (deterministic, O(#profiles))."""
    if device_index < 0:
        raise ValueError(f"device_index must be >= 0, got {device_index}")
    problems = _share_problems(mixture)
    if problems:
        raise MixtureError(problems)
    names, cum = _table(mixture)
    u = stable_uniform(seed, device_index)
    for name, c in zip(names, cum):
        if u < c:
            return name
    return names[-1]  # unreachable: u < 1.0 == cum[-1]


def tier_counts(population: int, seed: int, mixture: Mapping[str, float]) -> dict[str, int]:
    """How many of devices 0..population-1 get each profile (every mixture name, zeros included)."""
    if population < 0:
        raise ValueError(f"population must be >= 0, got {population}")
    counts = Counter(assign_profile(i, seed, mixture) for i in range(population))
    return {name: counts.get(name, 0) for name in sorted(mixture)}
