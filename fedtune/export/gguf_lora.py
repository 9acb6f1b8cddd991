"""Export a PEFT LoRA as a GGUF LoRA adapter that llama.cpp loads next to the base model's GGUF.

Conventions follow llama.cpp's ``convert_lora_to_gguf.py``:
- metadata: general.architecture=llama, general.type=adapter, adapter.type=lora, adapter.lora.alpha;
  llama.cpp scales each pair by alpha / r (r read from the tensor's shape).
- names: the base tensor's GGUF name + ``.lora_a`` / ``.lora_b``, e.g. ``blk.3.attn_q.weight.lora_a``.
- layouts (GGUF lists dims fastest first, so numpy shape [rows, cols] shows as ne = [cols, rows]):
    lora_a = A   numpy [r, n_in]   (ne = [n_in, r])     llama.cpp: a->ne[0] == W->ne[0]
    lora_b = B   numpy [n_out, r]  (ne = [r, n_out])    llama.cpp: b->ne[1] == W->ne[1], a->ne[1] == b->ne[0]
- q_proj and k_proj rows are permuted the way convert_hf_to_gguf permutes the base weights for
  llama.cpp's RoPE (HF's rotate-half pairs (j, j + d/2) -> adjacent pairs (2j, 2j + 1)); the rows
  are the output side, so only B is permuted.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from fedtune.config import ModelConfig
from fedtune.export.source import base_model_config, require_lora

log = logging.getLogger(__name__)

SUPPORTED = {"llama": "LLAMA"}  # model_type -> gguf.MODEL_ARCH member; other archs need their own permutes
DTYPES = {"f32": np.float32, "f16": np.float16}


def permute_for_rope(w: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """convert_hf_to_gguf's LlamaModel.permute over the rows of w [n_out, k] (halves -> adjacent pairs per head)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    rows = w.shape[0]
    # [n_out, k] -> [heads, 2, head_dim/2, k] -> swap the pair axis inward -> [n_out, k]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def base_hf_config(adapter_dir: Path, base_cfg: ModelConfig | None = None) -> dict:
    """The base model's config.json (only hyper-parameters are needed, never its weights)."""
    from fedtune.models.loader import resolve_model_dir

    path = resolve_model_dir(base_model_config(adapter_dir, base_cfg))
    if not isinstance(path, Path):
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(path, "config.json")).read_text())
    return json.loads((path / "config.json").read_text())


def lora_pairs(adapter_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """HF base weight name (model.layers.N.self_attn.q_proj.weight) -> (A [r, n_in], B [n_out, r])."""
    from safetensors.torch import load_file

    state = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        if ".lora_A." not in name and ".lora_B." not in name:
            raise ValueError(f"{adapter_dir}: tensor {name!r} is not a lora_A/lora_B weight; GGUF LoRA adapters "
                             "carry only low-rank pairs (no modules_to_save, biases or DoRA magnitudes)")
        base = name.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight").replace(
            ".lora_B.weight", ".weight")
        pairs.setdefault(base, {})["A" if ".lora_A." in name else "B"] = t.float()
    out = {}
    for base, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{adapter_dir}: {base} has only lora_{''.join(ab)}; the adapter file is incomplete")
        out[base] = (ab["A"], ab["B"])
    return out


def effective_alpha(adapter_cfg: dict) -> float:
    """The alpha llama.cpp needs so that alpha / r equals peft's scale."""
    r, alpha = adapter_cfg["r"], float(adapter_cfg["lora_alpha"])
    for key in ("rank_pattern", "alpha_pattern"):
        if adapter_cfg.get(key):
            raise ValueError(f"adapter_config.{key} is set; llama.cpp applies one alpha to every tensor, so "
                             "per-module ranks/alphas cannot be exported to GGUF")
    if adapter_cfg.get("use_dora"):
        raise ValueError("DoRA adapters cannot be exported to GGUF LoRA (llama.cpp has no magnitude vector)")
    if adapter_cfg.get("use_rslora"):
        return alpha * r / math.sqrt(r)  # rsLoRA scales by alpha / sqrt(r)
    return alpha


def export_gguf_lora(adapter_dir: Path, out: Path, base_cfg: ModelConfig | None = None,
                     hf_config: dict | None = None, dtype: str = "f32", name: str | None = None) -> Path:
    import gguf

    adapter_dir, out = Path(adapter_dir), Path(out)
    lcfg = require_lora(adapter_dir, "GGUF LoRA")
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    hf = hf_config or base_hf_config(adapter_dir, base_cfg)
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise ValueError(f"GGUF LoRA export supports model_type {sorted(SUPPORTED)}, got {model_type!r}")
    n_head, n_kv = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
    arch = getattr(gguf.MODEL_ARCH, SUPPORTED[model_type])
    names = gguf.get_tensor_name_map(arch, hf["num_hidden_layers"])

    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, effective_alpha(lcfg))
    writer.add_name(name or adapter_dir.name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    count = 0
    for hf_name, (a, b) in lora_pairs(adapter_dir).items():  # a [r, n_in], b [n_out, r]
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
        if gguf_name is None:
            raise ValueError(f"no llama.cpp tensor for {hf_name}; LoRA on this module cannot be exported")
        if hf_name.endswith("q_proj.weight"):
            b = permute_for_rope(b, n_head, n_head)
        elif hf_name.endswith("k_proj.weight"):
            b = permute_for_rope(b, n_head, n_kv)
        writer.add_tensor(f"{gguf_name}.lora_a", a.numpy().astype(DTYPES[dtype]))
        writer.add_tensor(f"{gguf_name}.lora_b", b.contiguous().numpy().astype(DTYPES[dtype]))
        count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    log.info("wrote GGUF LoRA %s: %d tensor pairs, alpha %s, %s", out, count, effective_alpha(lcfg), dtype)
    return out
