"""Saving the global adapter in PEFT format with fedtune's metadata beside it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from fedtune.types import RoundResult


def privacy_guarantee(result: RoundResult, cfg) -> dict:
    """The adapter's guarantee: level, ε, δ, mechanism and rounds (and the device-level one beside it)."""
    user = cfg.privacy.user_level
    sample = {"level": "sample", "epsilon": result.extra.get("sample_epsilon", result.epsilon),
              "delta": cfg.privacy.delta, "mechanism": "DP-SGD (opacus, Poisson sampling), per device",
              "accountant": cfg.privacy.accountant} if cfg.privacy.enabled else None
    if user.enabled:
        return {"level": "user", "epsilon": result.epsilon, "delta": result.delta,
                "mechanism": "DP-FedAvg: per-device clipping + Gaussian noise, Poisson-sampled devices",
                "accountant": user.accountant, "rounds": result.round, "clip_norm": user.clip_norm,
                "noise_multiplier": result.extra.get("user_noise_multiplier"), "sample_level": sample}
    if sample is not None:
        return dict(sample, epsilon=result.epsilon, delta=result.delta, rounds=result.round)
    return {"level": "none", "epsilon": None, "delta": None, "mechanism": None, "rounds": result.round}


def save_adapter(model, directory: Path, result: RoundResult, cfg) -> Path:
    """Write ``directory`` atomically: adapter_config.json + adapter_model.safetensors + fedtune.json.

    ``peft.PeftModel.from_pretrained(base, directory)`` loads it; fedtune.json records the round,
    its evaluation and the privacy guarantee of the adapter.
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
        "privacy": privacy_guarantee(result, cfg),
        "adapter": cfg.adapter.model_dump(mode="json"),
        "base_model": cfg.model.model_dump(mode="json"),
    }
    (tmp / "fedtune.json").write_text(json.dumps(meta, indent=1))
    if directory.exists():
        shutil.rmtree(directory)
    os.rename(tmp, directory)
    return directory
