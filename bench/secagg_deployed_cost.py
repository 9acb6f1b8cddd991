"""One deployed round on loopback with and without secure aggregation, side by side on one machine.

`fedtune server start` (a SuperLink with TLS and node authentication) and three `fedtune device join`
SuperNodes, each with its warm ClientApp process, on ``configs/deploy-smoke.yaml`` (the tiny model, sample-level
DP, fp16 upload), one round: once plain and once with ``privacy.secure_aggregation`` (its four stages as Flower
messages). Uses the deployment harness of tests/integration/test_deployment.py (certificates, keys, device
data, processes stopped by PID). Reported per run: the round's wall time and upload bytes (metrics.jsonl),
and the command's wall time from start to exit.

    python bench/secagg_deployed_cost.py --json docs/results/secagg_deployed_cost.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def one_round(secure: bool) -> dict:
    from integration.test_deployment import Deployment

    with tempfile.TemporaryDirectory() as tmp:
        d = Deployment(Path(tmp))
        try:
            t0 = time.monotonic()
            extra = ["--set", "federation.rounds=1", "--set",
                     f"privacy.secure_aggregation.enabled={'true' if secure else 'false'}"]
            server = d.server(*extra)
            for i in range(3):
                d.device(i)
            rc = server.wait(900)
            seconds = time.monotonic() - t0
            r1 = d.metrics()[-1]
        finally:
            d.stop_all()
    if rc != 0 or r1["clients_succeeded"] != 3:
        raise SystemExit(f"the {'secure' if secure else 'plain'} run failed: rc {rc}, {r1}")
    return {"secure_aggregation": secure, "round_wall_s": r1["wall_seconds"], "upload_bytes": r1["upload_bytes"],
            "command_wall_s": round(seconds, 1), "clients_succeeded": r1["clients_succeeded"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = [one_round(False), one_round(True)]
    out = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}", "devices": 3,
           "config": "configs/deploy-smoke.yaml, rounds=1", "runs": rows}
    for r in rows:
        print(f"{'SecAgg+' if r['secure_aggregation'] else 'plain  '}: round {r['round_wall_s']:.1f}s, "
              f"upload {r['upload_bytes']} B (3 devices), command {r['command_wall_s']:.0f}s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
