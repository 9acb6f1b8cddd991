"""What secure aggregation costs per round: extra bytes and seconds, for 10, 50 and 100 devices.

The in-process SecAgg+ driver (``fedtune.privacy.secagg``) runs all four stages for a cohort whose every
device holds the default adapter's update (SmolLM2-135M, LoRA r=8 on q/k/v/o: 921,600 values), quantized
to 8-bit levels with the clip bound as range, with 10% of the cohort dropping out after sharing keys (the
costly case for the server: it must rebuild their pairwise masks). Two graphs: SecAgg (every device
neighbours every other) and SecAgg+ (k = 2 ceil(log2 n) neighbours on a ring). Bytes are message sizes
(ids, raw keys, ciphertexts, ring elements); seconds are CPU time in this one process, per device (mean
over devices) and for the server, the fastest of ``--repeats`` runs (the machine is shared). The baseline is
the plain fp16 upload of the same update (2 bytes per value).

    python bench/secagg_cost.py --json docs/results/secagg_cost.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import numpy as np

from fedtune.privacy.secagg import Dropouts, make_setup, run_secure_aggregation

VALUES = 921_600  # the default config's LoRA adapter (README: 1.84 MB in fp16)


def one(n: int, k: int | None, values: int, drop_fraction: float) -> dict:
    rng = np.random.default_rng(n)
    ids = list(range(1, n + 1))
    updates = {c: rng.normal(0, 1e-3, values) for c in ids}
    setup = make_setup(ids, values, clip_range=0.5, num_neighbours=k, context=f"bench/{n}".encode())
    step = max(1, round(1 / drop_fraction)) if drop_fraction else 1
    dropped = frozenset(ids[::step][: int(drop_fraction * n)])  # spread over the ring
    t0 = time.perf_counter()
    out = run_secure_aggregation(setup, updates, Dropouts(before_masked_input=dropped))
    wall = time.perf_counter() - t0
    err = np.abs(out.total - sum(updates[c] for c in out.survivors)).max()
    up = sum(c.uplink_bytes for c in out.costs.values())
    down = sum(c.downlink_bytes for c in out.costs.values())
    plain = 2 * values  # fp16 upload of the same update
    return {
        "devices": n, "neighbours": setup.num_neighbours, "threshold": setup.threshold,
        "ring_bits": setup.quantizer.ring_bits, "dropped": len(dropped),
        "uplink_bytes_per_device": up / n, "downlink_bytes_per_device": down / n,
        "extra_uplink_bytes_per_device": up / n - plain * len(out.survivors) / n,
        "plain_fp16_upload_bytes": plain,
        "device_seconds_mean": sum(c.client_seconds for c in out.costs.values()) / n,
        "server_seconds": sum(c.server_seconds for c in out.costs.values()),
        "round_wall_seconds_in_process": wall,
        "max_abs_error": float(err), "error_bound": setup.quantizer.max_error(len(out.survivors)),
        "per_stage": {s: vars(c) for s, c in out.costs.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--values", type=int, default=VALUES)
    ap.add_argument("--drop", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=3, help="runs per setting; seconds are the fastest run's")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for n in args.devices:
        for k in (None, min(n - 1, 2 * math.ceil(math.log2(n)))):
            if k == n - 1 and rows and rows[-1]["devices"] == n:
                continue  # the ring is the complete graph at this size
            runs = [one(n, k, args.values, args.drop) for _ in range(args.repeats)]
            rows.append(min(runs, key=lambda r: r["round_wall_seconds_in_process"]))
            rows[-1]["repeats"] = args.repeats
            r = rows[-1]
            print(f"n={n:4d} k={r['neighbours']:3d} t={r['threshold']:3d} dropped={r['dropped']:3d} "
                  f"up/dev={r['uplink_bytes_per_device'] / 1e6:.4f} MB "
                  f"(extra {r['extra_uplink_bytes_per_device'] / 1e3:.1f} kB) "
                  f"down/dev={r['downlink_bytes_per_device'] / 1e3:.1f} kB dev_s={r['device_seconds_mean']:.3f} "
                  f"server_s={r['server_seconds']:.2f} err={r['max_abs_error']:.2e}<= {r['error_bound']:.2e}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": f"{platform.node()} ({platform.processor() or platform.machine()}), CPU, "
                                  "one process", "values": args.values, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
