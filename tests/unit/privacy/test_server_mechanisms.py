"""Server-side user-level DP is tested by its distributions: the noise DPFedAvg adds to the clipped sum,
and the Poisson cohort sizes (Binomial(population, q), which the accountant's amplification assumes)."""

from __future__ import annotations

import numpy as np
import torch

from fedtune.config import UserLevelPrivacyConfig
from fedtune.privacy.dp_fedavg import DPFedAvg, plan_user_level
from fedtune.privacy.user_level import clip_delta
from tests.unit.privacy.stats import (
    ALPHA,
    binomial_count_pvalue,
    binomial_gof_pvalue,
    gaussian_shape_pvalue,
    gaussian_std_pvalue,
    mean_zero_pvalue,
)

SIGMA, CLIP, POPULATION, COHORT = 1.1, 0.3, 1000, 40
GLOBAL = {"layer.lora_A": torch.zeros(64, 256), "layer.lora_B": torch.zeros(256, 64)}  # 32k coordinates


def _dp_fedavg(sigma: float = SIGMA) -> DPFedAvg:
    cfg = UserLevelPrivacyConfig(enabled=True, noise_multiplier=sigma, clip_norm=CLIP)
    return DPFedAvg(cfg, plan_user_level(cfg, POPULATION, COHORT, rounds=10), POPULATION, 3)


def _flat(state) -> np.ndarray:
    return torch.cat([state[k].flatten() for k in sorted(state)]).double().numpy()


def test_user_level_noise_is_sigma_c_over_expected_cohort():
    """(Σ clipped + N(0, (σC)²)) / (qN): the noise std is σC / (qN) whatever the number of replies."""
    dp = _dp_fedavg()
    gen = torch.Generator().manual_seed(0)
    updates = [{k: v + torch.randn(v.shape, generator=gen) for k, v in GLOBAL.items()} for _ in range(7)]
    std = SIGMA * CLIP / COHORT  # expected cohort qN = COHORT
    for server_round, replies in ((1, updates), (2, []), (3, updates[:2])):
        new, _ = dp.aggregate(GLOBAL, replies, server_round)
        signal = sum((_flat(clip_delta({k: u[k] - GLOBAL[k] for k in GLOBAL}, CLIP)[0]) for u in replies), 0.0)
        noise = _flat(new) - signal / COHORT
        assert gaussian_std_pvalue(noise, std) > ALPHA, (server_round, noise.std(), std)
        assert mean_zero_pvalue(noise, std) > ALPHA
        assert gaussian_shape_pvalue(noise, std) > ALPHA
    assert dp.ledger.rounds == 3  # every round, empty ones included, is accounted


def test_user_level_noise_is_fresh_each_round():
    dp = _dp_fedavg()
    a, _ = dp.aggregate(GLOBAL, [], 1)
    b, _ = dp.aggregate(GLOBAL, [], 2)
    assert abs(np.corrcoef(_flat(a), _flat(b))[0, 1]) < 0.05


def test_cohort_sizes_follow_binomial_population_q():
    dp = _dp_fedavg()
    q = dp.plan.sample_rate
    sizes = [len(dp.sample(r)) for r in range(1, 1501)]
    assert binomial_gof_pvalue(sizes, POPULATION, q) > ALPHA, np.bincount(sizes)
    members = np.concatenate([dp.sample(r) for r in range(1, 201)])
    # each device joins with probability q: per-device counts over 200 rounds ~ Binomial(200, q)
    per_device = np.bincount(members, minlength=POPULATION)
    assert binomial_gof_pvalue(per_device, 200, q) > ALPHA


def test_small_population_cohorts_are_empty_at_the_right_rate():
    cfg = UserLevelPrivacyConfig(enabled=True, noise_multiplier=1.0, clip_norm=CLIP)
    dp = DPFedAvg(cfg, plan_user_level(cfg, 20, 2, rounds=10), 20, 4)  # q = 0.1: P(empty) = 0.9^20 = 0.12
    sizes = [len(dp.sample(r)) for r in range(1, 2001)]
    assert binomial_count_pvalue(sizes.count(0), len(sizes), 0.9**20) > ALPHA
    assert binomial_gof_pvalue(sizes, 20, 0.1) > ALPHA
