"""Per-user model selection: validation from training chunks only, the grid, mixing, DP budget, tiny users."""

import math

import pytest
import torch

from fedtune.adapters import get_adapter_state
from fedtune.data import build_client_data
from fedtune.models.tokenizer import ByteEncoder
from fedtune.personalization.run_eval import load_model
from fedtune.personalization.select import SelectionStore, mix, select_model, significance, split_validation
from fedtune.privacy.accounting import compute_epsilon
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.types import ClientData
from tests.conftest import make_config


def _cfg(min_gain_z: float = 1.0, **privacy):
    return make_config(data={"synthetic_users": 2, "synthetic_docs_per_user": 10},
                       privacy={"enabled": False, **privacy},
                       personalization={"finetune_grid": [2, 4], "alpha_grid": [0.5], "validation_max_chunks": 4,
                                        "min_gain_z": min_gain_z})


@pytest.fixture(scope="module")
def setup():
    cfg = _cfg()
    model = load_model(cfg, "cpu")
    users = build_client_data(cfg.data, ByteEncoder(), cfg.seed)
    return model, get_adapter_state(model), users


def _poisoned(data: ClientData) -> ClientData:
    """Test chunks the model cannot evaluate (token ids past the vocabulary): touching them raises."""
    return ClientData(data.user_id, data.train, torch.full_like(data.heldout, 10**9))


def test_validation_slice_comes_from_training_chunks_and_leaves_enough_to_fit(setup):
    _, _, users = setup
    fit, val = split_validation(users[0], 0.25, 4)
    n = users[0].num_train
    assert fit.num_train + val.shape[0] == n and val.shape[0] == min(4, round(0.25 * n))
    assert torch.equal(torch.cat([fit.train, val]), users[0].train) and fit.heldout.shape[0] == 0
    tiny = ClientData("t", users[0].train[:2], users[0].heldout)
    assert split_validation(tiny, 0.25, 4) is None


def test_selection_never_touches_test_chunks_and_keeps_the_best_validation_score(setup, tmp_path):
    model, start, users = setup
    cfg = _cfg(min_gain_z=0.0)  # the lowest validation loss wins (the gain threshold: the tests below)
    adapter, choice = select_model(model, start, _poisoned(users[0]), cfg, None, seed=1)
    assert {"global", "finetune@2", "mix@0.5"} <= set(choice.scores)
    assert set(choice.scores) <= {"global", "finetune@2", "finetune@4", "mix@0.5"}
    assert choice.val_loss == min(choice.scores.values())
    assert choice.global_val_loss == choice.scores["global"]
    if choice.candidate == "global":
        assert all(torch.equal(adapter[k], start[k]) for k in start)
    else:  # the synthetic users' pattern is learnable: some training helps on their own validation slice
        assert choice.val_loss < choice.global_val_loss and choice.steps in (2, 4)
    store = SelectionStore(tmp_path)
    store.save(choice)
    assert store.load(choice.user) == choice


def test_a_one_chunk_slice_is_no_validation_the_device_keeps_the_global_adapter(setup):
    model, start, users = setup
    small = ClientData("small", users[0].train[:6], users[0].heldout)  # a 20% slice of 6 chunks: 1 chunk
    assert split_validation(small, 0.2, 4, min_chunks=2) is None
    assert split_validation(small, 0.2, 4, min_chunks=1)[1].shape[0] == 1
    adapter, choice = select_model(model, start, small, _cfg(min_gain_z=0.0), None, seed=0)
    assert choice.candidate == "global" and not choice.scores and "validation_min_chunks" in choice.reason
    assert all(torch.equal(adapter[k], start[k]) for k in start)
    cfg = _cfg(min_gain_z=0.0)
    cfg = cfg.model_copy(update={"personalization": cfg.personalization.model_copy(
        update={"validation_min_chunks": 1})})
    _, searched = select_model(model, start, small, cfg, None, seed=0)
    assert searched.validation_chunks == 1 and "finetune@2" in searched.scores


def test_validation_min_chunks_above_the_maximum_is_refused():
    from fedtune.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="validation_min_chunks"):
        config_from_dict({"personalization": {"validation_min_chunks": 5, "validation_max_chunks": 4}})


def test_significance_is_the_paired_mean_gain_in_standard_errors():
    g = torch.tensor([2.0, 3.0, 1.0, 4.0], dtype=torch.float64)
    c = g - torch.tensor([0.1, 0.3, 0.2, 0.2], dtype=torch.float64)  # gains: mean 0.2, sd 0.0816
    se = torch.tensor([0.1, 0.3, 0.2, 0.2], dtype=torch.float64).std().item() / 2
    assert significance(g, c) == pytest.approx(0.2 / se)
    # paired: a big spread shared by both models is not noise in their difference
    assert significance(g * 100, g * 100 - (g - c)) == pytest.approx(0.2 / se)
    assert significance(g, g + 0.1) == 0.0 and significance(g, g) == 0.0  # no gain
    assert significance(g, g - 0.5) == math.inf  # a gain on every token alike


def test_significance_over_chunks_takes_each_chunks_mean_gain_as_one_unit():
    g = torch.tensor([2.0, 3.0, 1.0, 4.0, 2.0, 5.0], dtype=torch.float64)
    gains = torch.tensor([0.1, 0.1, 0.1, 0.5, 0.5, 0.5], dtype=torch.float64)  # two chunks of 3 tokens
    c = g - gains
    means = torch.tensor([0.1, 0.5], dtype=torch.float64)
    assert significance(g, c, chunks=2) == pytest.approx(0.3 / (means.std().item() / math.sqrt(2)))
    assert significance(g, c, chunks=2) < significance(g, c)  # correlated tokens: fewer units, a wider error
    assert significance(g, c, chunks=1) == 0.0  # one chunk: no spread between chunks to measure
    assert significance(g, c, chunks=3) == pytest.approx(0.3 / (torch.tensor([0.1, 0.3, 0.5]).std().item()
                                                                / math.sqrt(3)))


def test_a_gain_below_min_gain_z_keeps_the_global_adapter_and_says_so(setup):
    model, start, users = setup
    _, free = select_model(model, start, users[0], _cfg(min_gain_z=0.0), None, seed=1)
    assert free.candidate != "global" and free.val_loss < free.global_val_loss  # a learnable pattern
    assert 0 < free.gain_z < math.inf and free.gain_chunk_z is not None  # both recorded, kept or not
    above, kept = select_model(model, start, users[0], _cfg(min_gain_z=free.gain_z * 0.99), None, seed=1)
    assert kept.label == free.label and kept.gain_z == pytest.approx(free.gain_z)
    adapter, held = select_model(model, start, users[0], _cfg(min_gain_z=free.gain_z * 1.01), None, seed=1)
    assert held.candidate == "global" and held.steps == 0 and held.val_loss == held.global_val_loss
    assert held.gain_z == pytest.approx(free.gain_z) and "min_gain_z" in held.reason
    assert held.scores == pytest.approx(free.scores)  # the same search, only the verdict differs
    assert all(torch.equal(adapter[k], start[k]) for k in start)


def test_mix_is_the_weighted_average():
    a, b = {"w": torch.ones(2)}, {"w": torch.zeros(2)}
    assert torch.allclose(mix(a, b, 0.25)["w"], torch.full((2,), 0.25))


def test_a_user_too_small_for_a_validation_slice_keeps_the_global_model_and_says_so(setup):
    model, start, users = setup
    tiny = ClientData("tiny", users[0].train[:2], users[0].heldout)
    adapter, choice = select_model(model, start, tiny, _cfg(), None, seed=0)
    assert choice.candidate == "global" and choice.val_loss is None and "too few" in choice.reason
    assert all(torch.equal(adapter[k], start[k]) for k in start)


def test_dp_selection_stays_within_the_device_target_epsilon(setup):
    model, start, users = setup
    cfg = _cfg(enabled=True, target_epsilon=8.0, max_noise_to_batch=5.0)
    ledger = PrivacyLedger(users[1].user_id)
    ledger.history = [(1.5, 0.5, 6)]  # what the federation spent
    _, choice = select_model(model, start, users[1], cfg, ledger, seed=0)
    assert ledger.steps > 6  # it trained, continuing the device's ledger
    assert compute_epsilon(ledger.history, cfg.privacy.delta) <= 8.0
    assert choice.epsilon == pytest.approx(compute_epsilon(ledger.history, cfg.privacy.delta))


def test_dp_selection_sits_out_when_the_budget_is_spent(setup):
    model, start, users = setup
    cfg = _cfg(enabled=True, target_epsilon=1.0)
    ledger = PrivacyLedger(users[1].user_id)
    ledger.history = [(0.5, 1.0, 20)]  # already far past epsilon 1
    adapter, choice = select_model(model, start, users[1], cfg, ledger, seed=0)
    assert choice.candidate == "global" and "budget" in choice.reason and ledger.history == [(0.5, 1.0, 20)]


def test_packed_selection_gives_each_device_what_it_gets_alone(setup):
    from fedtune.personalization.select import select_models

    model, start, users = setup
    cfg = _cfg(enabled=True, target_epsilon=8.0, max_noise_to_batch=5.0)
    results = {}
    for pack in (1, 2):
        ledgers = [PrivacyLedger(u.user_id) for u in users]
        results[pack] = (select_models(model, start, users, cfg, ledgers, [3, 4], pack=pack), ledgers)
    for (a1, c1), (a2, c2), l1, l2 in zip(*results[1][0:1], *results[2][0:1], results[1][1], results[2][1]):
        assert c1.label == c2.label and c1.steps == c2.steps
        assert c1.scores == pytest.approx(c2.scores, rel=1e-3)
        assert all(torch.allclose(a1[k], a2[k], atol=1e-4) for k in a1)
        assert l1.history == l2.history and c1.epsilon == pytest.approx(c2.epsilon)


def test_a_device_too_small_for_its_budget_sits_out_of_the_federation():
    from fedtune.personalization.benchmark import sit_outs

    cfg = make_config(data={"synthetic_users": 3, "synthetic_docs_per_user": 10},
                      privacy={"enabled": True, "target_epsilon": 8.0},
                      federation={"rounds": 2, "clients_per_round": 3, "min_clients": 1})
    users = build_client_data(cfg.data, ByteEncoder(), cfg.seed)
    users[0] = ClientData(users[0].user_id, users[0].train[:1], users[0].heldout)  # one chunk: cannot train
    out = sit_outs(cfg, users)
    assert list(out) == [users[0].user_id] and "sits out" in out[users[0].user_id]
    assert sit_outs(cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update={"enabled": False})}), users) == {}
