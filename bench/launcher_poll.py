"""CPU the launcher spends following a simulation: one `flwr ls` a second (old) vs the `flwr log` stream.

Runs the same small simulation (``configs/smoke.yaml`` unless ``--config``) with the status read every
second (what the launcher did before: ``status_seconds=1``) and with the default (the status read when the
log stream ends, plus one safety query a minute), alternating, and reports per run: wall seconds, the
number of `flwr ls` processes spawned, their CPU seconds, and the load average when the run started.

    flock /tmp/fedtune-heavy.lock python bench/launcher_poll.py --repeats 2 --json docs/results/launcher_poll.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)


def one(config: Path, status_seconds: float, out: Path) -> dict:
    from fedtune.config import dump_config, load_config, with_absolute_paths
    from fedtune.data import build_client_data, save_client_data
    from fedtune.flower.simulation import run_simulation
    from fedtune.models import load_encoder, resolve_model_dir
    from fedtune.workspace import RunDir

    os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
    cfg = with_absolute_paths(load_config(config))
    run = RunDir.create(out)
    dump_config(cfg, run.config)
    resolve_model_dir(cfg.model)
    clients = build_client_data(cfg.data, load_encoder(cfg.model), cfg.seed)
    save_client_data(clients, run.data)
    load = os.getloadavg()[0]
    t0 = time.monotonic()
    h = run_simulation(cfg, run, len(clients), status_seconds=status_seconds)
    wall = time.monotonic() - t0
    return {"status_seconds": status_seconds, "wall_s": round(wall, 1), "status_calls": h.status_calls,
            "status_cpu_s": round(h.status_cpu_seconds, 2),
            "status_cpu_share_of_a_core": round(h.status_cpu_seconds / wall, 3), "load_avg_1m": load}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path(ROOT) / "configs" / "smoke.yaml")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for mode, secs in (("old: flwr ls every 1 s", 1.0), ("new: log stream", 60.0)):
                r = {"mode": mode, "repeat": rep, **one(args.config, secs, Path(tmp) / f"{rep}-{secs}")}
                print(json.dumps(r), flush=True)
                results.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": os.uname().nodename, "cpus": os.cpu_count(),
                                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                               "results": results}, indent=1))


if __name__ == "__main__":
    main()
