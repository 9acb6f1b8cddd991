"""The launcher follows a run through the `flwr log` stream, not a `flwr ls` process per poll."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from fedtune.config import config_from_dict
from fedtune.flower import simulation
from fedtune.workspace import RunDir


class _Flower:
    """Stands in for the `flwr` processes: a log stream that lasts ``stream_s`` seconds, a status table."""

    def __init__(self, monkeypatch, statuses: list[str], stream_s: float):
        self.statuses, self.stream_s = list(statuses), stream_s
        self.status_calls, self.followers = 0, 0
        monkeypatch.setattr(simulation, "flwr", self.flwr)
        monkeypatch.setattr(simulation, "run_status", self.run_status)
        monkeypatch.setattr(simulation, "_start_follower", self.follow)
        monkeypatch.setattr(simulation, "stop_superlink", lambda port: None)

    def flwr(self, args, env, cwd=None, timeout=120):
        return SimpleNamespace(stdout=json.dumps({"run-id": 42}), stderr="")

    def run_status(self, run_id, env, cwd):
        self.status_calls += 1
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return status, "because" if status != "finished:completed" else ""

    def follow(self, run_id, env, cwd, log_file):
        self.followers += 1
        return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({self.stream_s})"])


@pytest.fixture
def run(tmp_path):
    return RunDir.create(tmp_path / "run")


def _cfg():
    return config_from_dict({"model": {"source": "tiny"}})


def test_a_run_is_followed_by_its_log_stream_and_its_status_read_once(monkeypatch, run):
    fake = _Flower(monkeypatch, ["finished:completed"], stream_s=1.5)
    polls = []
    handle = simulation.run_simulation(_cfg(), run, 2, on_poll=lambda: polls.append(1), poll_seconds=0.2)
    assert handle.status == "finished:completed" and handle.run_id == "42"
    assert fake.status_calls == 1 and handle.status_calls == 1  # the old loop: one per poll (~7 here)
    assert len(polls) >= 5  # progress still runs every poll_seconds, in this process


def test_a_broken_stream_is_restarted_and_a_failure_raised(monkeypatch, run):
    # status_seconds well above a process start on a loaded machine (see tests/unit/deploy/test_server_follow.py)
    fake = _Flower(monkeypatch, ["running", "finished:failed"], stream_s=0.1)
    with pytest.raises(simulation.SimulationFailed, match="finished:failed: because"):
        simulation.run_simulation(_cfg(), run, 2, poll_seconds=0.05, status_seconds=3.0)
    assert fake.followers == 2 and fake.status_calls == 2


def test_a_stream_that_hangs_is_checked_every_status_seconds(monkeypatch, run):
    fake = _Flower(monkeypatch, ["running", "running", "finished:completed"], stream_s=30)
    handle = simulation.run_simulation(_cfg(), run, 2, poll_seconds=0.05, status_seconds=0.3)
    assert handle.status == "finished:completed" and fake.status_calls == 3 and fake.followers == 1
