"""The per-process cached base with its adapter: one per (model, adapter, seed, device).

Every backend takes its model from here (``fedtune.models.cache``: loaded and quantized once per worker). The
adapter's initial values come from the run's seed, so the seed is part of the key: two runs in one process that
differ only in their seed get two models, each with its own seeded initial adapter, which ``seeded_initial``
returns whatever training has since left on the cached model.
"""

from __future__ import annotations

import json
import weakref

from fedtune.adapters.registry import create_adapter
from fedtune.adapters.state import get_adapter_state
from fedtune.config import AdapterConfig, ModelConfig
from fedtune.types import AdapterState

_SEEDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cached model -> its adapter as created


def adapter_model(model_cfg: ModelConfig, adapter_cfg: AdapterConfig, seed: int, device: str):
    """``(model, info)``: the cached base with ``adapter_cfg`` created from ``seed``."""
    from fedtune.models import get_base_model

    def build(base):
        model = create_adapter(base, adapter_cfg, seed)
        _SEEDED[model] = get_adapter_state(model)
        return model

    key = json.dumps([adapter_cfg.model_dump(mode="json"), seed], sort_keys=True)
    return get_base_model(model_cfg, device, build=build, extra=key)


def seeded_initial(model) -> AdapterState:
    """The adapter ``model`` was created with (``adapter_model``), whatever training has since left on the cached
    model, as a copy; a model built elsewhere: its current adapter."""
    state = _SEEDED.get(model)
    return {k: v.clone() for k, v in state.items()} if state is not None else get_adapter_state(model)
