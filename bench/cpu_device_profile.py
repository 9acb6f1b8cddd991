"""Where a CPU device call's time goes: one fedtune ``train_local`` call on ``bench/cpu_vs_pfl.py``'s workload
(SmolLM2-135M fp32, LoRA r=8 on q, v, batch 4 x 128, no DP) under torch.profiler, one torch thread (what
each of the simulation's 1-CPU ClientApp actors runs with); the table of ops by self CPU time.

    python bench/cpu_device_profile.py --steps 2 > docs/results/cpu_device_call_profile.txt
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import cpu_vs_pfl as b
    from fedtune.adapters import create_adapter, get_adapter_state
    from fedtune.models import load_base_model
    from fedtune.training import train_local
    from fedtune.types import ClientTask

    cfg, clients, _ = b._data_and_model_dir(b.workload(1))
    model = create_adapter(load_base_model(cfg.model)[0], cfg.adapter, cfg.seed)
    state = get_adapter_state(model)
    chunk = cfg.train.loss_chunk_tokens
    train_local(model, state, clients[0], ClientTask(1, 1, b.BATCH, b.LR, seed=0), cfg.privacy, None,
                loss_chunk_tokens=chunk)  # warm-up
    t = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train_local(model, state, clients[1], ClientTask(1, args.steps, b.BATCH, b.LR, seed=1), cfg.privacy, None,
                    loss_chunk_tokens=chunk)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.2f}, "
          f"{args.threads} thread(s): {args.steps} steps took {time.perf_counter() - t:.2f} s (profiled)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=16))


if __name__ == "__main__":
    main()
