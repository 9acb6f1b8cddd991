"""Who trains this round: the one cohort sampler of every backend (uniform, Poisson, fleet availability).

Each sampler is a small frozen object whose randomness is the run's ``cohort`` stream
(``fedtune.federation.seeds``), so a simulation's cohorts are reproducible from its seed and a deployed
server's are secret. ``kind`` names the sampling the privacy accounting may rely on:

* ``uniform``: a fixed-size subset, uniformly at random (no user-level amplification is claimed);
* ``poisson``: every device joins independently with probability q, what user-level DP-FedAvg's
  accountant assumes (``fedtune.privacy.cohort``);
* ``availability``: a fleet's online devices first, then uniform among them; a device's chance of being
  picked depends on its availability, which no accountant here models (so user-level DP refuses it,
  see ``fedtune.federation.capabilities``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from fedtune.federation.seeds import Seeds


class CohortSampler(Protocol):
    kind: str

    def sample(self, server_round: int, population: int) -> list[int]:
        """Sorted device indices in ``range(population)`` for ``server_round``."""
        ...


@dataclass(frozen=True)
class UniformSampler:
    seeds: Seeds
    cohort: int
    kind: str = "uniform"

    def sample(self, server_round: int, population: int) -> list[int]:
        k = min(self.cohort, population)
        return sorted(self.seeds.rng("cohort", server_round).sample(range(population), k))


@dataclass(frozen=True)
class PoissonSampler:
    seeds: Seeds
    rate: float
    kind: str = "poisson"

    def sample(self, server_round: int, population: int) -> list[int]:
        from fedtune.privacy.cohort import poisson_cohort

        return poisson_cohort(population, self.rate, rng=self.seeds.rng("cohort", server_round))


@dataclass(frozen=True)
class AvailabilitySampler:
    """A fleet's cohort: uniform draws among devices that ``is_available`` now, plus over-selection."""

    seeds: Seeds
    cohort: int
    over_selection: float
    is_available: Callable[[int], bool]
    kind: str = "availability"

    def sample(self, server_round: int, population: int) -> list[int]:
        from fedtune.fleet.sampler import sample_cohort

        return sample_cohort(population=population, cohort=self.cohort, over_selection=self.over_selection,
                             server_round=server_round, seed=0, is_available=self.is_available,
                             rng=self.seeds.rng("cohort", server_round))


def create_sampler(cfg, seeds: Seeds, population: int, *, is_available: Callable[[int], bool] | None = None
                   ) -> CohortSampler:
    """The sampler a config asks for: Poisson under user-level DP, availability in a fleet, else uniform."""
    fed = cfg.federation
    if cfg.privacy.user_level.enabled:
        if cfg.fleet.enabled:
            raise ValueError("privacy.user_level with fleet.enabled: availability sampling is not the Poisson "
                             "sampling the user-level accountant assumes; `fedtune validate` refuses this pair")
        return PoissonSampler(seeds, min(fed.clients_per_round, population) / population)
    if cfg.fleet.enabled:
        if is_available is None:
            raise ValueError("a fleet's sampler needs is_available (the fleet coordinator's online test)")
        return AvailabilitySampler(seeds, fed.clients_per_round, cfg.fleet.over_selection, is_available)
    return UniformSampler(seeds, fed.clients_per_round)
