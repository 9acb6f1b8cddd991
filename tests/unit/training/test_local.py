import math

import pytest
import torch

from fedtune.adapters import create_adapter, get_adapter_state
from fedtune.data import build_client_data
from fedtune.models import load_base_model
from fedtune.models.tokenizer import ByteEncoder
from fedtune.privacy import PrivacyLedger
from fedtune.training import evaluate_chunks, train_local
from fedtune.types import ClientTask
from tests.conftest import make_config


def _setup(**sections):
    cfg = make_config(**sections)
    base, _ = load_base_model(cfg.model)
    model = create_adapter(base, cfg.adapter, seed=0)
    data = build_client_data(cfg.data, ByteEncoder(), seed=0)
    return cfg, model, data


@pytest.mark.parametrize("quant", ["nf4", "int8", "none"])
def test_quantized_base_trains_its_lora(quant):
    cfg, model, data = _setup(model={"quantization": quant})
    client = data[0]
    state = get_adapter_state(model)
    before = evaluate_chunks(model, client.train).loss
    update = train_local(model, state, client, ClientTask(1, 30, 8, 0.02, seed=0))
    after = evaluate_chunks(model, client.train).loss
    assert after < before - 0.3, (before, after)
    assert update.num_examples == client.num_train and update.steps == 30
    assert update.tokens == 30 * 8 * cfg.data.seq_len
    assert set(update.adapter) == set(state)
    assert update.epsilon is None


def test_prompt_tuning_trains():
    cfg, model, data = _setup(adapter={"method": "prompt_tuning", "num_virtual_tokens": 8})
    client = data[0]
    state = get_adapter_state(model)
    before = evaluate_chunks(model, client.train).loss
    update = train_local(model, state, client, ClientTask(1, 30, 8, 1.0, seed=0))
    after = evaluate_chunks(model, client.train).loss
    # a random 2-layer model can only be steered so far through attention to 8 virtual tokens
    assert after < before - 0.05, (before, after)
    assert list(update.adapter) == ["prompt_embeddings"]
    assert not torch.allclose(update.adapter["prompt_embeddings"], state["prompt_embeddings"])


def test_prompt_tuning_trains_under_dp():
    cfg, model, data = _setup(adapter={"method": "prompt_tuning"},
                              privacy={"enabled": True, "noise_multiplier": 0.3})
    ledger = PrivacyLedger("u")
    update = train_local(model, get_adapter_state(model), data[0], ClientTask(1, 3, 4, 0.1, seed=0),
                         cfg.privacy, ledger)
    assert update.epsilon > 0 and math.isfinite(update.train_loss)


def test_dp_changes_the_update_and_epsilon_grows_with_rounds():
    cfg, model, data = _setup(privacy={"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 0.5})
    client = data[0]
    state = get_adapter_state(model)
    plain = train_local(model, state, client, ClientTask(1, 3, 4, 0.02, seed=5))
    ledger = PrivacyLedger(client.user_id)
    private = train_local(model, state, client, ClientTask(1, 3, 4, 0.02, seed=5), cfg.privacy, ledger)
    diff = max((plain.adapter[k] - private.adapter[k]).abs().max().item() for k in state)
    assert diff > 1e-4  # clipping + noise change the result
    eps1 = private.epsilon
    assert eps1 > 0 and ledger.steps == 3 and ledger.rounds == [1]
    private2 = train_local(model, private.adapter, client, ClientTask(2, 3, 4, 0.02, seed=6), cfg.privacy, ledger)
    assert private2.epsilon > eps1  # composed over rounds, not restarted
    assert ledger.steps == 6 and ledger.rounds == [1, 2]
    # the opacus hooks were removed: the cached model trains without DP again
    again = train_local(model, state, client, ClientTask(1, 3, 4, 0.02, seed=5))
    assert all(torch.allclose(again.adapter[k], plain.adapter[k], atol=1e-6) for k in state)


def test_dp_noise_is_seeded():
    cfg, model, data = _setup(privacy={"enabled": True, "noise_multiplier": 1.0})
    state = get_adapter_state(model)
    a = train_local(model, state, data[0], ClientTask(1, 2, 4, 0.02, seed=9), cfg.privacy, PrivacyLedger("a"))
    b = train_local(model, state, data[0], ClientTask(1, 2, 4, 0.02, seed=9), cfg.privacy, PrivacyLedger("a"))
    assert all(torch.equal(a.adapter[k], b.adapter[k]) for k in state)


def test_target_epsilon_calibrates_noise():
    cfg, model, data = _setup(privacy={"enabled": True, "target_epsilon": 4.0, "delta": 1e-5})
    ledger = PrivacyLedger("u")
    planned = 8
    update = train_local(model, get_adapter_state(model), data[0], ClientTask(1, 4, 4, 0.02, seed=0),
                         cfg.privacy, ledger, planned_steps=planned)
    assert update.metrics["noise_multiplier"] > 0.3
    train_local(model, update.adapter, data[0], ClientTask(2, 4, 4, 0.02, seed=1), cfg.privacy, ledger,
                planned_steps=planned)
    # after all planned steps the budget is met (within the calibration tolerance), not exceeded
    assert 3.5 < ledger.epsilon(1e-5) <= 4.0 + 0.05


def test_evaluate_is_token_weighted_and_deterministic():
    cfg, model, data = _setup()
    r1 = evaluate_chunks(model, data[0].heldout, batch_size=2)
    r2 = evaluate_chunks(model, data[0].heldout, batch_size=8)
    assert r1.loss == pytest.approx(r2.loss, rel=1e-5)
    assert r1.perplexity == pytest.approx(math.exp(r1.loss))
    assert r1.tokens == data[0].heldout.shape[0] * (cfg.data.seq_len - 1)
