"""`fedtune server start` follows its run through the `flwr log` stream, not a `flwr ls` process per poll."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedtune.config import config_from_dict
from fedtune.deploy import server
from fedtune.deploy.superlink import SuperLinkSpec
from fedtune.flower import simulation
from fedtune.workspace import RunDir


class _Flower:
    """Stands in for Flower's processes: a SuperLink (a sleeping process), a log stream that lasts
    ``stream_s`` seconds, a status table read by `flwr ls`."""

    def __init__(self, monkeypatch, statuses: list[str], stream_s: float, superlink_s: float = 60):
        self.statuses, self.stream_s, self.superlink_s = list(statuses), stream_s, superlink_s
        self.status_calls, self.streams, self.procs = 0, 0, []
        monkeypatch.setattr(server, "reachable", lambda *a, **k: False)
        monkeypatch.setattr(server, "write_connection", lambda *a, **k: None)
        monkeypatch.setattr(server, "start", self.superlink)
        monkeypatch.setattr(server, "wait_listening", lambda *a, **k: True)
        monkeypatch.setattr(server, "submit_run", lambda app, env, cwd: "7")
        monkeypatch.setattr(server, "run_status", self.run_status)
        monkeypatch.setattr(server, "start_log_stream", self.stream)
        monkeypatch.setattr(simulation, "stage_app", lambda run, config, extra=None: run.root)

    def _sleeper(self, seconds: float) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])
        self.procs.append(proc)
        return proc

    def superlink(self, cmd, env, log, cwd=None):
        return self._sleeper(self.superlink_s)

    def stream(self, run_id, env, cwd, log_file):
        self.streams += 1
        return self._sleeper(self.stream_s)

    def run_status(self, run_id, env, cwd):
        self.status_calls += 1
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return status, "because" if status != "finished:completed" else ""

    def all_stopped(self) -> bool:
        return all(p.poll() is not None for p in self.procs)


@pytest.fixture
def run(tmp_path):
    run = RunDir.create(tmp_path / "run")
    run.config.write_text("name: x\n")
    return run


def _start(run, **kw):
    return server.start_server(config_from_dict({"model": {"source": "tiny"}}), run, SuperLinkSpec(auth=False),
                               keys=[], min_nodes=1, **kw)


def test_the_run_is_followed_by_its_stream_and_its_status_read_once(monkeypatch, run):
    fake = _Flower(monkeypatch, ["finished:completed"], stream_s=1.5)
    polls = []
    done = _start(run, on_poll=lambda: polls.append(1), poll_seconds=0.2)
    assert done.status == "finished:completed" and done.run_id == "7"
    assert fake.status_calls == 1 and fake.streams == 1  # the old loop: one `flwr ls` per poll (~7 here)
    assert len(polls) >= 5  # progress still runs every poll_seconds
    assert fake.all_stopped()  # the stream and the SuperLink, by PID


def test_a_failed_run_raises_flowers_reason(monkeypatch, run):
    # status_seconds well above a process start on a loaded machine: the first status query comes when the
    # first stream ends (not from the safety net before it), the second once the restarted stream has ended
    # and the 3 s gap for a breaking stream has passed
    fake = _Flower(monkeypatch, ["running", "finished:failed"], stream_s=0.1)
    with pytest.raises(server.ServerFailed, match="finished:failed: because"):
        _start(run, poll_seconds=0.05, status_seconds=3.0)
    assert fake.streams == 2 and fake.status_calls == 2 and fake.all_stopped()  # a broken stream restarted


def test_a_superlink_that_exits_ends_the_follow_without_status_queries(monkeypatch, run):
    fake = _Flower(monkeypatch, ["running"], stream_s=30, superlink_s=0.3)
    with pytest.raises(server.ServerFailed, match="SuperLink exited"):
        _start(run, poll_seconds=0.05)
    assert fake.status_calls == 0 and fake.all_stopped()
