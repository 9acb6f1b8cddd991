"""Round time of a deployed device, warm (one long-lived ClientApp process) vs cold (Flower's fresh
flwr-clientapp process per round), on loopback with TLS + node authentication and the tiny model.

    flock /tmp/fedtune-heavy.lock python bench/device_round_time.py --rounds 3 --json out.json

Each mode: `fedtune server start configs/deploy-smoke.yaml` (1 device per round) and one `fedtune device
join`; the figures are the server's per-round wall seconds (metrics.jsonl) and, from the device's own events,
the ClientApp's process ids and how many times it loaded the base model.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_mode(tmp: Path, warm: bool, rounds: int) -> dict:
    from fedtune.config import load_config
    from fedtune.data.sources import load_user_texts
    from fedtune.deploy.certs import make_ca_and_server, make_supernode_key
    from fedtune.deploy.processes import stop_tree
    from fedtune.workspace import read_jsonl

    certs = make_ca_and_server(tmp / "certs")
    (tmp / "authorized").mkdir()
    _, pub = make_supernode_key(tmp / "certs", "d0")
    (tmp / "authorized" / pub.name).write_bytes(pub.read_bytes())
    cfg = load_config(ROOT / "configs/deploy-smoke.yaml")
    docs = next(iter(load_user_texts(cfg.data, seed=1).values()))
    (tmp / "dev0.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    port, out = _port(), tmp / "run"
    cli = [sys.executable, "-m", "fedtune.cli"]
    procs = []
    try:
        with open(tmp / "server.log", "ab") as log:
            server = subprocess.Popen(cli + ["server", "start", "configs/deploy-smoke.yaml", "--out", str(out),
                                             "--port", str(port), "--certs", str(certs.root), "--authorized-keys",
                                             str(tmp / "authorized"), "--set", f"federation.rounds={rounds}",
                                             "--set", "federation.clients_per_round=1", "--set",
                                             "federation.min_clients=1"],
                                      cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append(server)
        while not any(e["event"] == "deployment_run" for e in read_jsonl(out / "events.jsonl")):
            if server.poll() is not None:
                raise RuntimeError((tmp / "server.log").read_text()[-3000:])
            time.sleep(0.5)
        with open(tmp / "device.log", "ab") as log:
            procs.append(subprocess.Popen(cli + ["device", "join", "--superlink", f"127.0.0.1:{port}", "--data",
                                                 str(tmp / "dev0.jsonl"), "--root-certificates", str(certs.ca_cert),
                                                 "--auth-key", str(certs.supernode_key("d0")), "--state-dir",
                                                 str(tmp / "state"), "--warm" if warm else "--no-warm"],
                                          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        if server.wait(900) != 0:
            raise RuntimeError((tmp / "server.log").read_text()[-3000:])
    finally:
        for p in procs:
            stop_tree(p.pid)
    records = read_jsonl(out / "metrics.jsonl")[1:]
    own = [e for p in sorted((tmp / "state").glob("runs/*/events.jsonl")) for e in read_jsonl(p)]
    done = [e for e in read_jsonl(out / "events.jsonl") + own if e["event"] == "client_done"]
    return {"mode": "warm" if warm else "cold", "round_wall_seconds": [round(r["wall_seconds"], 2) for r in records],
            "train_seconds": [e["seconds"] for e in done], "clientapp_pids": len({e["pid"] for e in done}),
            "model_loads_per_process": [e["model_loads"] for e in done]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    for warm in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(run_mode(Path(tmp), warm, args.rounds))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": os.uname().nodename, "cpus": os.cpu_count(), "rows": rows},
                                        indent=1))


if __name__ == "__main__":
    main()
