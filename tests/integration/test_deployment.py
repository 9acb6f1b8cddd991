"""Real deployment on loopback: `fedtune server start` (a SuperLink, TLS + node authentication) and three
`fedtune device join` SuperNodes, each a separate process tree, on the tiny model; and the faults a real
fleet has: a device without a registered key, a SuperNode killed mid-round, the server killed between rounds.

Each scenario takes 2-4 minutes on 2 shared CPU cores (processes start, the base model loads once per
device in its warm ClientApp process), hence ``slow``. Every process a test starts is stopped by its PID.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(tmp: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), FEDTUNE_CACHE=os.environ.get("FEDTUNE_CACHE", str(tmp / "cache")))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


class Deployment:
    """Certificates, keys, device data files and the processes of one scenario."""

    def __init__(self, tmp: Path):
        from fedtune.config import load_config
        from fedtune.data.sources import load_user_texts
        from fedtune.deploy.certs import make_ca_and_server, make_supernode_key

        self.tmp, self.env, self.port = tmp, _env(tmp), _free_port()
        self.certs = make_ca_and_server(tmp / "certs")
        (tmp / "authorized").mkdir()
        for name in ("d0", "d1", "d2", "rogue"):
            _, pub = make_supernode_key(tmp / "certs", name)
            if name != "rogue":
                (tmp / "authorized" / pub.name).write_bytes(pub.read_bytes())
        cfg = load_config(ROOT / "configs/deploy-smoke.yaml", ["data.synthetic_docs_per_user=10"])
        for i, docs in enumerate(load_user_texts(cfg.data, seed=1).values()):
            (tmp / f"dev{i}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        self.procs: list[subprocess.Popen] = []
        self.out = tmp / "run"

    def cli(self, *args: str, log: str) -> subprocess.Popen:
        with open(self.tmp / log, "ab") as f:
            proc = subprocess.Popen([sys.executable, "-m", "fedtune.cli", *args], cwd=ROOT, env=self.env,
                                    stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def server(self, *extra: str) -> subprocess.Popen:
        proc = self.cli("server", "start", "configs/deploy-smoke.yaml", "--out", str(self.out), "--port",
                        str(self.port), "--certs", str(self.certs.root), "--authorized-keys",
                        str(self.tmp / "authorized"), *extra, log="server.log")
        # devices join once the SuperLink knows their keys (the run is submitted after registration)
        n = sum(e["event"] == "deployment_run" for e in self.events())
        deadline = time.monotonic() + 180
        while sum(e["event"] == "deployment_run" for e in self.events()) == n:
            assert proc.poll() is None, (self.tmp / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the SuperLink did not come up"
            time.sleep(0.5)
        return proc

    def device(self, i: int, key: str | None = None, extra: tuple[str, ...] = (), **flags: str) -> subprocess.Popen:
        args = ["device", "join", "--superlink", f"127.0.0.1:{self.port}", "--profile", "laptop-8gb", "--data",
                str(self.tmp / f"dev{i}.jsonl"), "--root-certificates", str(self.certs.ca_cert), "--auth-key",
                str(self.certs.supernode_key(key or f"d{i}")), "--state-dir", str(self.tmp / f"state{i}")]
        for k, v in flags.items():
            args += [f"--{k.replace('_', '-')}", v]
        args += list(extra)
        return self.cli(*args, log=f"device{i}{key or ''}.log")

    def events(self) -> list[dict]:
        from fedtune.workspace import read_jsonl  # noqa: I001

        return read_jsonl(self.out / "events.jsonl")

    def wait_event(self, pred, timeout: float = 400) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.events():
                if pred(ev):
                    return ev
            time.sleep(0.5)
        raise AssertionError(f"event not seen in {timeout}s; server log:\n"
                             f"{(self.tmp / 'server.log').read_text()[-3000:]}")

    def metrics(self) -> list[dict]:
        from fedtune.workspace import read_jsonl

        return read_jsonl(self.out / "metrics.jsonl")

    def stop_all(self) -> None:
        from fedtune.deploy.processes import stop_tree

        for proc in self.procs:
            stop_tree(proc.pid)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and everything under it at once: a crash, not a shutdown."""
    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


@pytest.fixture
def deployment(tmp_path):
    d = Deployment(tmp_path)
    yield d
    d.stop_all()


def test_tls_auth_rounds_survive_a_server_crash_and_refuse_unknown_keys(deployment):
    d = deployment
    server = d.server()
    rogue = d.device(0, key="rogue")
    assert rogue.wait(120) == 2
    assert "refused this device: its key is not registered" in (d.tmp / "device0rogue.log").read_text()
    devices = [d.device(i) for i in range(3)]
    d.wait_event(lambda e: e["event"] == "round_done" and e["round"] == 1)
    after_one = d.metrics()
    kill_tree(server)  # the server crashes between rounds 1 and 2 (its SuperLink and ServerApp with it)
    assert all(p.poll() is None for p in devices)  # the devices keep running and rejoin
    ckpt = json.loads((d.out / "checkpoint.json").read_text())
    assert ckpt["round"] == 1
    t0 = time.monotonic()
    server = d.server()  # the same command again
    assert server.wait(400) == 0, (d.tmp / "server.log").read_text()[-3000:]
    resumed_seconds = time.monotonic() - t0
    records = d.metrics()
    assert [r["round"] for r in records] == [0, 1, 2]  # nothing lost, nothing recorded twice
    assert records[:2] == after_one
    for r in records[1:]:
        assert r["clients_sampled"] == 3 and r["clients_succeeded"] == 3, r
        assert r["clients_rejected"] == {} and r["clients_declined"] == {}
        assert sorted(c["device"] for c in r["clients"]) == sorted(
            __import__("zlib").crc32(f"dev{i}".encode()) % 2**31 for i in range(3))
    assert 0 < records[1]["epsilon"] < records[2]["epsilon"]
    assert any(e["event"] == "resumed" and e["round"] == 1 for e in d.events())
    for i in range(3):  # each device's ledger holds every training it did, once: round 1, and round 2 once per
        # time it trained it (a warm device can finish round 2 of the crashed server in the moment before the
        # kill; that spent privacy too, and the resumed round 2 trains again)
        ledger = json.loads(next((d.tmp / f"state{i}" / "ledgers").glob("*.json")).read_text())
        trained = [e["round"] for e in d.events() if e["event"] == "client_done" and e["user"] == f"dev{i}"]
        assert ledger["rounds"] == sorted(trained) and ledger["rounds"][0] == 1 and trained.count(1) == 1
        assert 1 <= trained.count(2) <= 2
        assert sum(steps for _, _, steps in ledger["history"]) == 3 * len(trained)  # 3 local steps each
    final = json.loads((d.out / "checkpoint.json").read_text())
    assert final["round"] == 2 and final["adapter_sha256"] and final["strategy"]["aggregator"] == "fedavg"
    print(f"\nFIGURE resumed run (restart -> round 2 done): {resumed_seconds:.0f}s; "
          f"epsilon {records[1]['epsilon']:.3f} -> {records[2]['epsilon']:.3f}; "
          f"eval_loss {[round(r['eval_loss'], 4) for r in records]}")


def test_a_supernode_killed_mid_round_leaves_the_round_to_the_others(deployment):
    d = deployment
    server = d.server("--set", "federation.round_timeout_s=150", "--set", "federation.rounds=2")
    devices = [d.device(i) for i in range(3)]
    d.wait_event(lambda e: e["event"] == "round_start" and e["round"] == 1)
    time.sleep(3)  # the devices are training
    t_kill = time.monotonic()
    kill_tree(devices[2])
    assert server.wait(600) == 0, (d.tmp / "server.log").read_text()[-3000:]
    records = d.metrics()
    assert [r["round"] for r in records] == [0, 1, 2]
    r1 = records[1]
    assert r1["clients_sampled"] == 3 and r1["clients_succeeded"] == 2 and not r1["round_skipped"]
    assert records[2]["clients_succeeded"] == 2 and not records[2]["round_skipped"]
    before = {k: v.clone() for k, v in _adapter(d.out, 0).items()}
    assert any(not torch.equal(before[k], v) for k, v in _adapter(d.out, 1).items())  # round 1 did aggregate
    print(f"\nFIGURE killed SuperNode: round 1 wall {r1['wall_seconds']:.0f}s with "
          f"{r1['clients_succeeded']}/3 replies, failed={r1['clients_failed']}; round 2 sampled "
          f"{records[2]['clients_sampled']}; {time.monotonic() - t_kill:.0f}s from kill to end")


def test_secure_aggregation_runs_over_a_tls_deployment(deployment):
    """SecAgg+ through `fedtune server start` and three real `fedtune device join` SuperNodes (TLS + node
    authentication): the four stages travel as Flower messages to each device's warm ClientApp, its keys and
    shares stay in its run context between stages, the server sums masked vectors only."""
    d = deployment
    server = d.server("--set", "privacy.secure_aggregation.enabled=true", "--set", "federation.rounds=1")
    [d.device(i) for i in range(3)]
    assert server.wait(600) == 0, (d.tmp / "server.log").read_text()[-3000:]
    records = d.metrics()
    assert [r["round"] for r in records] == [0, 1]
    r1 = records[1]
    assert r1["clients_sampled"] == 3 and r1["clients_succeeded"] == 3 and not r1["round_skipped"], r1
    assert r1["secure_aggregation"] is True and not r1.get("secagg_reason"), r1
    before = _adapter(d.out, 0)
    assert any(not torch.equal(before[k], v) for k, v in _adapter(d.out, 1).items())  # the sum was applied
    guarantee = json.loads((d.out / "adapters" / "round-1" / "fedtune.json").read_text())
    assert "secure_aggregation" in json.dumps(guarantee)
    print(f"\nFIGURE deployed SecAgg+ round (3 devices, TLS + node auth, loopback): round wall "
          f"{r1['wall_seconds']:.1f}s, upload {r1['upload_bytes']} B")


def _adapter(out: Path, r: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "adapters" / f"round-{r}" / "adapter_model.safetensors"))


def client_done(d: Deployment, state: Path) -> list[dict]:
    """The device's ``client_done`` events: in the run directory when the device can read the server's
    config-path (loopback, one file system), else in its own state dir."""
    from fedtune.workspace import read_jsonl

    own = [e for p in sorted(state.glob("runs/*/events.jsonl")) for e in read_jsonl(p)]
    return [e for e in d.events() + own if e["event"] == "client_done"]


def run_one_device(d: Deployment, rounds: int, *device_flags: str) -> tuple[list[dict], list[dict]]:
    """A server with one device for ``rounds`` rounds (TLS + node auth); the server's records and the
    device's client_done events."""
    server = d.server("--set", f"federation.rounds={rounds}", "--set", "federation.clients_per_round=1",
                      "--set", "federation.min_clients=1")
    d.device(0, extra=device_flags)
    assert server.wait(600) == 0, (d.tmp / "server.log").read_text()[-3000:]
    return d.metrics(), client_done(d, d.tmp / "state0")


def test_a_warm_device_loads_its_model_once_in_three_rounds(deployment):
    d = deployment
    records, done = run_one_device(d, 3)
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert all(r["clients_succeeded"] == 1 for r in records[1:]), records
    assert [e["round"] for e in done] == [1, 2, 3]
    assert len({e["pid"] for e in done}) == 1  # one ClientApp process served every round
    assert [e["model_loads"] for e in done] == [1, 1, 1]  # ... and loaded the base model once
    assert "tasks run by this process: 3" in (d.tmp / "state0" / "clientapp.log").read_text()
    print(f"\nFIGURE warm device round wall seconds: {[round(r['wall_seconds'], 1) for r in records[1:]]}")
