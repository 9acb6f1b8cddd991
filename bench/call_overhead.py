"""A device call's fixed costs: ``train_local`` vs the bare peft + opacus loop on a tiny model (CPU).

With a tiny model the step's compute is small, so what is left is per-call machinery: config objects,
adapter load, the privacy ledger and ε, opacus' wrapping. Both sides run 3 DP steps per call on the same
model, alternating, ``--calls`` calls each per round; then one cProfile of fedtune's calls. Run it from two
checkouts (PYTHONPATH) to compare before / after.

    PYTHONPATH=. python bench/call_overhead.py --rounds 3 --calls 10
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bare_loop import bare_train  # noqa: E402
from client_step import SHAPES  # noqa: E402


def main() -> None:
    from fedtune.adapters import create_adapter, get_adapter_state
    from fedtune.config import config_from_dict
    from fedtune.models.loader import load_base_model
    from fedtune.privacy import PrivacyLedger
    from fedtune.training import train_local
    from fedtune.types import ClientData, ClientTask

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--profile-lines", type=int, default=12)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = config_from_dict({
        "model": {"source": "tiny", "quantization": "none", "tiny": SHAPES["tiny"]},
        "adapter": {"method": "lora", "rank": 8, "alpha": 16,
                    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "privacy": {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0},
    })
    model = create_adapter(load_base_model(cfg.model, "cpu")[0], cfg.adapter, seed=0)
    data = ClientData("b", torch.randint(0, 260, (64, 32)), torch.randint(0, 260, (4, 32)))
    state, ledger = get_adapter_state(model), PrivacyLedger("b")

    def fed(i):
        train_local(model, state, data, ClientTask(i + 1, 3, 4, 1e-3, seed=i), cfg.privacy, ledger)

    def bare(i):
        bare_train(model, data.train, 3, 4, 1e-3, True, seed=i)

    fed(0), bare(0)
    per = {"fedtune": [], "bare": []}
    for _ in range(args.rounds):
        for name, f in (("fedtune", fed), ("bare", bare)):
            t = time.perf_counter()
            for i in range(args.calls):
                f(i)
            per[name].append((time.perf_counter() - t) / args.calls)
    prof = cProfile.Profile()
    prof.enable()
    for i in range(args.calls):
        fed(i)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(args.profile_lines)
    res = {"call_s_fedtune": round(statistics.median(per["fedtune"]), 4),
           "call_s_bare": round(statistics.median(per["bare"]), 4),
           "ratio": round(statistics.median(per["fedtune"]) / statistics.median(per["bare"]), 3),
           "all": {k: [round(x, 4) for x in v] for k, v in per.items()}, "load_avg_1m": os.getloadavg()[0]}
    print(json.dumps(res))
    print(out.getvalue())


if __name__ == "__main__":
    main()
