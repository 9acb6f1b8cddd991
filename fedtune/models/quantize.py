"""Quantize the frozen base: bitsandbytes nf4 / int8 (CPU and CUDA) or torchao int8 weight-only.

nf4 is the default for real models: on this 2-core CPU a SmolLM2-135M LoRA + DP-SGD step at batch
4 x 128 took 2.9 s with nf4 vs 4.1 s with int8 and 3.4 s unquantized, and the base shrinks from
513 MiB (fp32) to 159 MiB (nf4) vs 209 MiB (int8). See docs/benchmarks.md.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def _dense_bytes(model) -> int:
    """Bytes the base would take unquantized in fp32 (from parameter counts)."""
    total = 0
    for p in model.parameters():
        n = p.numel()
        # bitsandbytes Params4bit store two 4-bit values per uint8 element
        if getattr(p, "quant_state", None) is not None or p.__class__.__name__ == "Params4bit":
            n = int(p.quant_state.shape.numel()) if getattr(p, "quant_state", None) is not None else n * 2
        total += n * 4
    return total


def disable_cpu_repacking(model) -> int:
    """Keep bitsandbytes nf4 weights in their standard layout on CPU.

    bitsandbytes 0.50 repacks an nf4 weight in place for its AVX512-bf16 CPU kernel the first time the
    layer runs in eval mode without grad. With a non-zero LoRA adapter on top, that path returned
    garbage here (held-out loss 17.4 instead of 4.2 for the same adapter), and training after an
    evaluation then diverged. The standard layout is correct in both modes, so we pin it.
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def _bnb_config(quantization: str, device: str):
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=False,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_quantized(path, cfg, device: str = "cpu"):
    """Load the base from ``path`` with the configured quantization.

    Returns ``(model, info)`` where info holds ``base_bytes_dense`` (fp32 size of the same
    weights) and ``base_bytes`` (what the loaded base actually takes).
    """
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    kwargs: dict = {"dtype": dtype}
    if cfg.quantization != "none" and cfg.quant_backend == "bitsandbytes":
        kwargs["quantization_config"] = _bnb_config(cfg.quantization, device)
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if cfg.quantization == "none" or cfg.quant_backend == "torchao":
        model.to(device)
    dense = sum(p.numel() for p in model.parameters()) * 4
    if cfg.quantization == "nf4":
        dense = _dense_bytes(model)
    if cfg.quantization == "nf4":
        disable_cpu_repacking(model)
    if cfg.quant_backend == "torchao" and cfg.quantization == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig())
    info = {
        "base_bytes_dense": int(dense),
        "base_bytes": int(model.get_memory_footprint()),
        "quantization": cfg.quantization,
        "quant_backend": cfg.quant_backend,
    }
    log.info("base model %s: %.1f MiB -> %.1f MiB", cfg.quantization,
             info["base_bytes_dense"] / 2**20, info["base_bytes"] / 2**20)
    return model, info
