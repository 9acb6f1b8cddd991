"""Packed fleet benchmark: K virtual devices trained packed on one GPU vs one at a time.

Both sides run fedtune's own code: one-at-a-time is ``fedtune.training.train_local`` per device (opacus
DP-SGD, Poisson sampling), packed is ``fedtune.packed.train_packed`` over the same devices, adapters,
data, tasks and seeds. Client-steps/s = devices x local steps / wall seconds of the whole round call
(setup included on both sides). Medians over ``--repeats`` timed runs after one warm-up; everything
runs side by side in one process. ``--check`` also compares the packed and one-at-a-time adapters of
the first devices (same seeds): the largest absolute difference is reported.

    python bench/packed_fleet.py --shape smollm2 --devices 8,16,32,64 --dp on --device cuda
    python bench/packed_fleet.py --shape tiny --devices 2,4 --steps 2 --repeats 1 --device cpu   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.client_step import SHAPES  # noqa: E402
from fedtune.adapters import create_adapter, get_adapter_state  # noqa: E402
from fedtune.config import config_from_dict  # noqa: E402
from fedtune.models.cache import clear_cache  # noqa: E402
from fedtune.models.loader import load_base_model  # noqa: E402
from fedtune.packed import train_packed  # noqa: E402
from fedtune.privacy import PrivacyLedger  # noqa: E402
from fedtune.training import train_local  # noqa: E402
from fedtune.types import ClientData, ClientTask  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def _peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.startswith("cuda") else None


def _compare(packed, solo, starts, m: int) -> dict:
    """How far the packed adapters are from the one-at-a-time ones (first ``m`` devices, same seeds).

    Adam's first steps move each coordinate by about +-lr whatever the gradient's size, so a coordinate
    whose (noised) gradient is near 0 can flip sign under float rounding (bf16 GEMMs of another batch
    shape): the max difference then is ~2 lr even when the updates agree. The relative L2 distance of
    the updates and the share of coordinates within 1e-5 say how close they are.
    """
    keys = list(starts[0])
    d_pk = torch.cat([(packed[i].adapter[k] - solo[i].adapter[k]).reshape(-1) for i in range(m) for k in keys])
    upd = torch.cat([(solo[i].adapter[k] - starts[i][k]).reshape(-1) for i in range(m) for k in keys])
    return {"max_abs_diff_vs_one_at_a_time": d_pk.abs().max().item(), "max_abs_update": upd.abs().max().item(),
            "rel_l2_diff_vs_update": (d_pk.norm() / upd.norm()).item(),
            "share_coords_within_1e-5": (d_pk.abs() <= 1e-5).double().mean().item()}


def bench_quant(quant: str, args) -> list[dict]:
    dp = args.dp == "on"
    cfg = config_from_dict({
        "model": {"source": "tiny", "quantization": quant, "tiny": SHAPES[args.shape]},
        "adapter": {"method": "lora", "rank": args.rank, "alpha": 2 * args.rank, "target_modules": args.targets},
        "privacy": {"enabled": dp, "noise_multiplier": 1.0, "max_grad_norm": 1.0},
    })
    device = args.device
    base, _ = load_base_model(cfg.model, device)
    model = create_adapter(base, cfg.adapter, seed=0)
    if device.startswith("cuda"):
        model.to(device)
    vocab, n = SHAPES[args.shape]["vocab_size"], args.batch * 16  # sampling rate = batch / n = 1/16
    kmax = max(args.devices)
    gen = torch.Generator().manual_seed(0)
    datas = [ClientData(f"d{i}", torch.randint(0, vocab, (n, args.seq), generator=gen),
                        torch.randint(0, vocab, (1, args.seq), generator=gen)) for i in range(kmax)]
    start = get_adapter_state(model)
    # distinct adapters per device (B != 0), as after a first round
    states = [{k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in start.items()} for _ in range(kmax)]

    def tasks(k, rep):
        return [ClientTask(rep + 1, args.steps, args.batch, 1e-3, seed=1000 * rep + i) for i in range(k)]

    def ledgers(k):
        return [PrivacyLedger(f"d{i}") for i in range(k)] if dp else None

    results = []
    solo_k = min(args.solo_devices, kmax)
    _peak_reset(device)
    times, solo_updates = [], None
    for rep in range(args.repeats + 1):
        ts, led = tasks(solo_k, rep), ledgers(solo_k)

        def run_solo():
            nonlocal solo_updates
            solo_updates = [train_local(model, states[i], datas[i], ts[i], cfg.privacy, led[i] if dp else None)
                            for i in range(solo_k)]

        t = _timed(run_solo, device)
        if rep > 0:
            times.append(t)
    solo_rate = solo_k * args.steps / statistics.median(times)
    results.append({"mode": "one-at-a-time", "quant": quant, "devices": solo_k, "dp": dp,
                    "client_steps_per_s": round(solo_rate, 2), "round_s_all": [round(x, 3) for x in times],
                    "peak_gpu_gib": _peak(device)})
    print(json.dumps(results[-1]), flush=True)
    for k in args.devices:
        if args.bare:  # one bare non-private peft model at the same total batch: the GPU-speed reference
            from bench.bare_loop import bare_train

            _peak_reset(device)
            train = torch.cat([d.train for d in datas[:k]])  # [k * n, T]
            bare_train(model, train, 1, k * args.batch, 1e-3, False, seed=0)
            times = [_timed(lambda: bare_train(model, train, args.steps, k * args.batch, 1e-3, False, seed=r),
                            device) / args.steps for r in range(args.repeats)]
            bare_tps = k * args.batch * args.seq / statistics.median(times)
            results.append({"mode": "bare-nonprivate", "quant": quant, "devices": k, "dp": False,
                            "client_steps_per_s": round(k / statistics.median(times), 2),
                            "tokens_per_s": round(bare_tps, 1), "step_s_all": [round(x, 4) for x in times],
                            "peak_gpu_gib": _peak(device)})
            print(json.dumps(results[-1]), flush=True)
        _peak_reset(device)
        times, packed_updates = [], None
        for rep in range(args.repeats + 1):
            ts, led = tasks(k, rep), ledgers(k)

            def run_packed():
                nonlocal packed_updates
                packed_updates = train_packed(model, states[:k], datas[:k], ts, cfg.privacy, led,
                                              micro_batch=args.micro_batch)

            if rep == 1 and args.profile:
                from bench.client_step import _profile

                _profile(run_packed, f"packed K={k} {quant} dp={dp}", args.profile, device)
            t = _timed(run_packed, device)
            if rep > 0:
                times.append(t)
        rate = k * args.steps / statistics.median(times)
        row = {"mode": "packed", "quant": quant, "devices": k, "dp": dp, "client_steps_per_s": round(rate, 2),
               "speedup_vs_one_at_a_time": round(rate / solo_rate, 2), "round_s_all": [round(x, 3) for x in times],
               "peak_gpu_gib": _peak(device)}
        row["tokens_per_s"] = round(rate * args.batch * args.seq, 1)  # expected batch x T per client-step
        bare = [r for r in results if r["mode"] == "bare-nonprivate" and r["devices"] == k]
        if bare:
            row["tokens_per_s_vs_bare_nonprivate"] = round(row["tokens_per_s"] / bare[0]["tokens_per_s"], 3)
        if args.check:  # the last repeat's seeds are the same on both sides
            row.update(_compare(packed_updates, solo_updates, states, min(k, solo_k)))
        results.append(row)
        print(json.dumps(row), flush=True)
    del model, base
    clear_cache()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    p.add_argument("--quant", default="none")
    p.add_argument("--dp", default="on", choices=["on", "off"])
    p.add_argument("--devices", default="8,16,32,64")
    p.add_argument("--solo-devices", type=int, default=8, help="devices timed one at a time (rate is per device)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per packed forward/backward")
    p.add_argument("--check", action="store_true")
    p.add_argument("--bare", action="store_true", help="also time one bare non-private model at batch K x batch")
    p.add_argument("--profile", default=None, help="append a torch.profiler table of one packed round here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write all results to this file")
    p.add_argument("--sdpa", default="auto", choices=["auto", "no-cudnn"],
                   help="no-cudnn: keep SDPA off cuDNN attention (its ~1-2 ms of CPU a call bounds small steps)")
    args = p.parse_args()
    if args.sdpa == "no-cudnn":
        torch.backends.cuda.enable_cudnn_sdp(False)
    args.targets = args.targets.split(",")
    args.devices = [int(x) for x in args.devices.split(",")]
    results = []
    for quant in args.quant.split(","):
        results += bench_quant(quant, args)
    if args.device.startswith("cuda"):
        env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "sdpa": args.sdpa}
    else:
        env = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    print(f"\n{env}\n{'mode':>15} {'quant':>5} {'K':>4} {'client-steps/s':>15} {'x solo':>7} {'peak GiB':>9} {'rel diff':>10}")
    for r in results:
        print(f"{r['mode']:>15} {r['quant']:>5} {r['devices']:>4} {r['client_steps_per_s']:>15} "
              f"{r.get('speedup_vs_one_at_a_time', 1.0):>7} {str(r['peak_gpu_gib']):>9} "
              f"{round(r.get('rel_l2_diff_vs_update', 0.0), 6):>10}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "args": {k: v for k, v in vars(args).items()}, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
