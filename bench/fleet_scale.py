"""Fleet-scale benchmark: memory and time per round against population and cohort size.

Runs ``fedtune simulate`` on a fleet config for each (population, cohort) pair, one after the other,
and samples the resident memory of everything the run starts (the CLI, the detached Flower
SuperLink, the simulation process and its Ray workers) twice a second. Prints one JSON object per
pair and a table.

    python bench/fleet_scale.py --config configs/fleet-10k.yaml --pairs 1000x50,10000x50,10000x100 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def tree_rss(roots: list[psutil.Process]) -> int:
    seen, total = set(), 0
    for root in roots:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            if p.pid in seen:
                continue
            seen.add(p.pid)
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
    return total


def run_one(config: str, population: int, cohort: int, rounds: int, workdir: Path) -> dict:
    out = workdir / f"run-{population}x{cohort}"
    cmd = [sys.executable, "-m", "fedtune.cli", "simulate", config, "--out", str(out),
           "--set", f"fleet.population={population}", "--set", f"data.synthetic_users={population}",
           "--set", f"federation.clients_per_round={cohort}", "--set", f"federation.rounds={rounds}"]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cli = psutil.Process(proc.pid)
    peak, marker = 0, str(out / "flower" / "home")
    while proc.poll() is None:
        # the SuperLink is detached (its own session): find it by its --database path under our run
        link = [p for p in psutil.process_iter(["cmdline"])
                if p.info["cmdline"] and any(marker in part for part in p.info["cmdline"])]
        peak = max(peak, tree_rss([cli, *link]))
        time.sleep(0.5)
    seconds = time.monotonic() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] if proc.returncode == 0 else []
    rounds_wall = [r["wall_seconds"] for r in records if r["round"] > 0]
    return {"population": population, "cohort": cohort, "rounds": rounds, "returncode": proc.returncode,
            "peak_rss_mib": round(peak / 2**20), "total_seconds": round(seconds, 1),
            "round_wall_seconds": rounds_wall,
            "median_round_seconds": sorted(rounds_wall)[len(rounds_wall) // 2] if rounds_wall else None,
            "sim_round_seconds": [r.get("sim_round_seconds") for r in records if r["round"] > 0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/fleet-10k.yaml")
    p.add_argument("--pairs", default="1000x50,10000x50,10000x100")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    os.environ.setdefault("FEDTUNE_CACHE", str(Path(tempfile.gettempdir()) / "fedtune-bench-cache"))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in args.pairs.split(","):
            population, cohort = (int(x) for x in pair.split("x"))
            r = run_one(args.config, population, cohort, args.rounds, Path(tmp))
            print(json.dumps(r), flush=True)
            results.append(r)
    print(f"\n{'population':>10} {'cohort':>6} {'peak RSS MiB':>12} {'median round s':>14} {'total s':>8}")
    for r in results:
        print(f"{r['population']:>10} {r['cohort']:>6} {r['peak_rss_mib']:>12} {str(r['median_round_seconds']):>14} "
              f"{r['total_seconds']:>8}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
