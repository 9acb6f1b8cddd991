"""The device runner keeps a SuperNode up beside one warm ClientApp process, and stops both by PID.
Flower's processes are replaced by small stand-ins here; tests/integration/test_deployment.py runs the real ones."""

import sys
import threading
import time

import pytest

import fedtune.deploy.device_runner as dr
from fedtune.deploy.supernode import DeviceJoin
from fedtune.errors import UserError


def _join(tmp_path, **kw):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    return dr.checked_join(DeviceJoin(superlink="127.0.0.1:1", data_path=data, insecure=True,
                                      state_dir=tmp_path / "state", **kw), check_reachable=False)


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_checked_join_refuses_bad_input_in_one_line(tmp_path):
    with pytest.raises(UserError, match="--data: file not found"):
        dr.checked_join(DeviceJoin(superlink="x:1", data_path=tmp_path / "none.jsonl", insecure=True,
                                   eligibility="sometimes"), check_reachable=False)
    (tmp_path / "state").write_text("a file")
    with pytest.raises(UserError, match="--state-dir: .* is a file"):
        _join(tmp_path)


def test_a_refused_key_ends_the_runner_and_its_warm_runtime(tmp_path, monkeypatch):
    monkeypatch.setattr(dr, "supernode_command", lambda j: _py("print('Exit Code: 305'); raise SystemExit(1)"))
    monkeypatch.setattr(dr, "warm_runtime_command", lambda j, pid: _py("import time; time.sleep(120)"))
    runner = dr.DeviceRunner(_join(tmp_path, auth_key=None), refusal_retries=0)
    with pytest.raises(UserError, match="requires node authentication"):
        runner.run()
    assert runner.runtime is not None and runner.runtime.poll() is not None  # not left behind


def test_the_warm_runtime_outlives_supernode_restarts(tmp_path, monkeypatch):
    monkeypatch.setattr(dr, "supernode_command", lambda j: _py("import time; time.sleep(0.3)"))
    monkeypatch.setattr(dr, "warm_runtime_command", lambda j, pid: _py("import time; time.sleep(120)"))
    runner = dr.DeviceRunner(_join(tmp_path), max_backoff=0.1)
    runner._say = lambda line: None
    starts = []
    real = dr.subprocess.Popen

    def popen(cmd, **kw):
        p = real(cmd, **kw)
        starts.append(p.pid)
        return p

    monkeypatch.setattr(dr.subprocess, "Popen", popen)
    t = threading.Thread(target=runner.run)
    t.start()
    deadline = time.monotonic() + 20
    while len(starts) < 4 and time.monotonic() < deadline:  # the runtime + three SuperNode (re)starts
        time.sleep(0.1)
    runtime_pid = runner.runtime.pid
    assert runner.runtime.poll() is None and starts.count(runtime_pid) == 1  # started once, still running
    runner.stop()
    t.join(20)
    assert not t.is_alive()
    assert runner.runtime.poll() is not None  # stopped with the runner
    assert runner.env["FEDTUNE_DEVICE_HOME"] == str((tmp_path / "state").absolute())


def test_a_cold_device_starts_no_runtime(tmp_path, monkeypatch):
    monkeypatch.setattr(dr, "supernode_command", lambda j: _py("raise SystemExit(0)"))
    runner = dr.DeviceRunner(_join(tmp_path, warm=False), max_backoff=0.05)
    runner._say = lambda line: runner.stop()
    runner.run()
    assert runner.runtime is None
