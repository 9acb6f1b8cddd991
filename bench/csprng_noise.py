"""What secret DP noise costs: one step's flat noise from the AES-256-CTR CSPRNG vs ``torch.normal``.

A deployed device draws each DP-SGD step's noise as one flat vector (``fedtune.privacy.noise``) from its
``AesCtrStream`` (``fedtune.privacy.csprng``: AES-256-CTR keystream, Box-Muller in float64, cast to float32);
a simulation draws it with ``torch.normal`` from a seeded generator. Both are timed here side by side, in one
process, for LoRA-sized vectors: 921,600 values (SmolLM2-135M, LoRA r=8 on q/k/v/o, fedtune's default
adapter), 1M and 10M. Also the Poisson sampler's uniforms (one per training example per step). The figure is
the median of ``--repeats`` draws (the machine is shared), at the torch thread count given.

    python bench/csprng_noise.py --threads 1 --json docs/results/csprng_noise.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from fedtune.privacy.csprng import AesCtrStream


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(sizes: list[int], repeats: int) -> list[dict]:
    stream, gen = AesCtrStream(os.urandom(32)), torch.Generator().manual_seed(0)
    rows = []
    for n in sizes:
        torch_s = _median_seconds(lambda: torch.normal(0.0, 1.0, size=(n,), generator=gen, dtype=torch.float32),
                                  repeats)
        aes_s = _median_seconds(lambda: stream.normal(1.0, n, "cpu", torch.float32), repeats)
        keystream_s = _median_seconds(lambda: stream.bytes(16 * ((n + 1) // 2)), repeats)
        rows.append({"values": n, "torch_normal_ms": 1e3 * torch_s, "csprng_normal_ms": 1e3 * aes_s,
                     "ratio": aes_s / torch_s, "aes_keystream_ms": 1e3 * keystream_s,
                     "csprng_ns_per_value": 1e9 * aes_s / n})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[921_600, 1_000_000, 10_000_000])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = measure(args.sizes, args.repeats)
    uniform = AesCtrStream(os.urandom(32))
    u_ms = 1e3 * _median_seconds(lambda: uniform.uniform(10_000), args.repeats)
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared)",
              "torch": torch.__version__, "threads": args.threads, "repeats": args.repeats, "rows": rows,
              "poisson_uniforms_10k_ms": u_ms}
    print(f"torch threads {args.threads}; median of {args.repeats}")
    print(f"{'values':>11} {'torch.normal':>13} {'CSPRNG':>9} {'ratio':>6} {'AES keystream':>14}")
    for r in rows:
        print(f"{r['values']:>11,} {r['torch_normal_ms']:>10.1f} ms {r['csprng_normal_ms']:>6.1f} ms "
              f"{r['ratio']:>5.1f}x {r['aes_keystream_ms']:>11.1f} ms")
    print(f"Poisson sampling, 10,000 examples per step: {u_ms:.3f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
