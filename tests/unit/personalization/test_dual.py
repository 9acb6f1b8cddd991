"""FedDPA-style dual adapters: the output mix h = Wx + α·P x + (1-α)·G x, α = 0 is the global model bit for
bit, the model is left as it was, the private adapter never reaches an upload, selection reads validation only."""

import pytest
import torch

from fedtune.adapters import get_adapter_state, set_adapter_state
from fedtune.data import build_client_data
from fedtune.models.tokenizer import ByteEncoder
from fedtune.personalization.dual import FROZEN, DualAdapters, applied, dual_model, train_private
from fedtune.personalization.run_eval import load_model
from fedtune.personalization.select import select_model
from fedtune.privacy.accounting import compute_epsilon
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.training import train_local
from fedtune.types import ClientTask
from tests.conftest import make_config
from tests.unit.personalization.test_select import _poisoned


def _cfg(**privacy):
    return make_config(data={"synthetic_users": 2, "synthetic_docs_per_user": 10},
                       privacy={"enabled": False, **privacy},
                       personalization={"finetune_grid": [2, 4], "alpha_grid": [0.5], "validation_max_chunks": 4,
                                        "dual_adapters": True, "dual_train_alpha": 0.75})


@pytest.fixture(scope="module")
def setup():
    cfg = _cfg()
    model = load_model(cfg, "cpu")
    model.eval()
    start = get_adapter_state(model)
    gen = torch.Generator().manual_seed(0)
    glob = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in start.items()}  # B != 0: G x != 0
    private = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in start.items()}
    return model, start, glob, private, build_client_data(cfg.data, ByteEncoder(), cfg.seed)


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_alpha_zero_is_the_global_model_exactly(setup):
    model, start, glob, private, users = setup
    x = users[0].train[:2]
    set_adapter_state(model, glob)
    reference = _logits(model, x)
    with applied(model, DualAdapters(glob, private, 0.0)):
        assert torch.equal(_logits(model, x), reference)
    with applied(model, DualAdapters(glob, private, 0.5)):
        assert not torch.allclose(_logits(model, x), reference)  # the private branch counts at α > 0


def test_each_lora_layer_mixes_outputs_alpha_private_plus_one_minus_alpha_global(setup):
    from peft.tuners.lora import LoraLayer

    model, start, glob, private, _ = setup
    alpha = 0.3
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    name = next(n for n, m in model.named_modules() if m is layer)  # state keys: f"{name}.lora_A.weight"
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(1))
    s = layer.scaling["default"]
    gA, gB, pA, pB = (st[f"{name}.{p}.weight"] for st in (glob, private) for p in ("lora_A", "lora_B"))
    with torch.no_grad():
        expected = layer.get_base_layer()(x) + alpha * s * (x @ pA.T @ pB.T) + (1 - alpha) * s * (x @ gA.T @ gB.T)
        with applied(model, DualAdapters(glob, private, alpha)):
            got = layer(x)
    assert torch.allclose(got, expected, atol=1e-6)
    assert layer.scaling == {"default": s}  # restored on exit


def test_the_context_leaves_the_model_as_it_was(setup):
    model, start, glob, private, users = setup
    names = [(n, p.requires_grad) for n, p in model.named_parameters()]
    set_adapter_state(model, glob)
    x = users[0].train[:2]
    before = _logits(model, x)
    with dual_model(model, glob, 0.5):
        assert any(FROZEN in n for n, _ in model.named_parameters())
        assert all(not p.requires_grad for n, p in model.named_parameters() if FROZEN in n)  # global: frozen
        assert set(get_adapter_state(model)) == set(start)  # only the private (model's own) adapter trains
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == names
    assert torch.equal(_logits(model, x), before)


def test_the_private_adapter_trains_on_top_of_the_frozen_global_and_never_reaches_an_upload(setup):
    model, start, glob, _, users = setup
    task = ClientTask(server_round=0, local_steps=3, batch_size=4, lr=0.05, seed=0)
    private = train_private(model, glob, users[0], task, None, None, alpha=0.75)
    assert set(private) == set(start) and any(not torch.equal(private[k], glob[k]) for k in glob)
    x = users[0].train[:2]
    set_adapter_state(model, glob)
    reference = _logits(model, x)
    with applied(model, DualAdapters(glob, private, 0.0)):  # the frozen branch is still the global adapter
        assert torch.equal(_logits(model, x), reference)
    # the device's next round on the same cached model: its reply holds the global adapter's keys only,
    # trained from what the server sent, whatever the private adapter holds
    update = train_local(model, glob, users[0], task)
    again = train_local(model, glob, users[0], task)
    assert set(update.adapter) == set(start)
    assert all(torch.equal(update.adapter[k], again.adapter[k]) for k in start)
    assert not any(FROZEN in n for n, _ in model.named_parameters())


def test_dual_selection_reads_only_validation_chunks_and_stays_within_the_budget(setup):
    model, start, glob, _, users = setup
    cfg = _cfg(enabled=True, target_epsilon=8.0, max_noise_to_batch=5.0)
    ledger = PrivacyLedger(users[1].user_id)
    chosen, choice = select_model(model, glob, _poisoned(users[1]), cfg, ledger, seed=0)
    assert {"global", "finetune@2", "mix@0.5", "dual@0.5", "dual@0.75"} <= set(choice.scores)
    assert choice.val_loss == min(choice.scores.values())
    assert compute_epsilon(ledger.history, cfg.privacy.delta) <= 8.0  # the search and the dual steps, together
    assert ledger.steps >= 2 + 2  # at least the first grid step and the dual adapter's
    if choice.candidate == "dual":
        assert isinstance(chosen, DualAdapters) and chosen.alpha == choice.alpha and choice.label.startswith("dual@")


@pytest.mark.parametrize("quant", ["none", pytest.param("nf4", marks=pytest.mark.slow)])
def test_packed_private_training_gives_each_device_what_it_trains_alone(quant):
    """The packed path (the global branch frozen in the packed layers, the base untouched) trains each device's
    private LoRA as ``train_private`` does alone: same adapter, same DP steps on its ledger; nf4 base included."""
    from fedtune.personalization.dual import train_private_packed
    from fedtune.personalization.select import personal_privacy
    from tests.conftest import make_config

    cfg = make_config(data={"synthetic_users": 3, "synthetic_docs_per_user": 10}, model={"quantization": quant},
                      privacy={"enabled": True, "target_epsilon": 8.0, "max_noise_to_batch": 5.0})
    model = load_model(cfg, "cpu")
    start = get_adapter_state(model)
    gen = torch.Generator().manual_seed(0)
    glob = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in start.items()}
    users = build_client_data(cfg.data, ByteEncoder(), cfg.seed)
    tasks = [ClientTask(server_round=0, local_steps=3, batch_size=4, lr=0.05, seed=11 + i) for i in range(3)]
    privacies = [personal_privacy(cfg, u, 3, PrivacyLedger(u.user_id)) for u in users]
    assert all(p.enabled and p.noise_multiplier > 0 for p in privacies)
    alone_ledgers = [PrivacyLedger(u.user_id) for u in users]
    alone = [train_private(model, glob, u, t, p, led, 0.75, planned_steps=3)
             for u, t, p, led in zip(users, tasks, privacies, alone_ledgers)]
    packed_ledgers = [PrivacyLedger(u.user_id) for u in users]
    packed = train_private_packed(model, glob, users, tasks, privacies, packed_ledgers, 0.75, pack=2)
    for a, b, la, lb in zip(alone, packed, alone_ledgers, packed_ledgers):
        assert set(a) == set(b) == set(start)
        assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a), max((a[k] - b[k]).abs().max() for k in a)
        assert any(not torch.equal(b[k], glob[k]) for k in glob)  # it trained
        assert la.history == lb.history and len(lb.history) > 0
    assert not any(FROZEN in n for n, _ in model.named_parameters())  # the model is as it was


@pytest.mark.slow
def test_packed_dual_selection_makes_the_one_at_a_time_choice(setup):
    from fedtune.personalization.select import select_models

    model, start, glob, _, users = setup
    cfg = _cfg(enabled=True, target_epsilon=8.0, max_noise_to_batch=5.0)
    picks = {}
    for pack in (1, 2):
        ledgers = [PrivacyLedger(u.user_id) for u in users]
        picks[pack] = (select_models(model, glob, [_poisoned(u) for u in users], cfg, ledgers, [5, 6], pack=pack),
                       ledgers)
    for (a1, c1), (a2, c2), l1, l2 in zip(picks[1][0], picks[2][0], picks[1][1], picks[2][1]):
        assert c1.label == c2.label and c1.scores.keys() == c2.scores.keys()
        assert any(k.startswith("dual@") for k in c1.scores)
        assert c1.scores == pytest.approx(c2.scores, rel=1e-3)
        assert l1.history == l2.history and c1.epsilon == pytest.approx(c2.epsilon)
        if c1.candidate == "dual":
            assert all(torch.allclose(a1.private[k], a2.private[k], atol=1e-4) for k in a1.private)
