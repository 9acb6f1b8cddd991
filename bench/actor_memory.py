"""What a ClientApp actor's memory holds: RSS after each phase of a worker's life, per environment.

Each variant runs in a fresh process, as a Ray actor would: import what the ClientApp imports (fedtune,
flwr, opacus), take the base from the worker cache (SmolLM2-135M shape, nf4, random weights: same sizes as
the real model), attach LoRA, then run a few device calls (DP-SGD, 4 x 128). The variants differ only in
the environment: glibc malloc arenas (MALLOC_ARENA_MAX) and torch threads.

    flock /tmp/fedtune-heavy.lock python bench/actor_memory.py --json docs/results/actor_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)

VARIANTS = {
    "default": {},
    "MALLOC_ARENA_MAX=2": {"MALLOC_ARENA_MAX": "2"},
    "MALLOC_ARENA_MAX=2, 1 thread": {"MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"},
    "malloc_trim after load and each call": {"BENCH_MALLOC_TRIM": "1"},
}


def _trim() -> None:
    """glibc's malloc_trim(0): give freed heap pages back to the OS (what RSS counts)."""
    if os.environ.get("BENCH_MALLOC_TRIM"):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss_mib() -> float:
    import psutil

    return round(psutil.Process().memory_info().rss / 2**20, 1)


def child(calls: int, steps: int) -> dict:
    sys.path[:0] = [ROOT, BENCH]
    out = {"start": _rss_mib()}
    import flwr  # noqa: F401  (the ClientApp's imports)
    import opacus  # noqa: F401
    import torch

    from client_step import SHAPES
    from fedtune.adapters import create_adapter, get_adapter_state
    from fedtune.config import config_from_dict
    from fedtune.models.cache import get_base_model
    from fedtune.privacy import PrivacyLedger
    from fedtune.training import train_local
    from fedtune.types import ClientData, ClientTask

    out["imports"] = _rss_mib()
    cfg = config_from_dict({
        "model": {"source": "tiny", "quantization": "nf4", "tiny": SHAPES["smollm2"]},
        "adapter": {"method": "lora", "rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "privacy": {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0},
    })
    model, info = get_base_model(cfg.model, "cpu", build=lambda b: create_adapter(b, cfg.adapter, seed=0),
                                 extra="lora")
    _trim()
    out["model_loaded"] = _rss_mib()
    out["base_mib"] = round(info["base_bytes"] / 2**20, 1)
    gen = torch.Generator().manual_seed(0)
    data = ClientData("u", torch.randint(0, 49152, (64, 128), generator=gen), torch.randint(0, 49152, (4, 128)))
    state, ledger = get_adapter_state(model), PrivacyLedger("u")
    t = time.perf_counter()
    for i in range(calls):
        train_local(model, state, data, ClientTask(i + 1, steps, 4, 1e-3, seed=i), cfg.privacy, ledger)
        _trim()
        out[f"after_call_{i + 1}"] = _rss_mib()
    out["call_s"] = round((time.perf_counter() - t) / calls, 2)
    out["threads"] = torch.get_num_threads()
    import resource

    out["peak"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--only", default=None, help="run only these variants (names separated by ;)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.calls, args.steps)))
        return
    results = []
    for name, env in VARIANTS.items():
        if args.only and name not in args.only.split(";"):
            continue
        load = os.getloadavg()[0]
        proc = subprocess.run([sys.executable, __file__, "--child", "--calls", str(args.calls), "--steps",
                               str(args.steps)], env=dict(os.environ, PYTHONWARNINGS="ignore", **env),
                              capture_output=True, text=True, check=True)
        row = {"variant": name, "load_avg_1m": load, "rss_mib": json.loads(proc.stdout.strip().splitlines()[-1])}
        print(json.dumps(row), flush=True)
        results.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": f"{os.uname().nodename}, {os.cpu_count()} CPUs",
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
