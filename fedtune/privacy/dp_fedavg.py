"""User-level DP-FedAvg (McMahan et al., 2018) as a server-side component, apart from any strategy.

Per round: Poisson-sample devices at rate q = cohort / population; each returned update is turned
into a delta from the global adapter and clipped to L2 norm C; the server adds N(0, (σC)²) to the sum
and divides by the expected cohort qN (a fixed denominator keeps the sensitivity at C / qN); the
server ledger records (σ, q) for the round. ε comes from opacus' accountant over that history.
Noise and cohorts draw from the run's ``Seeds``: AES-256-CTR CSPRNG streams on a deployed server
(``fedtune.privacy.csprng``), seeded torch / Python generators in a simulation.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.config import UserLevelPrivacyConfig
from fedtune.privacy.user_level import (
    UserLevelLedger,
    calibrate_noise,
    clip_delta,
    max_rounds_within_budget,
    noised_mean_of_sum,
    noisy_mean,
    poisson_cohort,
)
from fedtune.types import AdapterState


@dataclass(frozen=True)
class UserLevelPlan:
    """Decided before training starts: the noise, the sampling rate, and how many rounds fit."""

    noise_multiplier: float
    sample_rate: float
    delta: float
    rounds: int  # rounds that fit the budget (<= the configured rounds)
    budget: float | None
    planned_epsilon: float


def plan_user_level(cfg: UserLevelPrivacyConfig, population: int, cohort: int, rounds: int) -> UserLevelPlan:
    """Calibrate (or take) the noise and cut the rounds to the budget; raises ValueError if impossible."""
    from fedtune.privacy.user_level import user_level_epsilon

    if cohort > population:
        raise ValueError(f"privacy.user_level: cohort {cohort} exceeds the population {population}")
    q = cohort / population
    delta = cfg.delta if cfg.delta is not None else 1.0 / population
    if cfg.target_epsilon is not None:
        sigma = calibrate_noise(cfg.target_epsilon, delta, q, rounds, cfg.accountant)
    else:
        sigma = cfg.noise_multiplier
    budget = cfg.epsilon_budget if cfg.epsilon_budget is not None else cfg.target_epsilon
    fit = rounds if budget is None else max_rounds_within_budget(sigma, q, budget, delta, rounds, cfg.accountant)
    if fit == 0:
        raise ValueError(
            f"privacy.user_level: not even one round fits the budget epsilon={budget} at delta={delta:.3g} "
            f"with noise multiplier {sigma:.3g} and sampling rate {q:.4g}; raise the noise or the budget")
    eps = user_level_epsilon(sigma, q, fit, delta, cfg.accountant)
    return UserLevelPlan(sigma, q, delta, fit, budget, eps)


class DPFedAvg:
    """Clip, sum, noise, average with a fixed denominator; keeps the server's privacy ledger."""

    def __init__(self, cfg: UserLevelPrivacyConfig, plan: UserLevelPlan, population: int, seed,
                 ledger: UserLevelLedger | None = None):
        """``seed``: the run's ``fedtune.federation.seeds.Seeds`` (secret on a deployed server), or an int
        (the simulated seeds of that run seed)."""
        from fedtune.federation.seeds import Seeds

        self.seeds = seed if isinstance(seed, Seeds) else Seeds.simulated(seed)
        self.cfg, self.plan, self.population = cfg, plan, population
        self.ledger = ledger or UserLevelLedger(accountant=cfg.accountant, delta=plan.delta,
                                                target_epsilon=plan.budget)
        self.noise_generator: str | None = None  # the name of the stream the last round's noise came from

    def sample(self, server_round: int) -> list[int]:
        return poisson_cohort(self.population, self.plan.sample_rate, rng=self.seeds.rng("cohort", server_round))

    def aggregate(self, global_state: AdapterState, updates: list[AdapterState], server_round: int, *,
                  summer=None) -> tuple[AdapterState, dict]:
        """One round: clip, sum (``summer(clipped, template)``, e.g. a secure-aggregation masked sum;
        default: plain addition), noise, divide by qN; the round is charged to the ledger."""
        clipped, norms = [], []
        for u in updates:
            delta = {k: u[k].float() - global_state[k].float() for k in global_state}
            c, norm = clip_delta(delta, self.cfg.clip_norm)
            clipped.append(c)
            norms.append(norm)
        gen = self.seeds.stream("user_noise", server_round)  # AES-CTR when secret, a torch generator when simulated
        self.noise_generator = gen.name
        expected = self.plan.sample_rate * self.population
        if summer is None:
            mean = noisy_mean(clipped, self.cfg.clip_norm, self.plan.noise_multiplier, expected, gen,
                              template=global_state)
        else:
            template = {k: v.float() for k, v in global_state.items()}
            mean = noised_mean_of_sum(summer(clipped, template), self.cfg.clip_norm, self.plan.noise_multiplier,
                                      expected, gen)
        self.ledger.record_round(self.plan.noise_multiplier, self.plan.sample_rate)
        new = {k: global_state[k].float() + mean[k] for k in global_state}
        info = {
            "user_epsilon": self.ledger.epsilon(),
            "user_delta": self.plan.delta,
            "user_noise_multiplier": self.plan.noise_multiplier,
            "update_norm_median": sorted(norms)[len(norms) // 2] if norms else 0.0,
            "clipped_fraction": (sum(n > self.cfg.clip_norm for n in norms) / len(norms)) if norms else 0.0,
        }
        return new, info
