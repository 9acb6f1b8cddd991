"""The cached model per (model, adapter, seed, device): a different seed is a different model with its own init."""

import torch

from fedtune.adapters import get_adapter_state
from fedtune.adapters.cached import adapter_model
from tests.conftest import make_config


def test_the_seed_is_part_of_the_key():
    cfg = make_config()
    a, _ = adapter_model(cfg.model, cfg.adapter, 1, "cpu")
    again, _ = adapter_model(cfg.model, cfg.adapter, 1, "cpu")
    b, _ = adapter_model(cfg.model, cfg.adapter, 2, "cpu")
    assert again is a and b is not a
    sa, sb = get_adapter_state(a), get_adapter_state(b)
    assert any(not torch.equal(sa[k], sb[k]) for k in sa if "lora_A" in k)  # each its own seeded init


def test_seeded_initial_is_the_adapter_as_built_whoever_built_it():
    from fedtune.adapters import set_adapter_state
    from fedtune.adapters.cached import seeded_initial

    cfg = make_config()
    model, _ = adapter_model(cfg.model, cfg.adapter, 4, "cpu")
    before = get_adapter_state(model)
    set_adapter_state(model, {k: v + 1.0 for k, v in before.items()})  # what training leaves on the cached model
    try:
        after = seeded_initial(model)
        assert all(torch.equal(after[k], before[k]) for k in before)
    finally:
        set_adapter_state(model, before)
