"""Ghost clipping against per-sample gradients: one DP-SGD step of a LoRA model, four ways, side by side.

- ``bare-hooks``: a bare peft + opacus loop, ``grad_sample_mode="hooks"`` (per-sample gradients materialized);
- ``bare-ghost``: the same loop with opacus' own fast gradient clipping (``grad_sample_mode="ghost"``:
  norms from activations, then a second backward pass with the clipping weights);
- ``fedtune-hooks``: ``train_local`` with ``privacy.clipping=hooks`` (opacus hooks + fedtune's flat noise);
- ``fedtune-ghost``: ``train_local`` with ``privacy.clipping=ghost`` (``fedtune.privacy.ghost``: norms and the
  clipped sum from LoRA activations and output gradients in the one backward pass).

Timing: one model per batch shape shared by the four (each path attaches and removes its hooks per call);
each repetition runs every path once, in turn, so load drifts on a shared machine fall on all alike; the
first repetition (``--warmup``) warms up; medians of step time and of per-repetition ratios against bare-hooks.
Memory: each (shape, path) runs again in a fresh subprocess for one call; peak RSS during the call (the
kernel's high-water mark, reset after the model is built) and its rise over the RSS before the call.

    python bench/ghost_clipping.py --shapes 4x128,8x512 --steps 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import gc
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from fedtune.adapters import create_adapter, get_adapter_state  # noqa: E402
from fedtune.config import config_from_dict  # noqa: E402
from fedtune.models.loader import load_base_model  # noqa: E402
from fedtune.privacy import PrivacyLedger  # noqa: E402
from fedtune.training import train_local  # noqa: E402
from fedtune.training.memory import release_freed_heap  # noqa: E402
from fedtune.types import ClientData, ClientTask  # noqa: E402

from bare_loop import bare_train  # noqa: E402
from client_step import SHAPES  # noqa: E402

IMPLS = ("bare-hooks", "bare-ghost", "fedtune-hooks", "fedtune-ghost")


def _shape(args) -> dict:
    shape = dict(SHAPES[args.shape])
    if args.layers:  # fewer decoder layers of the same width: long sequences within a CPU time budget
        shape["num_hidden_layers"] = args.layers
    return shape


def _setup(args, batch: int, seq: int):
    cfg = config_from_dict({
        "model": {"source": "tiny", "quantization": "none", "tiny": _shape(args)},
        "adapter": {"method": "lora", "rank": args.rank, "alpha": 2 * args.rank, "target_modules": args.targets},
        "privacy": {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0},
    })
    model = create_adapter(load_base_model(cfg.model)[0], cfg.adapter, seed=0)
    gen = torch.Generator().manual_seed(0)
    vocab = SHAPES[args.shape]["vocab_size"]
    data = ClientData("bench", torch.randint(0, vocab, (batch * 16, seq), generator=gen),
                      torch.randint(0, vocab, (2, seq), generator=gen))
    return cfg, model, get_adapter_state(model), data


def _call(impl: str, cfg, model, state, data, batch: int, steps: int, seed: int) -> None:
    if impl.startswith("bare"):
        bare_train(model, data.train, steps, batch, 1e-3, True, seed=seed, ghost=impl == "bare-ghost")
        return
    privacy = cfg.privacy.model_copy(update={"clipping": impl.removeprefix("fedtune-")})
    train_local(model, state, data, ClientTask(seed + 1, steps, batch, 1e-3, seed=seed), privacy, PrivacyLedger("b"))


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def memory_one(args, impl: str, batch: int, seq: int) -> dict:
    """In a fresh process: peak RSS during one call of ``impl`` (one step), the model already built.

    Building the model peaks higher than its resting size, so the kernel's high-water mark (VmHWM) is reset
    after the build (``/proc/self/clear_refs`` = 5) and read after the call."""
    cfg, model, state, data = _setup(args, batch, seq)
    gc.collect()
    release_freed_heap()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_mib("VmRSS")
    _call(impl, cfg, model, state, data, batch, 1, seed=0)
    peak = _status_mib("VmHWM")
    return {"impl": impl, "peak_rss_mib": round(peak, 1), "step_rise_mib": round(peak - before, 1)}


def time_shape(args, batch: int, seq: int) -> dict:
    cfg, model, state, data = _setup(args, batch, seq)
    times: dict[str, list[float]] = {i: [] for i in args.impls}
    for rep in range(args.repeats + args.warmup):
        for impl in args.impls:
            t = time.perf_counter()
            _call(impl, cfg, model, state, data, batch, args.steps, seed=rep)
            if rep >= args.warmup:
                times[impl].append((time.perf_counter() - t) / args.steps)
                # printed as it comes: a timeout keeps what was measured
                print(json.dumps({"batch": batch, "seq": seq, "rep": rep, "impl": impl,
                                  "step_s": round(times[impl][-1], 3)}), flush=True)
    ref = "bare-hooks"
    out = {"batch": batch, "seq": seq, "step_s_median": {i: round(statistics.median(v), 3) for i, v in times.items()},
           "step_s_all": {i: [round(x, 3) for x in v] for i, v in times.items()}}
    if ref in times:
        out["vs_bare_hooks"] = {i: round(statistics.median(a / b for a, b in zip(v, times[ref])), 3)
                                for i, v in times.items()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    p.add_argument("--shapes", default="4x128,8x512", help="batch x sequence length, comma-separated")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--layers", type=int, default=0, help="override the shape's decoder layer count (0: keep)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions first (0: time every one)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--memory-one", default=None, help=argparse.SUPPRESS)  # impl:BxT, run in a subprocess
    p.add_argument("--json", default=None)
    args = p.parse_args()
    args.targets = args.targets.split(",")
    args.impls = args.impls.split(",")
    if unknown := set(args.impls) - set(IMPLS):
        raise SystemExit(f"--impls: expected some of {','.join(IMPLS)}, got {sorted(unknown)}")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.memory_one:
        impl, shape = args.memory_one.split(":")
        b, t = (int(v) for v in shape.split("x"))
        print(json.dumps(memory_one(args, impl, b, t)))
        return
    results = {"args": {k: v for k, v in vars(args).items() if k != "memory_one"}, "torch": torch.__version__,
               "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "shapes": []}
    for b, t in shapes:
        row = time_shape(args, b, t)
        if not args.no_memory:
            row["memory"] = {}
            for impl in args.impls:
                cmd = [sys.executable, __file__, "--shape", args.shape, "--layers", str(args.layers),
                       "--rank", str(args.rank), "--targets",
                       ",".join(args.targets), "--memory-one", f"{impl}:{b}x{t}"]
                line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
                row["memory"][impl] = json.loads(line)
                print(json.dumps({"batch": b, "seq": t, "memory": row["memory"][impl]}), flush=True)
        results["shapes"].append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
