import pytest

from fedtune.deploy.eligibility import (
    HostSignals, Verdict, available_policies, create_policy, register_policy,
)


class Signals:
    def __init__(self, charging=True, idle=True, unmetered=True, memory=8.0):
        self._c, self._i, self._u, self._m = charging, idle, unmetered, memory

    def charging(self):
        return self._c

    def idle(self):
        return self._i

    def unmetered(self):
        return self._u

    def available_memory_gb(self):
        return self._m


@pytest.mark.parametrize("spec,signals,reason", [
    ("always", Signals(charging=False, idle=False, unmetered=False, memory=0.1), ""),
    ("charging", Signals(charging=False), "not_charging"),
    ("charging", Signals(charging=None), ""),  # no battery: always powered
    ("idle", Signals(idle=False), "busy"),
    ("unmetered", Signals(unmetered=False), "metered_network"),
    ("memory:4", Signals(memory=2.0), "low_memory"),
    ("memory:4", Signals(memory=6.0), ""),
    ("charging+unmetered", Signals(unmetered=False), "metered_network"),
    ("charging+unmetered+idle", Signals(), ""),
    ("never", Signals(), "paused"),
])
def test_policies(spec, signals, reason):
    verdict = create_policy(spec)(signals)
    assert verdict == (Verdict(True) if not reason else Verdict(False, reason))


def test_registry_fails_loudly():
    assert {"always", "charging", "idle", "unmetered", "memory", "never"} <= set(available_policies())
    with pytest.raises(ValueError, match="unknown eligibility policy 'wifi'"):
        create_policy("charging+wifi")
    with pytest.raises(ValueError, match="already registered"):
        register_policy("idle")(object)
    with pytest.raises(ValueError, match="needs a threshold"):
        create_policy("memory")
    assert create_policy("memory", min_memory_gb=1.0)(Signals(memory=2.0)).eligible


def test_host_signals_read_this_machine(monkeypatch):
    s = HostSignals()
    assert s.available_memory_gb() > 0 and s.charging() in (True, False, None)
    monkeypatch.setenv("FEDTUNE_METERED", "1")
    assert create_policy("unmetered")(s) == Verdict(False, "metered_network")
