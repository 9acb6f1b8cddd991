"""Cohort sampling: deterministic per (seed, round), only available devices, cost bounded by the cohort."""

from __future__ import annotations

import math

import pytest

from fedtune.fleet import sample_cohort


def _even(i: int) -> bool:
    return i % 2 == 0


def test_deterministic_for_seed_and_round():
    kw = dict(population=10_000, cohort=20, over_selection=0.3, is_available=_even)
    a = sample_cohort(server_round=1, seed=0, **kw)
    assert a == sample_cohort(server_round=1, seed=0, **kw)
    assert a != sample_cohort(server_round=2, seed=0, **kw)
    assert a != sample_cohort(server_round=1, seed=1, **kw)
    assert a == sorted(a) and len(set(a)) == len(a)


def test_only_available_and_never_more_than_requested():
    got = sample_cohort(population=1000, cohort=10, over_selection=0.25, server_round=3, seed=5,
                        is_available=_even)
    assert len(got) == math.ceil(10 * 1.25)
    assert all(_even(i) for i in got)
    # a tiny fleet cannot give more than it has, and nothing when nobody is available
    small = sample_cohort(population=4, cohort=10, over_selection=0.5, server_round=1, seed=0,
                          is_available=lambda i: True)
    assert small == [0, 1, 2, 3]
    assert sample_cohort(population=100, cohort=5, over_selection=0, server_round=1, seed=0,
                         is_available=lambda i: False) == []


def test_checks_bounded_by_cohort_not_population():
    calls = 0

    def rarely(i: int) -> bool:
        nonlocal calls
        calls += 1
        return i % 1000 == 0  # 0.1% available: the sampler gives up after max_tries_factor * cohort draws

    got = sample_cohort(population=10_000_000, cohort=16, over_selection=0.5, server_round=1, seed=0,
                        is_available=rarely, max_tries_factor=50)
    assert calls <= 50 * 16
    assert len(got) <= 24 and all(i % 1000 == 0 for i in got)

    calls = 0
    got = sample_cohort(population=10_000_000, cohort=16, over_selection=0.5, server_round=1, seed=0,
                        is_available=lambda i: rarely(i) or True)
    assert len(got) == 24 and calls == 24


def test_bad_arguments_listed_together():
    with pytest.raises(ValueError, match="population.*cohort.*over_selection"):
        sample_cohort(population=0, cohort=0, over_selection=-1, server_round=1, seed=0, is_available=_even)
