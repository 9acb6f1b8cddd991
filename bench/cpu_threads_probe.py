"""How best to use the 2 vCPUs for one CPU device step (SmolLM2-135M fp32, LoRA r=8 q,v, 4 x 128, AdamW).

Variants, each in its own process (its peak RSS is its own):
  a  one device, 1 torch thread
  b  one device, 2 intra-op threads
  c  two devices side by side in two Python threads, 1 torch thread each, two peft models sharing the
     same frozen base tensors (``fedtune.training.replica``); only adapters and optimizers are separate
  e  c with ``torch.set_num_threads(1)`` called in each device thread too (OpenMP's thread count is per
     thread: c sets it only in the calling thread)
  d  the packed engine (``fedtune.packed.train_packed``), 2 devices in one batch, 2 intra-op threads
A variant may add ``:chunk=N`` (``train.loss_chunk_tokens``), ``:gc=N`` (checkpoint every N-th layer) and
``:compile`` (``nn.Module.compile()`` on each model: inductor; the warm-up call compiles, and its time and
the peak during it are reported apart from the timed call's).

Each variant runs ``train_local`` (the engine's device call) for ``--steps`` steps a device, after one
warm-up call. Reported: seconds a device-step (wall / devices trained / steps) and peak RSS.

    flock /tmp/fedtune-heavy.lock python bench/cpu_threads_probe.py --json docs/results/cpu_threads_probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)


def _setup():
    sys.path.insert(0, BENCH)
    sys.path.insert(0, ROOT)
    import torch

    from cpu_vs_pfl import workload
    from fedtune.adapters import create_adapter, get_adapter_state
    from fedtune.config import config_from_dict
    from fedtune.models import load_base_model
    from fedtune.types import ClientData

    cfg = config_from_dict(workload(1))
    model = create_adapter(load_base_model(cfg.model)[0], cfg.adapter, cfg.seed)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    datas = [ClientData(f"u{i}", torch.randint(0, vocab, (64, 128), generator=gen), torch.zeros(0, 128, dtype=torch.long))
             for i in range(2)]
    return cfg, model, datas, get_adapter_state(model)


def worker(spec: str, steps: int) -> dict:
    """``spec``: a variant letter, then optional ``:chunk=N`` (``loss_chunk_tokens``) and ``:gc=N`` (checkpoint
    every N-th decoder layer)."""
    import torch
    from functools import partial

    variant, *opts = spec.split(":")
    opt = dict(o.split("=") if "=" in o else (o, "1") for o in opts)
    kw = {"loss_chunk_tokens": int(opt.get("chunk", 1024)), "gradient_checkpointing": "gc" in opt,
          "checkpoint_every_n_layers": int(opt.get("gc", 1))}

    from fedtune.types import ClientTask

    cfg, model, datas, start = _setup()
    from fedtune.training.local import train_local as _train_local

    train_local = partial(_train_local, **kw)

    def task(i: int) -> ClientTask:
        return ClientTask(server_round=1, local_steps=steps, batch_size=4, lr=3e-3, seed=i)

    torch.set_num_threads(1 if variant in ("a", "c", "e") else 2)
    if variant in ("a", "b"):
        def call():
            return [train_local(model, start, datas[0], task(0))]
        devices = 1
    elif variant in ("c", "e"):
        from fedtune.training.replica import frozen_sharing_copy

        models = [model, frozen_sharing_copy(model)]
        pool = ThreadPoolExecutor(2, **({"initializer": torch.set_num_threads, "initargs": (1,)} if variant == "e"
                                        else {}))

        def call():
            return list(pool.map(lambda i: train_local(models[i], start, datas[i], task(i)), range(2)))
        devices = 2
    else:
        from fedtune.packed import train_packed

        def call():
            return train_packed(model, [start, start], datas, [task(0), task(1)])
        devices = 2
    if "compile" in opt:
        from fedtune.training.loss import _causal_parts

        for m in (models if variant in ("c", "e") else [model]):  # the module the step calls: with the chunked
            (_causal_parts(m)[0] if "chunk" in opt else m).compile()  # loss, the decoder under the head
    t = time.perf_counter()
    call()  # warm-up (and the compile, with ``:compile``)
    warm, warm_peak = time.perf_counter() - t, _peak_rss_gib()
    with open("/proc/self/clear_refs", "w") as f:  # the timed call's own peak from here
        f.write("5")
    t = time.perf_counter()
    call()
    wall = time.perf_counter() - t
    return {"variant": spec, "threads": torch.get_num_threads(), "devices": devices, "steps": steps,
            "wall_s": round(wall, 2), "s_per_device_step": round(wall / devices / steps, 3),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3),
            "timed_call_peak_rss_gib": _peak_rss_gib(), "warm_up_s": round(warm, 1), "warm_up_peak_rss_gib": warm_peak}


def _peak_rss_gib() -> float:
    """This process's peak RSS since start or the last reset (``VmHWM``; ``/proc/self/clear_refs`` resets it)."""
    from ghost_clipping import _status_mib  # bench/ is on the path (``_setup``)

    return round(_status_mib("VmHWM") / 1024, 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="a,b,c,d")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps)))
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    results = []
    for v in args.variants.split(","):
        load = os.getloadavg()[0]
        if v.startswith("d") and ":" in v:
            sys.exit("the packed variant d takes no options")
        out = subprocess.run([sys.executable, __file__, "--worker", v, "--steps", str(args.steps)], env=env,
                             capture_output=True, text=True, check=True)
        r = {**json.loads(out.stdout.strip().splitlines()[-1]), "load_at_start": round(load, 2)}
        print(json.dumps(r), flush=True)
        results.append(r)
    if args.json:
        report = {"machine": {"node": os.uname().nodename, "cpus": os.cpu_count()},
                  "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
