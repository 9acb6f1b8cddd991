"""DP overhead and framework overhead on a shared CPU: configurations interleaved, step by step.

On a machine whose load changes from minute to minute (other jobs), timing one configuration after
another measures the load as much as the code. Here every configuration is built first, then each
repetition runs every configuration once, in turn, so load drifts fall on all of them alike; ratios are
taken per repetition (same moment) and their median reported.

    python bench/interleaved.py --shape smollm2 --quant nf4 --seq 64 --steps 1 --repeats 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from client_step import SHAPES, bare_train
from fedtune.adapters import create_adapter, get_adapter_state
from fedtune.config import config_from_dict
from fedtune.models.loader import load_base_model
from fedtune.privacy import PrivacyLedger
from fedtune.training import train_local
from fedtune.types import ClientData, ClientTask

CONFIGS = [("fedtune", False), ("fedtune", True), ("bare", False), ("bare", True)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    p.add_argument("--quant", default="nf4")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--loss-chunk", type=int, default=0, help="fedtune's fused loss chunk (0: the model's own loss)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    vocab = SHAPES[args.shape]["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    data = ClientData("bench", torch.randint(0, vocab, (args.batch * 16, args.seq), generator=gen),
                      torch.randint(0, vocab, (4, args.seq), generator=gen))
    setups = {}
    for impl, dp in CONFIGS:
        cfg = config_from_dict({
            "model": {"source": "tiny", "quantization": args.quant, "tiny": SHAPES[args.shape]},
            "adapter": {"method": "lora", "rank": args.rank, "alpha": 2 * args.rank,
                        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "privacy": {"enabled": dp, "noise_multiplier": 1.0, "max_grad_norm": 1.0},
        })
        model = create_adapter(load_base_model(cfg.model)[0], cfg.adapter, seed=0)
        setups[(impl, dp)] = (cfg, model, get_adapter_state(model))
    times = {c: [] for c in CONFIGS}
    for rep in range(args.repeats + 1):
        for impl, dp in CONFIGS:
            cfg, model, state = setups[(impl, dp)]
            t = time.perf_counter()
            if impl == "bare":
                bare_train(model, data.train, args.steps, args.batch, 1e-3, dp, seed=rep)
            else:
                task = ClientTask(rep + 1, args.steps, args.batch, 1e-3, seed=rep)
                train_local(model, state, data, task, cfg.privacy, PrivacyLedger("b") if dp else None,
                            loss_chunk_tokens=args.loss_chunk or None)
            if rep > 0:  # the first repetition warms up
                times[(impl, dp)].append((time.perf_counter() - t) / args.steps)
    med = {f"{impl}_{'dp' if dp else 'nodp'}": round(statistics.median(v), 4) for (impl, dp), v in times.items()}
    per_rep = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))  # noqa: E731
    out = {
        "args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "step_s_median": med, "step_s_all": {f"{i}_{'dp' if d else 'nodp'}": v for (i, d), v in times.items()},
        "dp_overhead_fedtune": round(per_rep(("fedtune", True), ("fedtune", False)), 3),
        "dp_overhead_bare": round(per_rep(("bare", True), ("bare", False)), 3),
        "framework_overhead_nodp": round(per_rep(("fedtune", False), ("bare", False)) - 1, 3),
        "framework_overhead_dp": round(per_rep(("fedtune", True), ("bare", True)) - 1, 3),
    }
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
