"""User-level DP-FedAvg building blocks: accounting checked against an independent library (Google's
dp-accounting), calibration, the mechanism's clipping and noise, Poisson cohorts, the server ledger."""

import json
import logging
import math
import random
import time
import warnings

import pytest
import torch

from fedtune.privacy import (
    UserLevelLedger,
    calibrate_noise,
    clip_delta,
    global_l2_norm,
    max_rounds_within_budget,
    noisy_mean,
    poisson_cohort,
    user_level_epsilon,
)
from fedtune.privacy import cohort as cohort_module

try:  # the independent cross-check must run wherever the tests run: a missing package fails, never skips
    import dp_accounting as dpa
except ImportError as exc:  # pragma: no cover - only without the test extra
    raise ImportError("tests/unit/privacy needs Google's dp-accounting for the accounting cross-check; "
                      "install the test extra: pip install -e '.[test]'") from exc

DELTA = 1e-5


@pytest.fixture(autouse=True)
def _quiet_accountants():
    # opacus warns when the optimal order sits at an end of its range; dp-accounting logs every order
    # whose fractional-order series it gives up on. Neither matters to these assertions.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


# ---------------------------------------------------------------- accounting vs dp-accounting


def _dp_event(sigma, q, rounds):
    return dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), rounds)


def _dp_rdp_epsilon(sigma, q, rounds, orders):
    acc = dpa.rdp.RdpAccountant(orders=list(orders))
    acc.compose(_dp_event(sigma, q, rounds))
    return acc.get_epsilon(DELTA)


GRID = [(s, q, r) for s in (0.5, 0.8, 1.0, 1.5, 3.0) for q in (0.001, 0.01, 0.05, 0.2) for r in (1, 10, 100, 1000)]


def _opacus_default_orders():
    from opacus.accountants import RDPAccountant

    return [float(a) for a in RDPAccountant.DEFAULT_ALPHAS]


def test_user_level_epsilon_matches_dp_accounting_rdp_over_grid():
    """The key check: our ε (opacus' RDP accountant) against Google's dp-accounting, same RDP orders.

    Orders: both libraries are given the same list, the integer orders of opacus' defaults (2..63).
    At integer orders both compute the subsampled-Gaussian RDP in closed form, so this checks the
    whole pipeline (per-round RDP, composition over rounds, conversion to (ε, δ)) independently.
    On fractional orders the two differ by design, see the next test.
    Skipped: grid points where either ε exceeds 1e3 or is inf (only σ=0.5, q=0.2, 1000 rounds:
    ε ≈ 1156); such bounds protect no one and their relative difference says nothing.
    """
    orders = [a for a in _opacus_default_orders() if a.is_integer()]
    worst, compared, skipped = 0.0, 0, []
    for sigma, q, rounds in GRID:
        ours = user_level_epsilon(sigma, q, rounds, DELTA, orders=orders)
        theirs = _dp_rdp_epsilon(sigma, q, rounds, orders)
        if not (math.isfinite(ours) and math.isfinite(theirs)) or max(ours, theirs) > 1e3:
            skipped.append((sigma, q, rounds))
            continue
        rel = abs(ours - theirs) / theirs
        worst = max(worst, rel)
        compared += 1
        assert rel < 0.01, f"sigma={sigma} q={q} rounds={rounds}: ours {ours} vs dp-accounting {theirs}"
    assert compared >= 75, skipped
    print(f"\nopacus vs dp-accounting RDP (integer orders): {compared} points, "
          f"max relative difference {worst:.2e}, skipped {skipped}")


def test_default_orders_never_looser_than_dp_accounting():
    """With opacus' full default orders (fractional ones included) given to both, our ε is never larger.

    dp-accounting 0.6 sums the fractional-order series of Mironov et al. 2019 (Sec. 3.3) with absolute
    values of the binomial coefficients, an upper bound on A_alpha (up to 14% above it at orders 1.6-2.5
    on this grid), and drops orders where that series does not converge in 1000 terms; opacus subtracts
    the negative terms (exact: see the numerical-integration test below). So on fractional orders opacus
    is tighter, which matters only where the optimal order is below ~4, i.e. at ε in the tens.
    """
    orders = _opacus_default_orders()
    within = 0
    for sigma, q, rounds in [(s, q, r) for s, q, r in GRID if r == 1000]:  # rounds only scale RDP; keeps it fast
        ours = user_level_epsilon(sigma, q, rounds, DELTA)  # the production path: default orders
        theirs = _dp_rdp_epsilon(sigma, q, rounds, orders)
        assert ours <= theirs * (1 + 1e-9), (sigma, q, rounds, ours, theirs)
        if abs(ours - theirs) <= 0.01 * theirs:
            within += 1
        else:
            assert ours > 50, (sigma, q, rounds, ours, theirs)  # the gap shows only at huge ε
    assert within >= 15


@pytest.mark.parametrize("sigma,q,alpha", [(0.5, 0.05, 1.5), (0.8, 0.05, 1.6), (1.0, 0.2, 2.5), (3.0, 0.01, 7.3)])
def test_fractional_order_rdp_matches_numerical_integration(sigma, q, alpha):
    """Slow reference: D_alpha(mu || mu0) with mu = (1-q) N(0, s^2) + q N(1, s^2), mu0 = N(0, s^2), by quadrature."""
    from opacus.accountants.analysis.rdp import compute_rdp
    from scipy import integrate

    def integrand(z):  # mu0(z) * (mu(z) / mu0(z)) ** alpha, in log space to avoid overflow
        log_ratio = math.log((1 - q) + q * math.exp((2 * z - 1) / (2 * sigma**2)))
        return math.exp(-z * z / (2 * sigma**2) - math.log(sigma * math.sqrt(2 * math.pi)) + alpha * log_ratio)

    value, _ = integrate.quad(integrand, -30 * sigma, 30 * sigma + 1, points=[0, 0.5, 1, 2, 4], limit=2000,
                              epsabs=0, epsrel=1e-13)
    reference = math.log(value) / (alpha - 1)
    assert compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=[alpha])[0] == pytest.approx(reference, rel=1e-8)


@pytest.mark.parametrize("sigma,q,rounds", [(0.8, 0.05, 1000), (3.0, 0.2, 10), (1.5, 0.001, 1000), (1.0, 0.05, 100)])
def test_rdp_is_an_upper_bound_of_dp_accounting_pld(sigma, q, rounds):
    pld = dpa.pld.PLDAccountant(value_discretization_interval=1e-3)  # pessimistic (upper) estimate
    pld.compose(_dp_event(sigma, q, rounds))
    eps_pld = pld.get_epsilon(DELTA)
    eps_rdp = user_level_epsilon(sigma, q, rounds, DELTA)
    assert eps_pld <= eps_rdp * (1 + 1e-6)
    assert eps_rdp <= 4 * eps_pld  # same ballpark: RDP is looser, not off by orders of magnitude


def test_user_level_epsilon_edges():
    assert user_level_epsilon(1.0, 0.01, 0, DELTA) == 0.0
    assert user_level_epsilon(0.0, 0.01, 5, DELTA) == math.inf
    assert user_level_epsilon(1.0, 0.01, 100, DELTA) < user_level_epsilon(1.0, 0.01, 200, DELTA)
    with pytest.raises(ValueError, match="sample_rate"):
        user_level_epsilon(1.0, 1.5, 10, DELTA)
    with pytest.raises(ValueError, match="delta"):
        user_level_epsilon(1.0, 0.1, 10, 0.0)


# ---------------------------------------------------------------- calibration and budget


@pytest.mark.parametrize("target,q,rounds", [(2.0, 0.01, 500), (8.0, 0.05, 100), (0.5, 0.001, 1000)])
def test_calibrate_noise_meets_target_tightly(target, q, rounds):
    sigma = calibrate_noise(target, DELTA, q, rounds)
    assert user_level_epsilon(sigma, q, rounds, DELTA) <= target
    assert user_level_epsilon(0.95 * sigma, q, rounds, DELTA) > target


@pytest.mark.parametrize(
    "target,delta,q,rounds,match",
    [
        (0.0, DELTA, 0.01, 100, "epsilon must be a finite number > 0"),
        (-1.0, DELTA, 0.01, 100, "epsilon must be a finite number > 0"),
        (0.01, DELTA, 1.0, 100, r"Raise target_epsilon above"),  # q = 1 and a tiny ε: below RDP's floor
        (0.05, DELTA, 0.01, 10, r"even noise multiplier"),
        (1.0, DELTA, 1.5, 100, "sample_rate must lie in"),
        (1.0, 0.0, 0.01, 100, "delta must lie in"),
        (1.0, DELTA, 0.01, 0, "rounds must be >= 1"),
    ],
)
def test_calibrate_noise_impossible_targets_explain_themselves(target, delta, q, rounds, match):
    with pytest.raises(ValueError, match=match) as info:
        calibrate_noise(target, delta, q, rounds)
    assert "calibrate_noise" in str(info.value)


def test_max_rounds_within_budget_is_consistent_with_epsilon():
    sigma, q, target = 1.0, 0.01, 1.0
    r = max_rounds_within_budget(sigma, q, target, DELTA, 100_000)
    assert 1 <= r < 100_000
    assert user_level_epsilon(sigma, q, r, DELTA) <= target < user_level_epsilon(sigma, q, r + 1, DELTA)
    assert max_rounds_within_budget(sigma, q, target, DELTA, r - 3) == r - 3  # capped by max_rounds
    assert max_rounds_within_budget(0.3, 0.5, 0.5, DELTA, 100) == 0  # not even one round fits


# ---------------------------------------------------------------- mechanism


def _state(gen, scale=1.0):
    return {
        "a.lora_A": scale * torch.randn(4, 16, generator=gen),  # [r, in]
        "a.lora_B": scale * torch.randn(16, 4, generator=gen),  # [out, r]
    }


def test_clip_delta_scales_to_clip_norm_and_keeps_direction():
    gen = torch.Generator().manual_seed(0)
    raw = _state(gen)
    n0 = global_l2_norm(raw)
    big = {k: v * (10.0 / n0) for k, v in raw.items()}  # norm 10
    clipped, norm = clip_delta(big, 1.0)
    assert norm == pytest.approx(10.0, rel=1e-6)
    assert global_l2_norm(clipped) == pytest.approx(1.0, abs=1e-6)
    for k in big:
        assert clipped[k].dtype == torch.float32 and clipped[k].shape == big[k].shape
        torch.testing.assert_close(clipped[k] * 10.0, big[k])  # same direction, scaled by C / norm

    small = {k: v * (0.5 / n0) for k, v in raw.items()}
    same, n_small = clip_delta(small, 1.0)
    assert n_small == pytest.approx(0.5, rel=1e-6)
    for k in small:
        assert torch.equal(same[k], small[k])

    zero, n_zero = clip_delta({k: torch.zeros_like(v) for k, v in raw.items()}, 1.0)
    assert n_zero == 0.0 and all(torch.count_nonzero(v) == 0 for v in zero.values())
    with pytest.raises(ValueError, match="clip_norm"):
        clip_delta(raw, 0.0)


def test_noisy_mean_without_noise_is_sum_over_expected_cohort():
    gen = torch.Generator().manual_seed(1)
    clipped = [clip_delta(_state(gen, 3.0), 1.0)[0] for _ in range(5)]
    out = noisy_mean(clipped, 1.0, 0.0, expected_cohort=8.0, generator=torch.Generator().manual_seed(0))
    for k in clipped[0]:
        torch.testing.assert_close(out[k], sum(c[k] for c in clipped) / 8.0)
        assert out[k].dtype == torch.float32


def test_noisy_mean_noise_has_std_sigma_c_over_expected_cohort():
    sigma, c, m = 1.3, 0.7, 25.0
    template = {"w": torch.zeros(400, 500)}  # 200k coordinates
    gen = torch.Generator().manual_seed(2)
    clipped = [clip_delta({"w": torch.randn(400, 500, generator=gen)}, c)[0] for _ in range(3)]
    out = noisy_mean(clipped, c, sigma, m, torch.Generator().manual_seed(3))
    noise = out["w"] - sum(x["w"] for x in clipped) / m
    assert noise.mean().abs().item() < 0.02 * sigma * c / m  # std of the mean is 0.0022 of that
    assert noise.std().item() == pytest.approx(sigma * c / m, rel=0.05)

    only_noise = noisy_mean([], c, sigma, m, torch.Generator().manual_seed(3), template=template)
    assert only_noise["w"].shape == (400, 500)
    assert only_noise["w"].std().item() == pytest.approx(sigma * c / m, rel=0.05)


def test_noisy_mean_is_deterministic_per_seed_and_checks_inputs():
    gen = torch.Generator().manual_seed(4)
    clipped = [clip_delta(_state(gen), 1.0)[0] for _ in range(3)]
    a = noisy_mean(clipped, 1.0, 1.0, 10.0, torch.Generator().manual_seed(7))
    b = noisy_mean(list(reversed(clipped)), 1.0, 1.0, 10.0, torch.Generator().manual_seed(7))
    c = noisy_mean(clipped, 1.0, 1.0, 10.0, torch.Generator().manual_seed(8))
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    assert not torch.equal(a["a.lora_A"], c["a.lora_A"])

    with pytest.raises(ValueError, match="template"):
        noisy_mean([], 1.0, 1.0, 10.0, torch.Generator())
    with pytest.raises(ValueError, match="clip it with clip_delta"):
        noisy_mean([_state(gen, 5.0)], 1.0, 1.0, 10.0, torch.Generator())
    with pytest.raises(ValueError, match="expected_cohort"):
        noisy_mean(clipped, 1.0, 1.0, 0.0, torch.Generator())


# ---------------------------------------------------------------- Poisson cohort


def test_poisson_cohort_is_deterministic_sorted_and_in_range():
    a = poisson_cohort(10_000, 0.01, seed=5, server_round=3)
    assert a == poisson_cohort(10_000, 0.01, seed=5, server_round=3)
    assert a != poisson_cohort(10_000, 0.01, seed=5, server_round=4)
    assert a != poisson_cohort(10_000, 0.01, seed=6, server_round=3)
    assert a == sorted(set(a)) and all(0 <= i < 10_000 for i in a)
    assert poisson_cohort(100, 0.0, 0, 1) == [] and poisson_cohort(5, 1.0, 0, 1) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="q must lie in"):
        poisson_cohort(100, 1.2, 0, 1)


def test_poisson_cohort_mean_size_and_uniform_membership():
    n, q, rounds = 10_000, 0.01, 200
    cohorts = [poisson_cohort(n, q, seed=11, server_round=r) for r in range(1, rounds + 1)]
    sizes = [len(c) for c in cohorts]
    assert sum(sizes) / rounds == pytest.approx(q * n, rel=0.05)
    assert len(set(sizes)) > 5  # Poisson sampling: the size varies
    low = sum(1 for c in cohorts for i in c if i < n // 2)
    assert low / sum(sizes) == pytest.approx(0.5, abs=0.02)  # no bias towards either end


def test_poisson_cohort_cost_grows_with_expected_cohort_not_population(monkeypatch):
    draws = 0

    class CountingRandom(random.Random):
        def random(self):
            nonlocal draws
            draws += 1
            return super().random()

    monkeypatch.setattr(cohort_module.random, "Random", CountingRandom)
    t0 = time.perf_counter()
    members = poisson_cohort(10**8, 1e-6, seed=1, server_round=1)
    elapsed = time.perf_counter() - t0
    assert draws == len(members) + 1  # one draw per member plus the one that runs past the end
    assert draws < 250  # expected 100
    assert elapsed < 0.05


# ---------------------------------------------------------------- server ledger


def test_ledger_merges_rounds_and_round_trips_through_json():
    led = UserLevelLedger(accountant="rdp", delta=DELTA, target_epsilon=4.0)
    assert led.epsilon() == 0.0 and led.rounds == 0
    for _ in range(3):
        led.record_round(1.1, 0.01)
    led.record_round(1.5, 0.01)
    led.record_round(1.5, 0.01)
    assert led.history == [(1.1, 0.01, 3), (1.5, 0.01, 2)] and led.rounds == 5

    back = UserLevelLedger.from_dict(json.loads(json.dumps(led.to_dict())))
    assert back == led
    assert back.epsilon() == pytest.approx(led.epsilon(), rel=1e-12)
    unbounded = UserLevelLedger(delta=DELTA)
    assert UserLevelLedger.from_dict(json.loads(json.dumps(unbounded.to_dict()))) == unbounded
    with pytest.raises(ValueError, match="lacks"):
        UserLevelLedger.from_dict({"accountant": "rdp"})


def test_ledger_epsilon_composes_like_the_pure_function():
    led = UserLevelLedger(delta=DELTA)
    for _ in range(50):
        led.record_round(1.0, 0.02)
    assert led.epsilon() == pytest.approx(user_level_epsilon(1.0, 0.02, 50, DELTA), rel=1e-12)


def test_budget_left_flips_exactly_where_max_rounds_says():
    sigma, q, target = 1.2, 0.02, 2.0
    r = max_rounds_within_budget(sigma, q, target, DELTA, 100_000)
    led = UserLevelLedger(delta=DELTA, target_epsilon=target, history=[(sigma, q, r - 1)])
    assert led.budget_left(sigma, q)  # round r still fits
    led.record_round(sigma, q)
    assert led.rounds == r and led.epsilon() <= target
    assert not led.budget_left(sigma, q)  # round r + 1 would not
    assert UserLevelLedger(delta=DELTA, history=[(sigma, q, r)]).budget_left(sigma, q)  # no target
