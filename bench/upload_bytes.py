"""Bytes uploaded per client per round, by upload scheme, and what int8 does to held-out perplexity.

Part 1 (wire bytes, no training): the real reply ArrayRecord of a LoRA adapter of each model shape,
encoded with ``federation.upload`` fp32 / fp16 / int8, measured by ``records.payload_bytes``; as a
share of the full model (the base's parameters in fp32 and in bf16).
Part 2 (effect on the model): the same short simulation (configs/smoke.yaml: tiny model, synthetic
users, nf4, DP-SGD; same seed) with fp32, fp16 and int8 uploads, one after another; bytes per round and
held-out perplexity of the global adapter after every round.

    python bench/upload_bytes.py --rounds 5 --json docs/results/upload_bytes.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import yaml

from client_step import ALL_LINEARS, SHAPES
from simulate import ROOT, simulate

SCHEMES = ("fp32", "fp16", "int8")


def lora_shapes(shape: dict, rank: int, targets: list[str]) -> dict[str, tuple[int, ...]]:
    d, i = shape["hidden_size"], shape["intermediate_size"]
    kv = d // shape["num_attention_heads"] * shape["num_key_value_heads"]
    io = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d),
          "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}
    out = {}
    for layer in range(shape["num_hidden_layers"]):
        for t in targets:
            fan_in, fan_out = io[t]
            out[f"layers.{layer}.{t}.lora_A.weight"] = (rank, fan_in)
            out[f"layers.{layer}.{t}.lora_B.weight"] = (fan_out, rank)
    return out


def base_params(shape: dict) -> int:
    d, i, v, n = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_hidden_layers"]
    kv = d // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return 2 * v * d + n * (2 * d * d + 2 * d * kv + 3 * d * i + 2 * d) + d  # untied embeddings + head


def wire_bytes(name: str, rank: int, targets: list[str]) -> dict:
    from fedtune.flower.records import encode_upload, payload_bytes

    gen = torch.Generator().manual_seed(0)
    sent = {k: 0.01 * torch.randn(s, generator=gen) for k, s in lora_shapes(SHAPES[name], rank, targets).items()}
    trained = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in sent.items()}
    params = base_params(SHAPES[name])
    row = {"shape": name, "rank": rank, "targets": targets, "adapter_params": sum(v.numel() for v in sent.values()),
           "base_params": params}
    for scheme in SCHEMES:
        arrays, _ = encode_upload(trained, sent, scheme)
        b = payload_bytes(arrays)
        row[f"{scheme}_bytes"] = b
        row[f"{scheme}_share_of_fp32_model"] = b / (4 * params)
        row[f"{scheme}_share_of_bf16_model"] = b / (2 * params)
    row["fp32_over_fp16"] = row["fp32_bytes"] / row["fp16_bytes"]
    row["fp32_over_int8"] = row["fp32_bytes"] / row["int8_bytes"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--config", default=str(Path(ROOT) / "configs" / "smoke.yaml"))
    p.add_argument("--skip-sim", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    wire = [wire_bytes("tiny", 4, ["q_proj", "v_proj"]), wire_bytes("smollm2", 8, ["q_proj", "v_proj"]),
            wire_bytes("llama1b", 16, ALL_LINEARS)]
    print(f"{'shape':>8} {'rank':>4} {'fp32 B':>10} {'fp16 B':>10} {'int8 B':>10} {'fp32/int8':>9} "
          f"{'int8 / bf16 model':>17}")
    for r in wire:
        print(f"{r['shape']:>8} {r['rank']:>4} {r['fp32_bytes']:>10} {r['fp16_bytes']:>10} {r['int8_bytes']:>10} "
              f"{r['fp32_over_int8']:>9.2f} {r['int8_share_of_bf16_model']:>17.5f}")
    result = {"wire": wire}
    if not args.skip_sim:
        raw = yaml.safe_load(Path(args.config).read_text())
        raw["federation"]["rounds"] = args.rounds
        raw.pop("publish", None)
        sims = {}
        with tempfile.TemporaryDirectory() as tmp:
            for scheme in SCHEMES:
                raw["federation"]["upload"] = scheme
                recs = simulate(raw, Path(tmp) / scheme)["records"]
                train = [r for r in recs if r["round"] > 0]
                sims[scheme] = {
                    "bytes_per_client_per_round": [r["upload_bytes"] / r["clients_succeeded"] for r in train],
                    "eval_perplexity": [r["eval_perplexity"] for r in recs],
                    "base_model_bytes_dense": recs[0].get("base_model_bytes_dense"),
                }
                print(scheme, json.dumps(sims[scheme]), flush=True)
        ref = sims["fp32"]
        for scheme, s in sims.items():
            s["bytes_ratio_vs_fp32"] = ref["bytes_per_client_per_round"][0] / s["bytes_per_client_per_round"][0]
            s["final_perplexity_change_vs_fp32"] = s["eval_perplexity"][-1] / ref["eval_perplexity"][-1] - 1
            s["max_perplexity_change_vs_fp32"] = max(abs(a / b - 1) for a, b in zip(s["eval_perplexity"],
                                                                                    ref["eval_perplexity"]))
        print(f"\n{'upload':>6} {'B/client/round':>15} {'vs fp32':>8} {'final ppl':>10} {'ppl change':>11}")
        for scheme, s in sims.items():
            print(f"{scheme:>6} {s['bytes_per_client_per_round'][0]:>15.0f} {s['bytes_ratio_vs_fp32']:>8.2f} "
                  f"{s['eval_perplexity'][-1]:>10.4f} {100 * s['final_perplexity_change_vs_fp32']:>10.3f}%")
        result["simulation"] = {"config": args.config, "rounds": args.rounds, "runs": sims}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
