"""One Flower-simulation round with and without secure aggregation, side by side on one machine.

`fedtune simulate` (Flower's simulation engine, Ray) trains a tiny model (1 layer, hidden 32, LoRA r=2) on
``--devices`` synthetic users for one round, fp32 upload, once plain and once with
``privacy.secure_aggregation`` (16-bit levels, SecAgg: every device neighbours every other). Reported per run:
the command's wall time, the round's wall time (metrics.jsonl), and the bytes each device uploads in the
round (plain: the adapter payload; secure: every stage's reply, from the protocol's own message sizes).

    python bench/secagg_flower_cost.py --devices 5 --json docs/results/secagg_flower_cost.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"data": {"source": "synthetic", "synthetic_docs_per_user": 3, "seq_len": 16},
          "train": {"local_steps": 1, "batch_size": 2, "eval_max_chunks": 2, "lr": 0.05},
          "federation": {"rounds": 1, "min_clients": 2, "upload": "fp32"},
          "model": {"source": "tiny", "quantization": "none",
                    "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "num_key_value_heads": 2}},
          "adapter": {"rank": 2, "alpha": 4}, "privacy": {"enabled": False},
          "simulation": {"num_cpus_per_client": 1, "max_concurrent_clients": 2}}


def one(devices: int, secure: bool, tmp: Path) -> dict:
    from fedtune.config import config_from_dict, dump_config

    raw = json.loads(json.dumps(CONFIG))
    raw["data"]["synthetic_users"] = raw["federation"]["clients_per_round"] = devices
    raw["privacy"]["secure_aggregation"] = {"enabled": secure}
    name = "secure" if secure else "plain"
    path, out = tmp / f"{name}.yaml", tmp / name
    dump_config(config_from_dict(raw), path)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fedtune.cli", "simulate", str(path), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {"secure": secure, "devices": devices, "command_seconds": round(seconds, 1),
            "round_wall_seconds": last["wall_seconds"], "upload_bytes_per_device": last["upload_bytes"] / devices,
            "aggregation": last["aggregation"], "secagg_survivors": last.get("secagg_survivors")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [one(args.devices, s, Path(tmp)) for s in (False, True)]
    result = {"machine": f"{platform.node()} ({platform.processor() or platform.machine()}), CPU", "rows": rows}
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
