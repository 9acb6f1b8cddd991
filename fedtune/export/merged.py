"""Export the base model with the LoRA merged in, as a plain transformers directory (safetensors).

W' = W + (alpha / r) * B @ A for every adapted linear; the result loads with
``AutoModelForCausalLM.from_pretrained(out)`` and needs no peft at inference time.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from fedtune.config import ModelConfig
from fedtune.export.source import load_with_adapter, require_lora

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja", "generation_config.json")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def merged_model(adapter_dir: Path, base_cfg: ModelConfig | None = None):
    """(the merged transformers model in eval mode, the dense base config)."""
    require_lora(adapter_dir, "merged")
    model, cfg = load_with_adapter(adapter_dir, base_cfg)
    return model.merge_and_unload().eval(), cfg


def export_merged(adapter_dir: Path, out: Path, base_cfg: ModelConfig | None = None,
                  dtype: str = "float32") -> Path:
    from fedtune.models.loader import resolve_model_dir

    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    model, cfg = merged_model(adapter_dir, base_cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(DTYPES[dtype]).save_pretrained(out, safe_serialization=True)
    base_dir = resolve_model_dir(cfg)
    if isinstance(base_dir, Path):  # carry the tokenizer along so the directory is self-contained
        for name in TOKENIZER_FILES:
            if (base_dir / name).is_file():
                shutil.copyfile(base_dir / name, out / name)
    log.info("wrote merged model (%s) to %s", dtype, out)
    return out
