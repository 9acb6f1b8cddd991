"""Secure aggregation composed with user-level DP: devices clip, the server noises the unmasked sum."""

import numpy as np
import pytest
import torch

from fedtune.privacy.secagg import make_setup, run_secure_aggregation
from fedtune.privacy.secagg.payload import VectorLayout, clipped_delta_payload, dp_mean_from_sum
from fedtune.privacy.user_level import clip_delta, noisy_mean
from tests.unit.privacy.stats import ALPHA, gaussian_std_pvalue, mean_zero_pvalue

GLOBAL = {"b.lora_B": torch.zeros(32, 8), "a.lora_A": torch.full((8, 64), 0.1)}
C, IDS, EXPECTED = 0.2, list(range(8)), 10.0  # expected cohort qN = 10, 8 replied


def _round(sigma: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    updates = {c: {k: v + 0.05 * (c + 1) * torch.randn(v.shape, generator=gen) for k, v in GLOBAL.items()}
               for c in IDS}
    layout = VectorLayout.of(GLOBAL)
    payloads = {c: clipped_delta_payload(GLOBAL, u, C, layout) for c, u in updates.items()}
    assert max(np.abs(p).max() for p in payloads.values()) <= C  # clip_range = C never clips a coordinate
    setup = make_setup(IDS, layout.length, clip_range=C, context=b"dp/1")
    out = run_secure_aggregation(setup, payloads)
    mean = dp_mean_from_sum(out.total, layout, C, sigma, EXPECTED, torch.Generator().manual_seed(seed + 1))
    return updates, layout, setup, out, mean


def test_without_noise_it_is_dp_fedavgs_mean_within_rounding():
    updates, layout, setup, out, mean = _round(0.0, 0)
    clipped = [clip_delta({k: u[k] - GLOBAL[k] for k in GLOBAL}, C)[0] for u in updates.values()]
    assert sum(n > C for n in [clip_delta({k: u[k] - GLOBAL[k] for k in GLOBAL}, C)[1] for u in updates.values()]) > 4
    plain = noisy_mean(clipped, C, 0.0, EXPECTED, torch.Generator(), template=GLOBAL)
    bound = setup.quantizer.max_error(len(IDS)) / EXPECTED
    for k in GLOBAL:
        assert (mean[k] - plain[k]).abs().max().item() <= bound + 1e-7


def test_the_server_adds_sigma_c_over_qn_noise_to_the_unmasked_sum():
    sigma = 1.3
    _, layout, _, out, mean = _round(sigma, 5)
    noise = layout.flatten(mean) - out.total / EXPECTED
    std = sigma * C / EXPECTED
    assert gaussian_std_pvalue(noise, std) > ALPHA, (noise.std(), std)
    assert mean_zero_pvalue(noise, std) > ALPHA


def test_layout_round_trips_and_checks_names():
    layout = VectorLayout.of(GLOBAL)
    assert layout.names == ("a.lora_A", "b.lora_B") and layout.length == 8 * 64 + 32 * 8
    back = layout.unflatten(layout.flatten(GLOBAL))
    assert all(torch.equal(back[k], GLOBAL[k]) for k in GLOBAL)
    with pytest.raises(ValueError, match="differ from the round's layout"):
        layout.flatten({"a.lora_A": GLOBAL["a.lora_A"]})


def test_the_secure_summer_sums_within_rounding_and_zeroes_an_aborted_round():
    from fedtune.privacy.secagg import Dropouts
    from fedtune.privacy.secagg.summer import SecureSummer

    gen = torch.Generator().manual_seed(9)
    clipped = [clip_delta({k: 0.1 * torch.randn(v.shape, generator=gen) for k, v in GLOBAL.items()}, C)[0]
               for _ in range(6)]
    summer = SecureSummer(clip_norm=C)
    total = summer(clipped, GLOBAL)
    bound = 6 * C / 127
    for k in GLOBAL:
        assert (total[k] - sum(c[k] for c in clipped)).abs().max().item() <= bound
    assert summer.report()["secagg_survivors"] == 6 and summer.report()["secagg_uplink_bytes"] > 0
    # 3 of 6 drop: each survivor's seed has 2 live holders, t = 3
    aborted = summer(clipped, GLOBAL, Dropouts(before_masked_input=frozenset({1, 2, 3})))
    assert all(torch.count_nonzero(v) == 0 for v in aborted.values()) and summer.report()["secagg_aborted"] == 1
    assert all(torch.count_nonzero(v) == 0 for v in summer(clipped[:1], GLOBAL).values())


def test_the_secure_summer_plugs_into_dp_fedavg():
    """The server's DPFedAvg takes a summer: with SecureSummer the round's mean is the plain one within
    the rounding bound / qN, the same noise (same seeds) is added, and the round is charged the same."""
    from fedtune.config import UserLevelPrivacyConfig
    from fedtune.privacy.dp_fedavg import DPFedAvg, plan_user_level
    from fedtune.privacy.secagg.summer import SecureSummer

    cfg = UserLevelPrivacyConfig(enabled=True, noise_multiplier=0.7, clip_norm=C)
    plan = plan_user_level(cfg, 100, 10, 5)
    gen = torch.Generator().manual_seed(11)
    updates = [{k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in GLOBAL.items()} for _ in range(7)]
    plain_dp, secure_dp = DPFedAvg(cfg, plan, 100, 0), DPFedAvg(cfg, plan, 100, 0)
    plain, _ = plain_dp.aggregate(GLOBAL, updates, 1)
    summer = SecureSummer(clip_norm=C)
    secure, _ = secure_dp.aggregate(GLOBAL, updates, 1, summer=summer)
    bound = 7 * C / 127 / (plan.sample_rate * 100)
    for k in GLOBAL:
        assert (plain[k] - secure[k]).abs().max().item() <= bound + 1e-6
    assert summer.report()["secagg_survivors"] == 7
    assert secure_dp.ledger.epsilon() == plain_dp.ledger.epsilon() > 0
