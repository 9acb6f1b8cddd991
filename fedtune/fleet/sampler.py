"""Cohort sampling over a fleet too large to enumerate: cost grows with the cohort, not the population."""

from __future__ import annotations

import math
import random
from collections.abc import Callable



def sample_cohort(
    *,
    population: int,
    cohort: int,
    over_selection: float,
    server_round: int,
    seed: int,
    is_available: Callable[[int], bool],
    max_tries_factor: int = 50,
    rng: random.Random | None = None,
) -> list[int]:
    """Sorted device indices for this round, all available, at most ceil(cohort * (1 + over_selection)).

    Draws indices uniformly from ``rng`` (default: the simulated stream ``cohort`` of (seed, round),
    ``fedtune.federation.seeds``) and
    rejects repeats with a set; every available one is kept until the target is met, or after
    ``max_tries_factor * cohort`` draws (repeats count), or once every device was seen. So
    ``is_available`` is called at most ``max_tries_factor * cohort`` times whatever the population, and
    fewer devices than asked come back when few are available (the caller decides if that is enough).
    """
    problems = []
    if population < 1:
        problems.append(f"population must be >= 1, got {population}")
    if cohort < 1:
        problems.append(f"cohort must be >= 1, got {cohort}")
    if not over_selection >= 0:
        problems.append(f"over_selection must be >= 0, got {over_selection!r}")
    if max_tries_factor < 1:
        problems.append(f"max_tries_factor must be >= 1, got {max_tries_factor}")
    if problems:
        raise ValueError("sample_cohort: " + "; ".join(problems))

    target = min(population, math.ceil(cohort * (1 + over_selection)))
    max_draws = max_tries_factor * cohort
    if rng is None:
        from fedtune.federation.seeds import Seeds

        rng = Seeds.simulated(seed).rng("cohort", server_round)
    seen: set[int] = set()
    chosen: list[int] = []
    draws = 0
    while len(chosen) < target and draws < max_draws and len(seen) < population:
        draws += 1
        idx = rng.randrange(population)
        if idx in seen:
            continue
        seen.add(idx)
        if is_available(idx):
            chosen.append(idx)
    return sorted(chosen)
