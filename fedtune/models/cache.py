"""One base model per worker process, reused for every client and round it serves.

Flower's simulation engine keeps each ClientApp actor alive across rounds; a module-level cache
keyed by the model config means the base is loaded (and quantized) once per actor, never per round.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from fedtune.config import ModelConfig

_LOCK = threading.Lock()
_CACHE: dict[str, tuple[Any, dict]] = {}
_LOADS = 0  # base models loaded by this process (a simulation worker should show 1)


def _key(cfg: ModelConfig, device: str, extra: str = "") -> str:
    return json.dumps([cfg.model_dump(mode="json"), device, extra], sort_keys=True)


def get_base_model(cfg: ModelConfig, device: str = "cpu", build=None, extra: str = ""):
    """Return the cached ``(model, info)`` for this config, loading it on first use.

    ``build`` (optional) turns the base into what the caller wants cached, e.g. the base with
    its adapter attached; ``extra`` must then distinguish such variants.
    """
    from fedtune.models.loader import load_base_model

    global _LOADS
    key = _key(cfg, device, extra)
    with _LOCK:
        if key not in _CACHE:
            model, info = load_base_model(cfg, device)
            _LOADS += 1
            if build is not None:
                model = build(model)
            info = dict(info, uses=0)
            _CACHE[key] = (model, info)
        model, info = _CACHE[key]
        info["uses"] += 1
        return model, info


def load_count() -> int:
    return _LOADS


def clear_cache() -> None:
    with _LOCK:
        _CACHE.clear()
