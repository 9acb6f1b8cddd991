"""What every export starts from: an adapter directory (PEFT + fedtune.json) and its base model.

A run's ``adapters/round-N``, a registry artifact and a device's active version all have this layout,
so exports need nothing else: fedtune.json names the base model config.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fedtune.config import ModelConfig

log = logging.getLogger(__name__)


def read_adapter_config(adapter_dir: Path) -> dict:
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json; expected a PEFT adapter directory "
                                "(a run's adapters/round-N, or a device's versions/<v>)")
    return json.loads(path.read_text())


def base_model_config(adapter_dir: Path, override: ModelConfig | None = None) -> ModelConfig:
    """The base model config from fedtune.json (or ``override``), always dense for exporting.

    An adapter trained on an nf4/int8 base is merged into the dense weights: runtimes quantize the
    merged model themselves (llama.cpp, ONNX Runtime), and merging into 4-bit weights would lose it.
    """
    if override is None:
        meta = Path(adapter_dir) / "fedtune.json"
        if not meta.is_file():
            raise FileNotFoundError(f"{adapter_dir}: no fedtune.json naming the base model; pass the base "
                                    "model config explicitly (base_cfg=..., or --config on the CLI)")
        override = ModelConfig.model_validate(json.loads(meta.read_text())["base_model"])
    if override.quantization != "none":
        log.info("exporting against the dense base (the adapter was trained on a %s base)", override.quantization)
    return override.model_copy(update={"quantization": "none"})


def require_lora(adapter_dir: Path, fmt: str) -> dict:
    cfg = read_adapter_config(adapter_dir)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{fmt} export needs a LoRA adapter, got peft_type={cfg.get('peft_type')!r} in "
                         f"{adapter_dir}; prompt-tuning adapters can only be exported as a PEFT directory")
    return cfg


def load_with_adapter(adapter_dir: Path, base_cfg: ModelConfig | None = None):
    """(base + adapter as a PeftModel in eval mode, the dense base config)."""
    from peft import PeftModel

    from fedtune.models import load_base_model

    cfg = base_model_config(adapter_dir, base_cfg)
    base, _ = load_base_model(cfg)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    return model.eval(), cfg
