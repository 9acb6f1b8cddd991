"""Per-device calibration, tested by its mechanism: the accountant's ε at the calibrated σ."""

import pytest

from fedtune.config import PrivacyConfig
from fedtune.privacy.accounting import compute_epsilon
from fedtune.privacy.device_budget import (
    BudgetExceeded,
    DeviceTooSmall,
    budget_warning,
    calibrate,
    device_noise,
    over_target,
    sample_rate,
)
from fedtune.privacy.dpsgd import resolve_noise


@pytest.mark.parametrize("n,batch,steps", [(64, 16, 24), (512, 16, 40), (12, 8, 16)])
def test_calibrated_noise_meets_the_target_and_is_tight(n, batch, steps):
    plan = device_noise(n, batch, steps, target_epsilon=8.0, delta=1e-5)
    q = batch / n
    assert plan.sample_rate == pytest.approx(q)
    eps = compute_epsilon([(plan.noise_multiplier, q, steps)], 1e-5)
    assert eps <= 8.0
    assert plan.planned_epsilon == pytest.approx(eps)
    # tight: 3% less noise breaks the target (the calibration does not waste signal)
    assert compute_epsilon([(plan.noise_multiplier * 0.97, q, steps)], 1e-5) > 8.0


def test_smaller_devices_get_more_noise_not_more_epsilon():
    big = device_noise(640, 16, 24, 8.0, 1e-5)
    small = device_noise(24, 16, 24, 8.0, 1e-5, max_noise_to_batch=10)
    assert small.sample_rate > big.sample_rate
    assert small.noise_multiplier > big.noise_multiplier
    assert small.planned_epsilon <= 8.0 and big.planned_epsilon <= 8.0


def test_a_fixed_noise_on_a_tiny_device_overshoots_which_is_what_calibration_prevents():
    # the measured failure: noise 0.6 at a rate near 1 gives a large device epsilon
    assert compute_epsilon([(0.6, 1.0, 24)], 1e-5) > 8.0
    sigma = calibrate(1.0, 24, 8.0, 1e-5)
    assert compute_epsilon([(sigma, 1.0, 24)], 1e-5) <= 8.0


def test_calibration_accounts_for_what_the_device_already_spent():
    history = [(2.0, 0.25, 20)]
    sigma = calibrate(0.25, 10, 8.0, 1e-5, history=history)
    assert compute_epsilon(history + [(sigma, 0.25, 10)], 1e-5) <= 8.0
    assert sigma > calibrate(0.25, 10, 8.0, 1e-5)
    with pytest.raises(BudgetExceeded, match="spent epsilon"):
        calibrate(0.25, 10, 2.0, 1e-5, history=[(0.3, 1.0, 50)])


@pytest.mark.parametrize("n", [1, 3])
def test_a_tiny_device_sits_out_and_says_why(n):
    with pytest.raises(DeviceTooSmall, match="sits out"):
        device_noise(n, 8, 24, 8.0, 1e-5)


def test_the_refusal_threshold_is_the_noise_on_the_mean_gradient():
    plan = device_noise(64, 16, 24, 8.0, 1e-5)
    assert plan.noise_to_batch == pytest.approx(plan.noise_multiplier / 16)
    with pytest.raises(DeviceTooSmall, match="clip norms"):
        device_noise(64, 16, 24, 8.0, 1e-5, max_noise_to_batch=plan.noise_to_batch * 0.9)


def test_resolve_noise_calibrates_per_device_and_refuses_tiny_devices():
    cfg = PrivacyConfig(target_epsilon=8.0, delta=1e-5)
    s1 = resolve_noise(cfg, 0.25, 24, num_examples=64)
    assert compute_epsilon([(s1, 0.25, 24)], 1e-5) <= 8.0
    with pytest.raises(DeviceTooSmall):
        resolve_noise(cfg, 1.0, 24, num_examples=2)
    assert resolve_noise(PrivacyConfig(noise_multiplier=0.7), 1.0, 24, num_examples=2) == 0.7


def test_over_target_and_warning():
    assert over_target(8.5, 8.0) and not over_target(8.0, 8.0) and not over_target(None, 8.0)
    assert "above its target" in budget_warning("u1", 8.5, 8.0)
    assert sample_rate(10, 16) == 1.0
