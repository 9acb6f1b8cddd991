"""Simulation throughput: client updates per minute, fedtune's ClientApp vs a FlowerTune-style one.

Both run through Flower's simulation engine (Ray) with fedtune's ServerApp, on the same workload
(same model, data, cohorts, steps, fp32 uploads, DP off since FlowerTune has none), one after the other
in one process. fedtune's ClientApp takes the base model from the worker's cache; the baseline
(``bench/flowertune_client.py``) loads and quantizes it in every train call, as FlowerTune does.
Throughput = client updates / the rounds' wall seconds (each round: sampling, training, aggregation
and the server's evaluation, the same for both).

    python bench/sim_throughput.py --shape smollm2 --rounds 3 --json docs/results/sim_throughput.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from client_step import SHAPES
from simulate import simulate


def workload(shape: str, rounds: int, steps: int, concurrency: int) -> dict:
    return {
        "name": f"throughput-{shape}", "seed": 0,
        "model": {"source": "tiny", "quantization": "nf4", "tiny": SHAPES[shape]},
        "adapter": {"method": "lora", "rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "data": {"source": "synthetic", "synthetic_users": 4, "synthetic_docs_per_user": 12, "seq_len": 64},
        "train": {"local_steps": steps, "batch_size": 4, "lr": 0.01, "eval_max_chunks": 8,
                  "eval_batch_size": 8},
        "privacy": {"enabled": False},
        "federation": {"rounds": rounds, "clients_per_round": 4, "min_clients": 2, "upload": "fp32"},
        "simulation": {"num_cpus_per_client": 1, "max_concurrent_clients": concurrency},
    }


def summary(name: str, res: dict) -> dict:
    rounds = [r for r in res["records"] if r["round"] > 0]
    updates = sum(r["clients_succeeded"] for r in rounds)
    seconds = sum(r["wall_seconds"] for r in rounds)
    return {"client_app": name, "rounds": len(rounds), "client_updates": updates,
            "round_seconds": round(seconds, 2), "updates_per_min": round(60 * updates / seconds, 2),
            "end_to_end_seconds": round(res["seconds"], 1),
            "per_round_seconds": [r["wall_seconds"] for r in rounds],
            # round 1 also starts the engine's actors (and imports torch in them): steady state is rounds 2+
            "steady_updates_per_min": round(60 * sum(r["clients_succeeded"] for r in rounds[1:])
                                            / sum(r["wall_seconds"] for r in rounds[1:]), 2) if len(rounds) > 1 else None,
            "final_eval_perplexity": rounds[-1]["eval_perplexity"] if rounds else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    raw = workload(args.shape, args.rounds, args.steps, args.concurrency)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, app in [("fedtune", None), ("flowertune-style", "flowertune_client:app")]:
            s = summary(name, simulate(raw, Path(tmp) / name, app))
            print(json.dumps(s), flush=True)
            out.append(s)
    ratio = round(out[0]["updates_per_min"] / out[1]["updates_per_min"], 3)
    steady = (round(out[0]["steady_updates_per_min"] / out[1]["steady_updates_per_min"], 3)
              if out[0]["steady_updates_per_min"] else None)
    result = {"workload": raw, "results": out, "fedtune_over_flowertune": ratio,
              "fedtune_over_flowertune_steady": steady}
    print(f"\n{'client app':>18} {'updates':>8} {'round s':>8} {'updates/min':>12} {'rounds 2+':>10}")
    for s in out:
        print(f"{s['client_app']:>18} {s['client_updates']:>8} {s['round_seconds']:>8} {s['updates_per_min']:>12} "
              f"{s['steady_updates_per_min']!s:>10}")
    print(f"fedtune / flowertune-style throughput: {ratio}x (all rounds), {steady}x (rounds 2+)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
