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


def test_on_build_runs_once_when_the_model_is_built():
    cfg = make_config()
    built = []
    first, _ = adapter_model(cfg.model, cfg.adapter, 3, "cpu", on_build=built.append)
    adapter_model(cfg.model, cfg.adapter, 3, "cpu", on_build=built.append)
    assert built == [first]
