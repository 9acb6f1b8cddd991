"""Saving the global adapter in PEFT format with fedtune's metadata beside it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from fedtune.types import RoundResult


def save_adapter(model, directory: Path, result: RoundResult, cfg, privacy: dict) -> Path:
    """Write ``directory`` atomically: adapter_config.json + adapter_model.safetensors + fedtune.json.

    ``peft.PeftModel.from_pretrained(base, directory)`` loads it; fedtune.json records the round,
    its evaluation and ``privacy``, the adapter's guarantee as the mechanisms that ran report it
    (``fedtune.federation.labels.PrivacyTrail.guarantee``; never derived from the config).
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".", dir=directory.parent))
    inner = getattr(model, "_module", model)
    inner.save_pretrained(str(tmp))
    meta = {
        "round": result.round,
        "eval_loss": result.eval_loss,
        "eval_perplexity": result.eval_perplexity,
        "privacy": privacy,
        "adapter": cfg.adapter.model_dump(mode="json"),
        "base_model": cfg.model.model_dump(mode="json"),
    }
    (tmp / "fedtune.json").write_text(json.dumps(meta, indent=1))
    if directory.exists():
        shutil.rmtree(directory)
    os.rename(tmp, directory)
    return directory
