"""Simulated clock: round time formula, deterministic slowdown / dropout / availability at their rates."""

from __future__ import annotations

import math
import statistics

import pytest

from fedtune.fleet import (
    DeviceProfile,
    SimClock,
    client_seconds,
    drops_out,
    is_available,
    load_catalog,
    local_hour,
    slowdown,
    timezone_offset,
)

CATALOG = load_catalog()


def _with(name, **over) -> DeviceProfile:
    return DeviceProfile.model_validate({**CATALOG[name].model_dump(), **over})


def test_client_seconds_is_the_hand_formula():
    p = CATALOG["phone-low"]
    got = client_seconds(p, download_bytes=3_000_000, upload_bytes=1_000_000, tokens=4096,
                         model_params=360_000_000, slowdown=1.3)
    want = (3_000_000 * 8 / (p.download_mbps * 1e6)
            + 4096 / (p.train_tokens_per_s * 135e6 / 360e6) * 1.3
            + 1_000_000 * 8 / (p.upload_mbps * 1e6))
    assert got == pytest.approx(want)


def test_slowdown_deterministic_and_lognormal():
    p = _with("phone-high", speed_jitter=0.3)
    assert slowdown(p, 5, 2, 0) == slowdown(p, 5, 2, 0)
    assert slowdown(p, 5, 2, 0) != slowdown(p, 5, 3, 0) != slowdown(p, 6, 2, 0)
    logs = [math.log(slowdown(p, i, 1, 0)) for i in range(5000)]
    assert abs(statistics.fmean(logs)) < 0.02
    assert statistics.pstdev(logs) == pytest.approx(0.3, rel=0.05)
    assert slowdown(_with("phone-high", speed_jitter=0.0), 1, 1, 0) == 1.0


def test_dropout_deterministic_at_its_rate():
    p = _with("phone-low", dropout_probability=0.2)
    draws = [drops_out(p, i, 4, 1) for i in range(10_000)]
    assert draws == [drops_out(p, i, 4, 1) for i in range(10_000)]
    assert abs(sum(draws) / len(draws) - 0.2) < 0.015
    assert not any(drops_out(_with("phone-low", dropout_probability=0.0), i, 1, 1) for i in range(200))
    # dropout and availability are not the same coin
    assert draws != [drops_out(p, i, 5, 1) for i in range(10_000)]


def test_timezone_offsets_cover_minus3_to_3():
    offsets = {timezone_offset(i, 0) for i in range(500)}
    assert offsets == set(range(-3, 4))
    assert local_hour(0, 3600 * 30, 0, 22.0) == pytest.approx((22 + 30 + timezone_offset(0, 0)) % 24)


def test_availability_follows_the_day_pattern():
    phone = CATALOG["phone-low"]  # 0.6 in 22-07 local, 0.03 otherwise; offsets +-3 h
    n = 4000
    at_2am = sum(is_available(phone, i, 0, 0, 2.0) for i in range(n)) / n
    at_2pm = sum(is_available(phone, i, 0, 0, 14.0) for i in range(n)) / n
    assert at_2am > 0.5 and at_2pm < 0.06
    assert at_2am > 10 * at_2pm
    # later in the run: 22:00 start + 16 h is 14:00 again, 22:00 + 28 h is 02:00 of the next day
    assert sum(is_available(phone, i, 16 * 3600, 0, 22.0) for i in range(n)) / n < 0.06
    assert sum(is_available(phone, i, 28 * 3600, 0, 22.0) for i in range(n)) / n > 0.5
    # deterministic within an hour slot
    assert [is_available(phone, i, 60, 0, 2.0) for i in range(300)] == \
           [is_available(phone, i, 3000, 0, 2.0) for i in range(300)]


def test_availability_wraps_midnight():
    p = _with("phone-high", availability={"default_probability": 0.0,
                                          "windows": [{"start_hour": 22, "end_hour": 7, "probability": 1.0}]})
    for i in range(200):
        tz = timezone_offset(i, 0)
        # 23:30 and 03:00 local are inside 22->7, 12:00 local is not
        for local, want in ((23.5, True), (3.0, True), (12.0, False), (7.0, False), (22.0, True)):
            start = (local - tz) % 24
            assert is_available(p, i, 0, 0, start) is want, (i, local)
        # crossing midnight on the simulated clock: 23:00 local + 2 h = 01:00 local, still available
        assert is_available(p, i, 2 * 3600, 0, (23 - tz) % 24)


def test_sim_clock_round_trip():
    clock = SimClock()
    clock.advance(3600 * 25.5)
    assert clock.hour_of_day(22.0) == pytest.approx((22 + 25.5) % 24)
    again = SimClock.from_dict(clock.to_dict())
    assert again == clock and again.seconds == clock.seconds
    with pytest.raises(ValueError, match="dt"):
        clock.advance(-1)
