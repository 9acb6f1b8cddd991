"""Serving benchmark: N concurrent users, each on their own LoRA adapter, over one base.

Scenarios, side by side in one process on one machine (fedtune's scheduler + engine, no HTTP):
  own/mixed     every user on their own adapter, batched together (policy mixed, LoRA kernel --kernel)
  own/peft      the same with peft's own per-adapter mixed-batch loop (--kernel both)
  one/mixed     every user on the same adapter (the best case for batching)
  own/single    every user on their own adapter, served one adapter at a time (policy single): the
                baseline the mixed batches are compared with
  peft-generate the bare library: peft's ``generate`` per request, one request at a time (set_adapter)
Each user sends ``--requests`` requests back to back (closed loop): prompt of ``--prompt`` random
tokens, ``--max-tokens`` greedy tokens (eos disabled, so every request decodes all of them).
Reported: completion tokens/s over the scenario's wall time, request latency p50/p95, and the memory
one more loaded adapter costs (CUDA allocator delta; on CPU the adapter's own tensors).

    python bench/serving.py --shape smollm2 --device cuda --users 1,8,32 --json out.json
    python bench/serving.py --shape tiny --device cpu --users 1,8,32 --max-tokens 16       # this laptop
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the hub; never wait on a network

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fedtune.serve.pool import AdapterPool, local_source  # noqa: E402
from fedtune.serve.scheduler import Done, Failed, GenerationRequest, SamplingParams, Scheduler  # noqa: E402
from fedtune.serve.text import ByteTokenizer  # noqa: E402

SHAPES = {  # as bench/client_step.py
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=260, max_position_embeddings=512),
}


class NoEosTokenizer(ByteTokenizer):
    eos_token_ids = frozenset()
    pad_token_id = 0


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_base(shape: str, device: str, quantization: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    if quantization != "none":  # the project's loader (bitsandbytes), from a tiny-source config of this shape
        from fedtune.config import config_from_dict
        from fedtune.models import load_base_model

        cfg = config_from_dict({"model": {"source": "tiny", "quantization": quantization, "tiny": SHAPES[shape]}})
        model, _ = load_base_model(cfg.model, device)
        return model.eval()
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def write_adapters(base, n: int, rank: int, targets: list[str], root: Path) -> list[Path]:
    """n random LoRA adapters (PEFT directories) for this base; the base is left as it was."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    dirs, gen = [], torch.Generator().manual_seed(0)
    for i in range(n):
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        model.save_pretrained(root / f"user{i}")
        dirs.append(root / f"user{i}")
    model.unload()
    return dirs


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def run_scenario(pool: AdapterPool, names: list[str], policy: str, args, vocab: int) -> dict:
    tok = NoEosTokenizer()
    sched = Scheduler(pool, tok, max_batch=max(32, len(names)), policy=policy, window_s=0.002).start()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, vocab, (args.prompt,), generator=gen).tolist() for _ in names]
    latencies, tokens, errors = [], [0], []
    lock = threading.Lock()

    def user(i: int) -> None:
        for _ in range(args.requests):
            done = threading.Event()
            box = {}

            def emit(ev, box=box, done=done):
                if isinstance(ev, (Done, Failed)):
                    box["ev"] = ev
                    done.set()
            t0 = time.perf_counter()
            sched.submit(GenerationRequest(prompts[i], names[i], SamplingParams(args.max_tokens, 0.0), emit))
            done.wait()
            with lock:
                if isinstance(box["ev"], Failed):
                    errors.append(str(box["ev"].error))
                    return
                latencies.append(time.perf_counter() - t0)
                tokens[0] += box["ev"].completion_tokens

    threads = [threading.Thread(target=user, args=(i,)) for i in range(len(names))]
    sync(args.device)
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sync(args.device)
    wall = time.perf_counter() - t0
    sched.stop()
    if errors:
        raise SystemExit(f"{policy}: {errors[0]}")
    return {"tokens_per_s": tokens[0] / wall, "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95),
            "requests": len(latencies), "tokens": tokens[0], "wall_s": wall, "batches": sched.stats.batches,
            "max_rows": sched.stats.max_rows}


@torch.inference_mode()
def run_peft_generate(pool: AdapterPool, names: list[str], args, vocab: int) -> dict:
    """The bare library: peft's own generate, one request at a time, switching adapters with set_adapter."""
    model = pool.model
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, vocab, (args.prompt,), generator=gen).tolist() for _ in names]
    latencies, tokens = [], 0
    sync(args.device)
    t0 = time.perf_counter()
    for _ in range(args.generate_requests):
        for i, name in enumerate(names):
            s = time.perf_counter()
            model.set_adapter(pool.source(name).peft_name)
            ids = torch.tensor([prompts[i]], device=args.device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_tokens,
                                 min_new_tokens=args.max_tokens, do_sample=False, pad_token_id=0)
            sync(args.device)
            latencies.append(time.perf_counter() - s)
            tokens += out.shape[1] - ids.shape[1]
    wall = time.perf_counter() - t0
    return {"tokens_per_s": tokens / wall, "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95),
            "requests": len(latencies), "tokens": tokens, "wall_s": wall}


def adapter_memory(pool: AdapterPool, names: list[str], device: str) -> dict:
    """Bytes one more loaded adapter costs: allocator delta over loading len(names) adapters (CUDA), and
    the adapter's own tensors + its slot in the stacked kernel (any device)."""
    from fedtune.serve.batched_lora import StackedLoRA

    for n in names[1:]:  # keep one loaded (peft keeps >= 1 adapter), then load the others again
        pool.evict(n)
    sync(device)
    before = torch.cuda.memory_allocated() if device.startswith("cuda") else None
    pool.activate([pool.source(n) for n in names])
    sync(device)
    after = torch.cuda.memory_allocated() if device.startswith("cuda") else None
    lora = sum(p.nbytes for name, p in pool.model.named_parameters() if "lora_" in name)
    per_adapter_params = lora / len(pool.model.peft_config)
    stacked = StackedLoRA.stacked_bytes(pool.model) / (len(names) + 1) if pool.stack else 0
    out = {"adapter_param_bytes": per_adapter_params, "stacked_bytes_per_adapter": stacked}
    if before is not None:
        out["cuda_bytes_per_adapter"] = (after - before) / (len(names) - 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quantization", default="none", choices=["none", "int8", "nf4"])
    ap.add_argument("--users", default="1,8,32")
    ap.add_argument("--requests", type=int, default=2, help="requests per user, back to back")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--kernel", default="both", choices=["stacked", "peft", "both"])
    ap.add_argument("--generate-requests", type=int, default=1, help="requests per user for peft-generate")
    ap.add_argument("--skip", default="", help="comma list of scenarios to skip, e.g. peft-generate")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--table", type=Path, help="print the markdown table of an earlier --json and exit")
    args = ap.parse_args()
    if args.table:
        print(markdown(json.loads(args.table.read_text())))
        return
    users = [int(u) for u in args.users.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    base = build_base(args.shape, args.device, args.quantization)
    vocab = SHAPES[args.shape]["vocab_size"]
    tmp = Path(tempfile.mkdtemp(prefix="fedtune-serving-bench-"))
    dirs = write_adapters(base, max(users), args.rank, args.targets.split(","), tmp)
    pool = AdapterPool(base, "bench-base", capacity=max(users) + 1,
                       kernel="peft" if args.kernel == "peft" else "stacked")
    for d in dirs:
        pool.register(local_source(d))
    all_names = [d.name for d in dirs]
    pool.activate([pool.source(n) for n in all_names])  # everything loaded once, outside the timings
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    results = {"machine": machine, "shape": args.shape, "device": args.device, "quantization": args.quantization,
               "dtype": str(next(base.parameters()).dtype), "rank": args.rank, "targets": args.targets,
               "prompt": args.prompt, "max_tokens": args.max_tokens, "requests_per_user": args.requests,
               "rows": []}
    # warm-up: one small mixed batch (kernels, allocator)
    run_scenario(pool, all_names[:2], "mixed", argparse.Namespace(**{**vars(args), "requests": 1}), vocab)
    kernels = {"stacked": ["stacked"], "peft": ["peft"], "both": ["stacked", "peft"]}[args.kernel]
    for n in users:
        own = all_names[:n]
        plan = [("own/mixed", own, "mixed", kernels[0]), ("one/mixed", [all_names[0]] * n, "mixed", kernels[0]),
                ("own/single", own, "single", kernels[0])]
        if len(kernels) > 1:
            plan.insert(1, ("own/peft", own, "mixed", "peft"))
        for label, names, policy, kernel in plan:
            if label in skip:
                continue
            pool.set_kernel(kernel)
            warm = argparse.Namespace(**{**vars(args), "requests": 1, "max_tokens": 2})
            run_scenario(pool, names, policy, warm, vocab)  # untimed: first batches of this shape
            r = run_scenario(pool, names, policy, args, vocab)
            results["rows"].append({"users": n, "scenario": label, "kernel": kernel, **r})
            _save(args.json, results)  # partial results survive a time limit
            print(f"{n:>3} users  {label:<12} {r['tokens_per_s']:>9.1f} tok/s  p50 {r['p50_s']:.3f}s  "
                  f"p95 {r['p95_s']:.3f}s  ({r['batches']} batches, up to {r['max_rows']} rows)", flush=True)
        if "peft-generate" not in skip and n == max(users):
            r = run_peft_generate(pool, own, args, vocab)
            results["rows"].append({"users": n, "scenario": "peft-generate", "kernel": "peft", **r})
            print(f"{n:>3} users  {'peft-generate':<12} {r['tokens_per_s']:>9.1f} tok/s  p50 {r['p50_s']:.3f}s  "
                  f"p95 {r['p95_s']:.3f}s", flush=True)
    pool.set_kernel(kernels[0])
    results["memory"] = adapter_memory(pool, all_names, args.device)
    print("memory per loaded adapter:", {k: f"{v / 2**20:.2f} MiB" for k, v in results["memory"].items()})
    by = {(r["users"], r["scenario"]): r["tokens_per_s"] for r in results["rows"]}
    for n in users:
        if (n, "own/mixed") in by and (n, "own/single") in by:
            print(f"{n:>3} users: mixed-adapter batches / one adapter at a time = "
                  f"{by[(n, 'own/mixed')] / by[(n, 'own/single')]:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def markdown(results: dict) -> str:
    """The docs table of one run's JSON."""
    r0 = results
    head = (f"{r0['machine']}, {r0['shape']} shape, {r0['dtype']}, {r0['quantization']} base, LoRA r={r0['rank']} on "
            f"{r0['targets']}, prompt {r0['prompt']} tokens, {r0['max_tokens']} new tokens, "
            f"{r0['requests_per_user']} requests per user\n\n")
    lines = ["| users | scenario | tokens/s | p50 latency | p95 latency | batches (max rows) |",
             "|---:|---|---:|---:|---:|---|"]
    for r in results["rows"]:
        batches = f"{r['batches']} ({r['max_rows']})" if "batches" in r else "-"
        lines.append(f"| {r['users']} | {r['scenario']} | {r['tokens_per_s']:.1f} | {r['p50_s'] * 1000:.0f} ms | "
                     f"{r['p95_s'] * 1000:.0f} ms | {batches} |")
    m = results.get("memory", {})
    tail = "\n\nMemory per extra loaded adapter: " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in m.items())
    return head + "\n".join(lines) + tail


def _save(path: Path | None, results: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
