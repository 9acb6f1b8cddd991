"""Poisson sampling of devices: the cohort the user-level amplification analysis assumes.

Each of the population's devices joins a round independently with probability ``q``; the cohort
size is Binomial(population, q), not fixed. The accountant (``user_level_epsilon``) credits
privacy amplification by exactly this sampling, so the server must sample this way.

Availability filtering (dropping devices that are offline, charging, on a metered network, ...)
would break the analysis unless it is modelled: a device that is available only sometimes is
sampled with a smaller, unknown rate, and a device that is never available is never sampled.
This module therefore offers no ``is_eligible`` hook; a cohort member that then fails or times
out is fine (its contribution is zero, which the fixed-denominator mean already allows).

The sampler draws geometric skips between members (the gap to the next member of a Bernoulli(q)
sequence is Geometric(q)), so its cost grows with the expected cohort q·population, never with
the population: population 10^8 at q = 1e-6 takes about 100 draws.
"""

from __future__ import annotations

import math
import random


def poisson_cohort(population: int, q: float, seed: int | None = None, server_round: int | None = None, *,
                   rng: random.Random | None = None) -> list[int]:
    """Device ids in ``range(population)`` that join ``server_round``, each independently with prob. ``q``.

    The draws come from ``rng`` (a deployed server passes its secret stream,
    ``fedtune.federation.seeds.Seeds.rng("cohort", round)``); without it from the simulated stream of
    (seed, server_round), so deterministic per (seed, server_round). Sorted ascending; may be empty.
    """
    if not isinstance(population, int) or population < 0:
        raise ValueError(f"poisson_cohort: population must be an int >= 0, got {population!r}")
    if not 0.0 <= q <= 1.0 or math.isnan(q):
        raise ValueError(
            f"poisson_cohort: sampling rate q must lie in [0, 1], got {q!r}; "
            "q is the expected cohort divided by the population"
        )
    if q == 0.0 or population == 0:
        return []
    if q == 1.0:
        return list(range(population))
    if rng is None:
        if seed is None or server_round is None:
            raise ValueError("poisson_cohort: pass rng=, or seed= and server_round= for a simulated stream")
        from fedtune.federation.seeds import Seeds

        rng = Seeds.simulated(seed).rng("cohort", server_round)
    log_miss = math.log1p(-q)  # log(1 - q) < 0, accurate for tiny q
    cohort: list[int] = []
    i = -1
    while True:
        # failures before the next success ~ Geometric(q): floor(log(U) / log(1 - q)), U in (0, 1]
        i += 1 + int(math.log(1.0 - rng.random()) / log_miss)
        if i >= population:
            return cohort
        cohort.append(i)
