"""The simulated clock: how long a device's round takes, whether it drops out, whether it is available.

Every random draw is a pure function of (seed, device, round or hour slot) through a salted blake2b hash,
so any worker process gets the same answer and a resumed run replays the same fleet.

- client_seconds = download_bytes*8/(download_mbps*1e6) + tokens/tokens_per_s(model) * slowdown
                   + upload_bytes*8/(upload_mbps*1e6)
- slowdown ~ lognormal(0, speed_jitter) per (seed, device, round)
- drops_out ~ Bernoulli(dropout_probability) per (seed, device, round)
- is_available ~ Bernoulli(p(local hour)) per (seed, device, hour slot), local hour = start_hour +
  sim hours + a per-device timezone offset in [-3, 3]
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from fedtune.fleet.capability import transfer_seconds
from fedtune.fleet.hashing import stable_hash, stable_uniform
from fedtune.fleet.profiles import DeviceProfile

MAX_TZ_OFFSET_HOURS = 3


def client_seconds(
    profile: DeviceProfile,
    *,
    download_bytes: int,
    upload_bytes: int,
    tokens: int,
    model_params: int,
    slowdown: float = 1.0,
) -> float:
    """Simulated seconds for one device's round; only the compute part is slowed down."""
    compute = tokens / profile.tokens_per_s(model_params) * slowdown
    return (transfer_seconds(download_bytes, profile.download_mbps) + compute
            + transfer_seconds(upload_bytes, profile.upload_mbps))


def slowdown(profile: DeviceProfile, device_index: int, server_round: int, seed: int) -> float:
    """Lognormal(0, speed_jitter) slowdown factor of this device in this round (1.0 when jitter is 0)."""
    if profile.speed_jitter == 0:
        return 1.0
    rng = random.Random(stable_hash("slowdown", seed, device_index, server_round))
    return rng.lognormvariate(0.0, profile.speed_jitter)


def drops_out(profile: DeviceProfile, device_index: int, server_round: int, seed: int) -> bool:
    """Whether this device drops out mid-round in this round."""
    return stable_uniform("dropout", seed, device_index, server_round) < profile.dropout_probability


def timezone_offset(device_index: int, seed: int) -> int:
    """A per-device whole-hour offset in [-3, 3] from the fleet's reference clock."""
    span = 2 * MAX_TZ_OFFSET_HOURS + 1
    return stable_hash("tz", seed, device_index) % span - MAX_TZ_OFFSET_HOURS


def local_hour(device_index: int, sim_seconds: float, seed: int, start_hour: float) -> float:
    """The device's local hour of day in [0, 24)."""
    return (start_hour + sim_seconds / 3600 + timezone_offset(device_index, seed)) % 24


def is_available(profile: DeviceProfile, device_index: int, sim_seconds: float, seed: int,
                 start_hour: float) -> bool:
    """Whether the device is available at ``sim_seconds`` into a run that started at ``start_hour``.

    The draw is fixed for a whole hour slot (floor of the hours since the run's day 0 at 00:00), so
    checking twice within an hour agrees, and each new hour draws afresh.
    """
    hours = start_hour + sim_seconds / 3600
    p = profile.availability.probability_at(hours + timezone_offset(device_index, seed))
    if p >= 1.0:
        return True
    if p <= 0.0:
        return False
    return stable_uniform("available", seed, device_index, math.floor(hours)) < p


@dataclass
class SimClock:
    """Simulated seconds since the run started; the only mutable piece of the fleet, checkpointed."""

    seconds: float = 0.0

    def advance(self, dt: float) -> float:
        """Move forward by ``dt`` >= 0 seconds; returns the new time."""
        if not dt >= 0 or math.isinf(dt):
            raise ValueError(f"SimClock.advance: dt must be a finite number >= 0, got {dt!r}")
        self.seconds += dt
        return self.seconds

    def hour_of_day(self, start_hour: float) -> float:
        """Reference-clock hour of day in [0, 24) for a run started at ``start_hour``."""
        return (start_hour + self.seconds / 3600) % 24

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SimClock:
        return cls(seconds=float(data["seconds"]))
