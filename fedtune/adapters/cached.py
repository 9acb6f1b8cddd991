"""The per-process cached base with its adapter: one per (model, adapter, seed, device).

Every backend takes its model from here (``fedtune.models.cache``: loaded and quantized once per worker). The
adapter's initial values come from the run's seed, so the seed is part of the key: two runs in one process that
differ only in their seed get two models, each with its own seeded initial adapter.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from fedtune.adapters.registry import create_adapter
from fedtune.config import AdapterConfig, ModelConfig


def adapter_model(model_cfg: ModelConfig, adapter_cfg: AdapterConfig, seed: int, device: str,
                  on_build: Callable | None = None):
    """``(model, info)``: the cached base with ``adapter_cfg`` created from ``seed``; ``on_build(model)`` runs
    once, when the model is built (e.g. to keep its seeded initial adapter)."""
    from fedtune.models import get_base_model

    def build(base):
        model = create_adapter(base, adapter_cfg, seed)
        if on_build is not None:
            on_build(model)
        return model

    key = json.dumps([adapter_cfg.model_dump(mode="json"), seed], sort_keys=True)
    return get_base_model(model_cfg, device, build=build, extra=key)
