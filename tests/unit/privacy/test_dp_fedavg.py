import pytest
import torch

from fedtune.config import UserLevelPrivacyConfig
from fedtune.privacy.dp_fedavg import DPFedAvg, plan_user_level
from fedtune.privacy.user_level import UserLevelLedger, user_level_epsilon

G = {"a": torch.zeros(4, 3), "b": torch.zeros(5)}


def test_plan_calibrates_to_the_target_and_defaults_delta_to_one_over_population():
    cfg = UserLevelPrivacyConfig(enabled=True, target_epsilon=8.0, clip_norm=0.5)
    plan = plan_user_level(cfg, population=10_000, cohort=100, rounds=20)
    assert plan.delta == pytest.approx(1e-4) and plan.sample_rate == pytest.approx(0.01)
    assert plan.rounds == 20 and plan.planned_epsilon <= 8.0
    assert user_level_epsilon(plan.noise_multiplier * 0.9, 0.01, 20, 1e-4) > 8.0


def test_a_budget_cuts_the_rounds_and_an_impossible_one_is_refused():
    cfg = UserLevelPrivacyConfig(enabled=True, noise_multiplier=0.8, epsilon_budget=2.0)
    plan = plan_user_level(cfg, population=1000, cohort=100, rounds=500)
    assert 0 < plan.rounds < 500
    assert user_level_epsilon(0.8, 0.1, plan.rounds, 1e-3) <= 2.0 < user_level_epsilon(0.8, 0.1, plan.rounds + 1, 1e-3)
    with pytest.raises(ValueError, match="not even one round"):
        plan_user_level(UserLevelPrivacyConfig(enabled=True, noise_multiplier=0.1, epsilon_budget=0.01),
                        population=100, cohort=50, rounds=5)
    with pytest.raises(ValueError, match="exceeds the population"):
        plan_user_level(cfg, population=10, cohort=20, rounds=5)


def test_aggregate_clips_noises_and_records_the_round():
    cfg = UserLevelPrivacyConfig(enabled=True, noise_multiplier=0.0, clip_norm=1.0)
    plan = plan_user_level(cfg, population=100, cohort=10, rounds=3)
    dp = DPFedAvg(cfg, plan, population=100, seed=0)
    big = {"a": torch.full((4, 3), 10.0), "b": torch.zeros(5)}  # norm 34.6 -> clipped to 1
    small = {"a": torch.zeros(4, 3), "b": torch.full((5,), 0.1)}  # norm 0.22, kept
    new, info = dp.aggregate(G, [big, small], server_round=1)
    clipped_a = 10.0 / (10.0 * 12 ** 0.5)
    assert torch.allclose(new["a"], torch.full((4, 3), clipped_a / 10))  # fixed denominator qN = 10
    assert torch.allclose(new["b"], torch.full((5,), 0.01))
    assert info["clipped_fraction"] == 0.5
    assert dp.ledger.rounds == 1
    noisy = DPFedAvg(UserLevelPrivacyConfig(enabled=True, noise_multiplier=1.0, clip_norm=1.0),
                     plan_user_level(UserLevelPrivacyConfig(enabled=True, noise_multiplier=1.0), 100, 10, 3), 100, 0)
    out1, _ = noisy.aggregate(G, [], server_round=2)  # nobody sampled: noise only, still accounted
    out2, _ = DPFedAvg(noisy.cfg, noisy.plan, 100, 0).aggregate(G, [], server_round=2)
    assert torch.equal(out1["a"], out2["a"]) and out1["a"].abs().sum() > 0  # seeded
    assert noisy.ledger.epsilon() > 0


def test_the_ledger_resumes_from_a_checkpoint_dict():
    cfg = UserLevelPrivacyConfig(enabled=True, noise_multiplier=1.0)
    plan = plan_user_level(cfg, population=100, cohort=10, rounds=5)
    dp = DPFedAvg(cfg, plan, 100, 0)
    for r in (1, 2):
        dp.aggregate(G, [], r)
    resumed = DPFedAvg(cfg, plan, 100, 0, UserLevelLedger.from_dict(dp.ledger.to_dict()))
    resumed.aggregate(G, [], 3)
    straight = DPFedAvg(cfg, plan, 100, 0)
    for r in (1, 2, 3):
        straight.aggregate(G, [], r)
    assert resumed.ledger.epsilon() == pytest.approx(straight.ledger.epsilon())
    assert resumed.ledger.rounds == 3
