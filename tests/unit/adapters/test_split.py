"""Shared vs private adapter tensors."""

import pytest
import torch

from fedtune.adapters import create_adapter, get_adapter_state
from fedtune.adapters.split import initial_private, merge, private_part, register_split, shared_part
from fedtune.config import ConfigError
from fedtune.models import load_base_model
from tests.conftest import make_config


@pytest.fixture(scope="module")
def lora_state():
    cfg = make_config()
    base, _ = load_base_model(cfg.model)
    return get_adapter_state(create_adapter(base, cfg.adapter, cfg.seed))


def test_fedsa_shares_a_and_keeps_b(lora_state):
    shared, private = shared_part(lora_state, "fedsa"), private_part(lora_state, "fedsa")
    assert shared and private
    assert all(".lora_A." in k for k in shared) and all(".lora_B." in k for k in private)
    assert set(shared) | set(private) == set(lora_state) and not set(shared) & set(private)
    assert merge(shared, private).keys() == lora_state.keys()


def test_none_shares_everything(lora_state):
    assert shared_part(lora_state, "none") == lora_state and private_part(lora_state, "none") == {}


def test_initial_private_part_is_zero_like_loras_b(lora_state):
    init = initial_private(lora_state, "fedsa")
    assert init.keys() == private_part(lora_state, "fedsa").keys()
    for k, v in init.items():
        assert v.shape == lora_state[k].shape and not v.any()
        assert torch.equal(v, lora_state[k])  # peft initializes B to zero: a fresh device is the shared model


def test_a_tensor_on_both_sides_is_refused(lora_state):
    key = next(iter(lora_state))
    with pytest.raises(ValueError, match="both shared and private"):
        merge({key: lora_state[key]}, {key: lora_state[key]})


def test_unknown_and_duplicate_splits_fail_loudly(lora_state):
    with pytest.raises(ValueError, match="unknown adapter split 'fedxx'.*fedsa"):
        shared_part(lora_state, "fedxx")
    with pytest.raises(ValueError, match="already registered"):
        register_split("fedsa")(lambda k: False)


def test_config_refuses_fedsa_without_lora_and_with_a_fleet():
    with pytest.raises(ConfigError, match="personalization.split: .*use adapter.method=lora"):
        make_config(adapter={"method": "prompt_tuning"}, personalization={"split": "fedsa"})
    with pytest.raises(ConfigError, match="personalization.split: .*use fleet.rank_aggregation=zeropad"):
        make_config(personalization={"split": "fedsa"},
                    fleet={"enabled": True, "mixture": {"phone-low": 1.0}, "catalog": "configs/devices"})
