"""Device-side eligibility: may this device train now? (charging, idle, unmetered network, free memory)

A device app picks a policy by name (``--eligibility`` on ``fedtune device join``, or ``eligibility`` in
the SuperNode's node config); the ClientApp asks it at the start of every round. An ineligible device
declines the round with its reason (the server counts it as declined, not as a failure).

Policies are small callables behind a registry (``register_policy`` / ``create_policy``); several names
joined with ``+`` must all pass (``charging+unmetered``). Each reads the device through a ``DeviceSignals``
object, so tests and device apps can supply their own signals (a phone app knows its battery and network
better than psutil does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol


@dataclass(frozen=True)
class Verdict:
    eligible: bool
    reason: str = ""  # a short, countable tag when not eligible, e.g. "not_charging"


ELIGIBLE = Verdict(True)


class DeviceSignals(Protocol):
    def charging(self) -> bool | None: ...  # None: the device cannot tell (no battery: always powered)
    def idle(self) -> bool: ...
    def unmetered(self) -> bool: ...
    def available_memory_gb(self) -> float: ...


class HostSignals:
    """Signals of the machine this process runs on (psutil); ``FEDTUNE_METERED=1`` marks a metered link."""

    def __init__(self, idle_cpu_percent: float = 50.0):
        self.idle_cpu_percent = idle_cpu_percent

    def charging(self) -> bool | None:
        import psutil

        battery = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
        return None if battery is None else bool(battery.power_plugged)

    def idle(self) -> bool:
        import psutil

        return psutil.cpu_percent(interval=0.2) < self.idle_cpu_percent

    def unmetered(self) -> bool:
        import os

        return os.environ.get("FEDTUNE_METERED", "0") != "1"

    def available_memory_gb(self) -> float:
        import psutil

        return psutil.virtual_memory().available / 2**30


class EligibilityPolicy(Protocol):
    def __call__(self, signals: DeviceSignals) -> Verdict: ...


_REGISTRY: dict[str, Callable[..., EligibilityPolicy]] = {}


def register_policy(name: str):
    def deco(factory):
        if name in _REGISTRY:
            raise ValueError(f"eligibility policy {name!r} is already registered")
        if "+" in name or ":" in name:
            raise ValueError(f"eligibility policy name {name!r} may not contain '+' or ':'")
        _REGISTRY[name] = factory
        return factory

    return deco


def available_policies() -> list[str]:
    return sorted(_REGISTRY)


class AllOf:
    def __init__(self, policies: list[EligibilityPolicy]):
        self.policies = policies

    def __call__(self, signals: DeviceSignals) -> Verdict:
        for policy in self.policies:
            verdict = policy(signals)
            if not verdict.eligible:
                return verdict
        return ELIGIBLE


def create_policy(spec: str, *, min_memory_gb: float = 0.0) -> EligibilityPolicy:
    """``always``, one name, or names joined with ``+``; ``memory`` needs ``min_memory_gb``
    (or ``memory:2.5`` inline)."""
    parts = [p.strip() for p in (spec or "always").split("+") if p.strip()]
    policies = []
    for part in parts:
        name, _, arg = part.partition(":")
        if name not in _REGISTRY:
            raise ValueError(f"unknown eligibility policy {name!r} in {spec!r}; available: {available_policies()}")
        options = {"min_memory_gb": float(arg) if arg else min_memory_gb} if name == "memory" else {}
        policies.append(_REGISTRY[name](**options))
    return policies[0] if len(policies) == 1 else AllOf(policies)


@register_policy("always")
class Always:
    def __call__(self, signals: DeviceSignals) -> Verdict:
        return ELIGIBLE


@register_policy("charging")
class Charging:
    """Train only on external power; a device without a battery counts as powered."""

    def __call__(self, signals: DeviceSignals) -> Verdict:
        return ELIGIBLE if signals.charging() in (True, None) else Verdict(False, "not_charging")


@register_policy("idle")
class Idle:
    def __call__(self, signals: DeviceSignals) -> Verdict:
        return ELIGIBLE if signals.idle() else Verdict(False, "busy")


@register_policy("unmetered")
class Unmetered:
    def __call__(self, signals: DeviceSignals) -> Verdict:
        return ELIGIBLE if signals.unmetered() else Verdict(False, "metered_network")


@register_policy("memory")
class EnoughMemory:
    def __init__(self, min_memory_gb: float = 0.0):
        if min_memory_gb <= 0:
            raise ValueError("eligibility policy 'memory' needs a threshold, e.g. memory:2 (GiB free)")
        self.min_memory_gb = min_memory_gb

    def __call__(self, signals: DeviceSignals) -> Verdict:
        free = signals.available_memory_gb()
        return ELIGIBLE if free >= self.min_memory_gb else Verdict(False, "low_memory")


@register_policy("never")
class Never:
    """The device's owner has paused training (a switch in the device app); it declines every round."""

    def __call__(self, signals: DeviceSignals) -> Verdict:
        return Verdict(False, "paused")
