"""Packed training gives each device the update it gets training alone (same seeds, same data)."""

import math

import pytest
import torch

from fedtune.adapters import create_adapter, get_adapter_state
from fedtune.data import build_client_data
from fedtune.models import load_base_model
from fedtune.models.tokenizer import ByteEncoder
from fedtune.packed import train_packed
from fedtune.privacy import PrivacyLedger
from fedtune.training import train_local
from fedtune.types import ClientTask
from tests.conftest import make_config


def _setup(dp: bool, **adapter):
    cfg = make_config(adapter={"target_modules": ["q_proj", "v_proj", "o_proj"], **adapter},
                      privacy={"enabled": dp, "noise_multiplier": 0.7, "max_grad_norm": 0.05})
    base, _ = load_base_model(cfg.model)
    model = create_adapter(base, cfg.adapter, seed=0)
    datas = build_client_data(cfg.data, ByteEncoder(), seed=0)
    g = torch.Generator().manual_seed(1)
    start = get_adapter_state(model)
    # every device starts from its own adapter (B != 0, so A's gradient is not trivially zero)
    states = [{k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in start.items()} for _ in datas]
    # batch sizes 1, 3, 5: under DP the first device's rate is ~1/50, so it meets empty (noise-only) steps
    tasks = [ClientTask(1, 4, 1 + 2 * i, 0.02, seed=10 + i) for i in range(len(datas))]
    return cfg, model, datas, states, tasks


def _max_diff(a, b):
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("dp", [False, True])
def test_packed_equals_one_at_a_time(dp):
    cfg, model, datas, states, tasks = _setup(dp)
    solo_ledgers = [PrivacyLedger(d.user_id) for d in datas]
    solo = [train_local(model, s, d, t, cfg.privacy, led if dp else None)
            for s, d, t, led in zip(states, datas, tasks, solo_ledgers)]
    ledgers = [PrivacyLedger(d.user_id) for d in datas]
    packed = train_packed(model, states, datas, tasks, cfg.privacy, ledgers if dp else None,
                          micro_batch=4 if dp else None)
    for k, (a, b) in enumerate(zip(solo, packed)):
        assert _max_diff(a.adapter, states[k]) > 1e-3  # training moved the adapter
        assert _max_diff(a.adapter, b.adapter) < 1e-5, k
        assert (a.num_examples, a.steps, a.tokens) == (b.num_examples, b.steps, b.tokens)
        assert math.isclose(a.train_loss, b.train_loss, rel_tol=1e-5) or (math.isnan(a.train_loss)
                                                                           and math.isnan(b.train_loss))
        assert a.metrics == b.metrics and a.epsilon == b.epsilon
    if dp:
        assert [led.history for led in ledgers] == [led.history for led in solo_ledgers]
        assert all(led.rounds == [1] and led.steps == 4 for led in ledgers)
        # device 0 (rate ~1/50, 4 steps) trained on at most a few chunks: its update is mostly noise
        assert solo[0].tokens < solo[2].tokens


def test_dp_noise_comes_from_each_devices_own_seed():
    cfg, model, datas, states, tasks = _setup(True)
    base = train_packed(model, states, datas, tasks, cfg.privacy, [PrivacyLedger(d.user_id) for d in datas])
    reseeded = [tasks[0], tasks[1], ClientTask(1, 4, 5, 0.02, seed=99)]
    other = train_packed(model, states, datas, reseeded, cfg.privacy, [PrivacyLedger(d.user_id) for d in datas])
    assert _max_diff(base[0].adapter, other[0].adapter) == 0.0  # packing partners do not matter
    assert _max_diff(base[1].adapter, other[1].adapter) == 0.0
    assert _max_diff(base[2].adapter, other[2].adapter) > 1e-3


def test_packing_leaves_the_cached_model_as_it_was():
    from peft.tuners.lora import LoraLayer

    cfg, model, datas, states, tasks = _setup(False)
    before = get_adapter_state(model)
    n_lora = sum(isinstance(m, LoraLayer) for m in model.modules())
    train_packed(model, states, datas, tasks)
    assert sum(isinstance(m, LoraLayer) for m in model.modules()) == n_lora
    assert _max_diff(get_adapter_state(model), before) == 0.0


def test_a_group_must_share_steps_and_lr():
    cfg, model, datas, states, tasks = _setup(False)
    mixed = [tasks[0], tasks[1], ClientTask(1, 4, 5, 0.5, seed=1)]
    with pytest.raises(ValueError, match="task.lr"):
        train_packed(model, states, datas, mixed)


def test_dp_needs_a_ledger_per_device():
    cfg, model, datas, states, tasks = _setup(True)
    with pytest.raises(ValueError, match="ledger"):
        train_packed(model, states, datas, tasks, cfg.privacy, [PrivacyLedger("only-one")])


def test_lora_dropout_is_refused():
    cfg, model, datas, states, tasks = _setup(False, dropout=0.1)
    with pytest.raises(ValueError, match="adapter.dropout"):
        train_packed(model, states, datas, tasks)


def test_prompt_tuning_is_refused():
    cfg = make_config(adapter={"method": "prompt_tuning"})
    base, _ = load_base_model(cfg.model)
    model = create_adapter(base, cfg.adapter, seed=0)
    datas = build_client_data(cfg.data, ByteEncoder(), seed=0)
    with pytest.raises(ValueError, match="adapter.method: lora"):
        train_packed(model, [get_adapter_state(model)], datas[:1], [ClientTask(1, 1, 2, 0.1, seed=0)])
