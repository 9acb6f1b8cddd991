"""The GEMM floor of the CPU-vs-pfl workload's device step on this machine: how fast could any framework go?

The workload of ``bench/cpu_vs_pfl.py`` (SmolLM2-135M fp32, LoRA r=8 on q, v, 4 x 128 tokens) fixes the
step's matrix products: every layer's forward projections and, because every layer carries LoRA, every
layer's input-gradient products in the backward (the frozen weights need no weight gradient), plus the tied
LM head forward and backward. This times exactly those products with random data in fp32, nothing else
(no attention, norms, activations, softmax, optimizer or framework), so its figure is a floor no
implementation of the same fp32 step can beat on this CPU. Settings, each for ``--reps`` steps:

* ``1 device, 1 thread``: one GEMM stream on one torch thread;
* ``2 devices, 1 thread each``: two streams side by side in two Python threads (``concurrent_devices: 2``);
  reported per device-step of wall time (wall / 2);
* ``1 device, 2 threads``: one stream on 2 intra-op threads (how pfl-research and a plain loop run);
* ``... fused``: q, k, v as one product and gate, up as one (what a fused-projection model would run).

The LoRA factors' products (rank 8) are under 1% of these FLOPs and are left out.

    flock /tmp/fedtune-heavy.lock python bench/cpu_gemm_bound.py --json docs/results/cpu_gemm_bound.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time

import torch

# SmolLM2-135M (its config.json): hidden 576, MLP 1536, 9 query heads and 3 key/value heads of 64, 30 layers,
# vocabulary 49152 (the LM head is the tied embedding)
HIDDEN, MLP, KV, LAYERS, VOCAB = 576, 1536, 3 * 64, 30, 49152
TOKENS = 4 * 128
SEPARATE = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, MLP), (HIDDEN, MLP), (MLP, HIDDEN)]
FUSED = [(HIDDEN, HIDDEN + 2 * KV), (HIDDEN, HIDDEN), (HIDDEN, 2 * MLP), (MLP, HIDDEN)]


def _products(layer: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(in, out) of every product of one device step: forward and input-gradient backward of each layer,
    then the head's forward and input gradient."""
    body = layer + [(n, k) for k, n in layer]
    return body * LAYERS + [(HIDDEN, VOCAB), (VOCAB, HIDDEN)]


def _stream(products: list[tuple[int, int]], reps: int, threads: int, ready: threading.Barrier) -> None:
    torch.set_num_threads(threads)  # OpenMP's thread count is each thread's own: set it where the work runs
    ops = [(torch.randn(TOKENS, k), torch.randn(n, k)) for k, n in products]
    for x, w in ops[:8]:  # warm-up
        torch.nn.functional.linear(x, w)
    ready.wait()  # every stream's tensors are allocated: the timing starts together
    for _ in range(reps):
        for x, w in ops:
            torch.nn.functional.linear(x, w)


def measure(layer: list[tuple[int, int]], devices: int, threads: int, reps: int) -> float:
    """Seconds of GEMM per device-step of wall time (allocation and warm-up not timed)."""
    torch.set_num_threads(threads)
    ready = threading.Barrier(devices + 1)
    workers = [threading.Thread(target=_stream, args=(_products(layer), reps, threads, ready)) for _ in range(devices)]
    for w in workers:
        w.start()
    ready.wait()
    t = time.perf_counter()
    for w in workers:
        w.join()
    return (time.perf_counter() - t) / reps / devices


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    flops = sum(2 * TOKENS * k * n for k, n in _products(SEPARATE))
    rows = []
    for name, layer, devices, threads in [("1 device, 1 thread", SEPARATE, 1, 1),
                                          ("2 devices, 1 thread each", SEPARATE, 2, 1),
                                          ("1 device, 2 threads", SEPARATE, 1, 2),
                                          ("1 device, 1 thread, fused", FUSED, 1, 1),
                                          ("2 devices, 1 thread each, fused", FUSED, 2, 1)]:
        s = measure(layer, devices, threads, args.reps)
        rows.append({"setting": name, "gemm_s_per_device_step": round(s, 3),
                     "gflops_per_s": round(flops / s / 1e9, 1)})
        print(f"{name:34s} {s:6.3f} s a device-step of wall   {flops / s / 1e9:6.1f} GFLOP/s")
    res = {"machine": {"node": platform.node(), "cpus": os.cpu_count(), "processor": platform.processor()},
           "torch": torch.__version__, "gflop_per_step": round(flops / 1e9, 1), "reps": args.reps,
           "load_avg": [round(x, 2) for x in os.getloadavg()], "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
