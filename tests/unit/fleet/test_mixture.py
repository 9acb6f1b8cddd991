"""Fleet mixtures: deterministic per (index, seed), shares respected, bad mixtures reported at once."""

from __future__ import annotations

import pytest

from fedtune.fleet import MixtureError, assign_profile, load_catalog, tier_counts, validate_mixture

MIX = {"phone-low": 0.4, "phone-high": 0.3, "laptop-8gb": 0.15, "edge-cpu": 0.1, "desktop-24gb": 0.05}


def test_deterministic_for_a_seed():
    a = [assign_profile(i, 7, MIX) for i in range(500)]
    b = [assign_profile(i, 7, MIX) for i in range(500)]
    c = [assign_profile(i, 8, MIX) for i in range(500)]
    assert a == b
    assert a != c
    # insertion order of the mixture does not matter
    assert a == [assign_profile(i, 7, dict(reversed(MIX.items()))) for i in range(500)]


def test_shares_respected_within_two_percent():
    n = 20_000
    counts = tier_counts(n, 3, MIX)
    assert sum(counts.values()) == n
    for name, share in MIX.items():
        assert abs(counts[name] / n - share) < 0.02, (name, counts)


def test_unnormalized_and_zero_shares():
    counts = tier_counts(2_000, 0, {"a": 3, "b": 1, "c": 0})
    assert counts["c"] == 0
    assert abs(counts["a"] / 2_000 - 0.75) < 0.04


def test_validate_lists_every_problem():
    catalog = load_catalog()
    validate_mixture(MIX, catalog)
    with pytest.raises(MixtureError) as exc:
        validate_mixture({"phone-low": -1, "toaster": 1, "fridge": float("nan")}, catalog)
    msg = str(exc.value)
    assert len(exc.value.problems) == 3, msg
    assert "phone-low: share must be >= 0" in msg
    assert "fridge: share must be a finite number" in msg
    assert "['fridge', 'toaster']" in msg


def test_bad_shares_refused_by_assign():
    with pytest.raises(MixtureError, match="sum to more than 0"):
        assign_profile(0, 0, {"a": 0, "b": 0})
    with pytest.raises(MixtureError, match="empty mixture"):
        assign_profile(0, 0, {})
    with pytest.raises(ValueError, match="device_index"):
        assign_profile(-1, 0, MIX)
