"""fedtune's ε is opacus' ε, bit for bit, also through its per-(σ, q) cache."""

from __future__ import annotations

import random

import pytest
from opacus.accountants import create_accountant

from fedtune.privacy.accounting import compute_epsilon


@pytest.mark.parametrize("seed", range(6))
def test_rdp_epsilon_equals_opacus_accountant(seed):
    rng = random.Random(seed)
    history = [(rng.uniform(0.5, 3.0), rng.uniform(1e-3, 0.5), rng.randint(1, 400)) for _ in range(rng.randint(1, 4))]
    delta = 10.0 ** -rng.randint(3, 7)
    acc = create_accountant("rdp")
    acc.history = list(history)
    expected = acc.get_epsilon(delta=delta)
    assert compute_epsilon(history, delta) == expected
    assert compute_epsilon(history, delta) == expected  # second call: from the cache


def test_more_steps_spend_more_and_empty_spends_nothing():
    assert compute_epsilon([], 1e-5) == 0.0
    assert compute_epsilon([(1.0, 0.1, 20)], 1e-5) > compute_epsilon([(1.0, 0.1, 10)], 1e-5)


def test_other_accountants_go_through_opacus():
    acc = create_accountant("prv")
    acc.history = [(1.0, 0.05, 50)]
    assert compute_epsilon([(1.0, 0.05, 50)], 1e-5, "prv") == pytest.approx(acc.get_epsilon(delta=1e-5))


def test_noise_calibration_agrees_with_opacus_and_is_asked_once_per_plan():
    from opacus.accountants.utils import get_noise_multiplier

    from fedtune.privacy.accounting import compute_epsilon, noise_for_target_epsilon
    from fedtune.privacy.device_budget import _calibrate

    args = (3.0, 1e-5, 0.07, 37)
    hits = _calibrate.cache_info().hits
    sigma = noise_for_target_epsilon(*args)
    opacus_sigma = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.07, steps=37,
                                        accountant="rdp")
    assert sigma == pytest.approx(opacus_sigma, rel=1e-2)
    assert compute_epsilon([(sigma, 0.07, 37)], 1e-5) <= 3.0  # the target holds for the σ we return
    assert noise_for_target_epsilon(*args) == sigma
    assert _calibrate.cache_info().hits == hits + 1
