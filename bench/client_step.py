"""Client-step benchmark: one device's local training through fedtune's own code path.

For each (quantization, DP, mode, implementation) it builds the base (random weights of the given
shape; speed and memory do not depend on the values), attaches LoRA, and times one device's local
training. Prints one JSON object per configuration, a table, and the ratios measured in this run:
DP overhead (DP step / non-private step) and framework overhead (fedtune / bare). Medians over
``--repeats`` timed runs of ``--steps`` steps each, after one warm-up run; all configurations are
measured side by side in one process.

- ``--mode plain``: the model's own loss, no checkpointing (what a plain peft + opacus script does);
  ``fused``: the fused chunked loss (``--loss-chunk`` tokens; fedtune's default ``train`` config);
  ``efficient``: the fused loss and reentrant checkpointing (``train.gradient_checkpointing=true``).
  ``efficientN``: the same, checkpointing only every N-th decoder layer (selective checkpointing).
- ``--impl fedtune``: ``fedtune.training.train_local``; ``fedtune-ghost``: the same with
  ``privacy.clipping=ghost`` (``fedtune.privacy.ghost``, no per-sample gradients); ``bare``: ``bench/bare_loop.py``, a bare
  peft + opacus loop doing the same work (plain mode only); ``bare-ghost``: the same loop with opacus'
  ghost clipping (``grad_sample_mode="ghost"``; DP only).
- ``--profile FILE``: one extra call per configuration under torch.profiler; its top operators go to FILE.

    python bench/client_step.py --shape smollm2 --quant none,int8,nf4 --dp off,on          # CPU
    python bench/client_step.py --shape smollm2 --quant nf4 --dp off,on --impl fedtune,bare --mode plain
    python bench/client_step.py --shape llama1b --quant nf4 --dp on --mode plain,efficient \
        --batch 8 --seq 1024 --rank 16 --targets all --device cuda                           # GPU
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from fedtune.adapters import create_adapter, get_adapter_state  # noqa: E402
from fedtune.config import config_from_dict  # noqa: E402
from fedtune.models.cache import clear_cache  # noqa: E402
from fedtune.models.loader import load_base_model  # noqa: E402
from fedtune.privacy import PrivacyLedger  # noqa: E402
from fedtune.training import train_local  # noqa: E402
from fedtune.types import ClientData, ClientTask  # noqa: E402

from bare_loop import bare_train  # noqa: E402

SHAPES = {
    # SmolLM2-135M: 30 layers, d=576, GQA 9/3 heads, vocab 49152
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048),
    # Llama-3.2-1B: 16 layers, d=2048, GQA 32/8 heads, vocab 128256
    "llama1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=260, max_position_embeddings=512),
}


ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def bench_one(shape: str, quant: str, dp: bool, args, mode: str = "plain", impl: str = "fedtune") -> dict:
    cfg = config_from_dict({
        "model": {"source": "tiny", "quantization": quant, "tiny": SHAPES[shape]},
        "adapter": {"method": "lora", "rank": args.rank, "alpha": 2 * args.rank, "target_modules": args.targets},
        "privacy": {"enabled": dp, "noise_multiplier": 1.0, "max_grad_norm": 1.0,
                    "clipping": "ghost" if impl == "fedtune-ghost" else "hooks"},
    })
    device = args.device
    every = _every_n(mode)
    chunk = args.loss_chunk if mode != "plain" else None
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base, info = load_base_model(cfg.model, device)
    model = create_adapter(base, cfg.adapter, seed=0)
    if device.startswith("cuda"):
        model.to(device)
    vocab = SHAPES[shape]["vocab_size"]
    n = args.batch * 16  # a device's dataset: sampling rate = batch / n = 1/16
    gen = torch.Generator().manual_seed(0)
    data = ClientData("bench", torch.randint(0, vocab, (n, args.seq), generator=gen),
                      torch.randint(0, vocab, (4, args.seq), generator=gen))
    state = get_adapter_state(model)
    ledger = PrivacyLedger("bench")
    times = []
    for rep in range(args.repeats + 1):
        task = ClientTask(server_round=rep + 1, local_steps=args.steps, batch_size=args.batch, lr=1e-3, seed=rep)

        def call():
            if impl.startswith("bare"):
                return bare_train(model, data.train, args.steps, args.batch, 1e-3, dp, seed=rep,
                                  ghost=impl == "bare-ghost")
            return train_local(model, state, data, task, cfg.privacy, ledger if dp else None,
                               loss_chunk_tokens=chunk, gradient_checkpointing=every > 0,
                               checkpoint_every_n_layers=max(every, 1)).tokens

        if rep == 1 and args.profile:  # one extra, profiled call (not timed)
            _profile(call, f"{shape} {quant} dp={dp} {mode} {impl}", args.profile, device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        tokens = call()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if rep > 0:  # the first run warms up kernels and allocators
            times.append((time.perf_counter() - t) / args.steps)
    step = statistics.median(times)
    tokens_per_step = tokens / args.steps  # Poisson batches vary; this is the last run's mean
    out = {
        "shape": shape, "quant": quant, "dp": dp, "mode": mode, "impl": impl, "device": device,
        "batch": args.batch, "seq": args.seq,
        "rank": args.rank, "step_s_median": round(step, 4), "step_s_all": [round(x, 4) for x in times],
        "tokens_per_s": round(args.batch * args.seq / step, 1), "tokens_per_step_last": tokens_per_step,
        "base_mib": round(info["base_bytes"] / 2**20, 1), "base_dense_mib": round(info["base_bytes_dense"] / 2**20, 1),
        "adapter_kib": round(sum(t.numel() * 4 for t in state.values()) / 1024, 1),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "sdpa": args.sdpa,
    }
    if device.startswith("cuda"):
        out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        out["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
        out["gpu"] = torch.cuda.get_device_name()
    else:
        import resource

        out["max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    del model, base
    clear_cache()
    return out


def _every_n(mode: str) -> int:
    """0: no checkpointing (plain, fused); n: every n-th layer (efficient = efficient1, efficient2, ...)."""
    if mode in ("plain", "fused"):
        return 0
    if mode.startswith("efficient") and (mode[9:] == "" or mode[9:].isdigit()):
        return int(mode[9:] or 1)
    raise SystemExit(f"--mode: expected plain, fused, efficient or efficientN (checkpoint every N-th layer), "
                     f"got {mode!r}")


def _profile(call, title: str, path: str, device: str) -> None:
    """Append torch.profiler's top operators of one call (by device time, then by CPU time) to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        call()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    avg = prof.key_averages()
    with open(path, "a") as f:
        f.write(f"\n===== {title} =====\n")
        if device.startswith("cuda"):
            f.write(avg.table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))
        f.write(avg.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))


def ratios(results: list[dict]) -> list[dict]:
    """DP overhead and framework overhead from configurations measured in this run."""
    by = {(r["quant"], r["dp"], r["mode"], r["impl"]): r for r in results}
    out = []
    for (q, dp, mode, impl), r in by.items():
        if dp and (q, False, mode, impl) in by:
            out.append({"ratio": "dp_overhead", "quant": q, "mode": mode, "impl": impl,
                        "value": round(r["step_s_median"] / by[(q, False, mode, impl)]["step_s_median"], 3)})
        if impl.startswith("fedtune") and (q, dp, "plain", "bare") in by:
            bare = by[(q, dp, "plain", "bare")]
            out.append({"ratio": "framework_overhead", "quant": q, "dp": dp, "mode": mode, "impl": impl,
                        "value": round(r["step_s_median"] / bare["step_s_median"] - 1, 3)})
            out.append({"ratio": "tokens_per_s_vs_bare", "quant": q, "dp": dp, "mode": mode, "impl": impl,
                        "value": round(r["tokens_per_s"] / bare["tokens_per_s"], 3),
                        "peak_gib": r.get("peak_gpu_gib"), "bare_peak_gib": bare.get("peak_gpu_gib")})
        if mode != "plain" and (q, dp, "plain", impl) in by:
            p = by[(q, dp, "plain", impl)]
            out.append({"ratio": f"{mode}_vs_plain_tokens_per_s", "quant": q, "dp": dp, "impl": impl,
                        "value": round(r["tokens_per_s"] / p["tokens_per_s"], 3)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    p.add_argument("--quant", default="none,int8,nf4")
    p.add_argument("--dp", default="off,on")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--mode", default="plain", help="plain,fused,efficient")
    p.add_argument("--impl", default="fedtune", help="fedtune,fedtune-ghost (privacy.clipping=ghost),bare,bare-ghost (opacus' ghost clipping)")
    p.add_argument("--profile", default=None, help="append a torch.profiler table of each configuration here")
    p.add_argument("--loss-chunk", type=int, default=1024, help="tokens per chunk of the fused loss (efficient)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write all results to this file")
    p.add_argument("--sdpa", default="auto", choices=["auto", "no-cudnn"],
                   help="no-cudnn: keep SDPA off cuDNN attention (its ~1-2 ms of CPU a call bounds small steps)")
    args = p.parse_args()
    if args.sdpa == "no-cudnn":
        torch.backends.cuda.enable_cudnn_sdp(False)
    args.targets = ALL_LINEARS if args.targets == "all" else args.targets.split(",")
    results = []
    combos = itertools.product(args.quant.split(","), args.dp.split(","), args.mode.split(","), args.impl.split(","))
    for quant, dp, mode, impl in combos:
        if (impl.startswith("bare") and mode != "plain") or (impl.endswith("-ghost") and dp != "on"):
            continue
        try:
            r = bench_one(args.shape, quant, dp == "on", args, mode, impl)
        except torch.cuda.OutOfMemoryError as err:  # report it and go on with the next configuration
            r = {"shape": args.shape, "quant": quant, "dp": dp == "on", "mode": mode, "impl": impl,
                 "error": str(err)[:200]}
            gc.collect()
            torch.cuda.empty_cache()
        print(json.dumps(r), flush=True)
        results.append(r)
        if args.json:  # after every configuration, so a run cut short still leaves its figures
            with open(args.json, "w") as f:
                json.dump({"results": results, "ratios": ratios([x for x in results if "error" not in x])}, f, indent=1)
    print(f"\n{'quant':>6} {'dp':>5} {'mode':>9} {'impl':>13} {'step s':>8} {'tok/s':>9} {'base MiB':>9} {'peak':>14}")
    for r in results:
        if "error" in r:
            print(f"{r['quant']:>6} {str(r['dp']):>5} {r['mode']:>9} {r['impl']:>13}  error: {r['error'][:60]}")
            continue
        peak = f"{r['peak_gpu_gib']} GiB" if "peak_gpu_gib" in r else f"{r['max_rss_mib']} MiB rss"
        print(f"{r['quant']:>6} {str(r['dp']):>5} {r['mode']:>9} {r['impl']:>13} {r['step_s_median']:>8} "
              f"{r['tokens_per_s']:>9} {r['base_mib']:>9} {peak:>14}")
    for x in ratios([x for x in results if "error" not in x]):
        print(json.dumps(x))


if __name__ == "__main__":
    main()
