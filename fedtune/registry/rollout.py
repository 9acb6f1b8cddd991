"""Staged rollout: which devices get a candidate version, as a pure function of the device id.

bucket(device) = first 8 bytes of sha256(salt ":" device_id), scaled to [0, 100). A device is in a
rollout of p% iff bucket < p. The salt is fixed per registry and independent of the version, so 10%
is the same ~10% of devices for every version, and raising 10% -> 50% only adds devices.
"""

from __future__ import annotations

import hashlib

_SCALE = float(1 << 64)


def rollout_bucket(device_id: str, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}:{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE * 100.0


def in_rollout(device_id: str, salt: str, percent: float) -> bool:
    return rollout_bucket(device_id, salt) < percent


def choose_version(current: int | None, candidate: int | None, percent: float, device_id: str,
                   salt: str) -> int | None:
    """The version a device runs: the staged candidate inside the rollout, else the channel's current."""
    if candidate is not None and in_rollout(device_id, salt, percent):
        return candidate
    return current


def parse_percent(text: str | float | int) -> float:
    """'10%', '10', 10 or 0.1? -> 10.0. Fractions are not guessed: '0.1' means 0.1%."""
    raw = str(text).strip().rstrip("%").strip()
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"rollout: expected a percentage like 10% or 100, got {text!r}") from None
    if not 0 < value <= 100:
        raise ValueError(f"rollout: expected a percentage in (0, 100], got {text!r}")
    return value
