"""Client-step benchmark: one device's local training through fedtune's own code path.

For each (quantization, DP) pair it builds the base (random weights of the given shape; speed and
memory do not depend on the values), attaches LoRA, and times ``fedtune.training.train_local``
(opacus DP-SGD with Poisson sampling when DP is on). Prints one JSON object per configuration and a
table. Medians over ``--repeats`` timed runs of ``--steps`` steps each, after one warm-up run; all
configurations are measured side by side in one process.

    python bench/client_step.py --shape smollm2 --quant none,int8,nf4 --dp off,on          # CPU
    python bench/client_step.py --shape smollm2 --batch 8 --seq 512 --device cuda          # GPU
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

from fedtune.adapters import create_adapter, get_adapter_state  # noqa: E402
from fedtune.config import config_from_dict  # noqa: E402
from fedtune.models.cache import clear_cache  # noqa: E402
from fedtune.models.loader import load_base_model  # noqa: E402
from fedtune.privacy import PrivacyLedger  # noqa: E402
from fedtune.training import train_local  # noqa: E402
from fedtune.types import ClientData, ClientTask  # noqa: E402

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


def bench_one(shape: str, quant: str, dp: bool, args) -> dict:
    cfg = config_from_dict({
        "model": {"source": "tiny", "quantization": quant, "tiny": SHAPES[shape]},
        "adapter": {"method": "lora", "rank": args.rank, "alpha": 2 * args.rank, "target_modules": args.targets},
        "privacy": {"enabled": dp, "noise_multiplier": 1.0, "max_grad_norm": 1.0},
    })
    device = args.device
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
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        update = train_local(model, state, data, task, cfg.privacy, ledger if dp else None)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if rep > 0:  # the first run warms up kernels and allocators
            times.append((time.perf_counter() - t) / args.steps)
    step = statistics.median(times)
    tokens_per_step = update.tokens / args.steps  # Poisson batches vary; this is the last run's mean
    out = {
        "shape": shape, "quant": quant, "dp": dp, "device": device, "batch": args.batch, "seq": args.seq,
        "rank": args.rank, "step_s_median": round(step, 4), "step_s_all": [round(x, 4) for x in times],
        "tokens_per_s": round(args.batch * args.seq / step, 1), "tokens_per_step_last": tokens_per_step,
        "base_mib": round(info["base_bytes"] / 2**20, 1), "base_dense_mib": round(info["base_bytes_dense"] / 2**20, 1),
        "adapter_kib": round(sum(t.numel() * 4 for t in state.values()) / 1024, 1),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        out["gpu"] = torch.cuda.get_device_name()
    else:
        import resource

        out["max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    del model, base
    clear_cache()
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
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write all results to this file")
    args = p.parse_args()
    args.targets = args.targets.split(",")
    results = []
    for quant in args.quant.split(","):
        for dp in args.dp.split(","):
            r = bench_one(args.shape, quant, dp == "on", args)
            print(json.dumps(r), flush=True)
            results.append(r)
    print(f"\n{'quant':>6} {'dp':>4} {'step s':>8} {'tok/s':>9} {'base MiB':>9} {'peak':>10}")
    for r in results:
        peak = f"{r['peak_gpu_gib']} GiB" if "peak_gpu_gib" in r else f"{r['max_rss_mib']} MiB rss"
        print(f"{r['quant']:>6} {str(r['dp']):>4} {r['step_s_median']:>8} {r['tokens_per_s']:>9} "
              f"{r['base_mib']:>9} {peak:>10}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
