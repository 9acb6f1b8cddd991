"""The fused, chunked loss equals the full loss, its gradients, and opacus' per-sample gradients."""

import pytest
import torch

from fedtune.adapters import create_adapter
from fedtune.models import load_base_model
from fedtune.training.checkpointing import set_gradient_checkpointing
from fedtune.training.loss import causal_lm_loss, fused_linear_cross_entropy
from tests.conftest import make_config


def _model(**adapter):
    cfg = make_config(adapter={"target_modules": ["q_proj", "v_proj", "down_proj"], **adapter})
    base, _ = load_base_model(cfg.model)
    model = create_adapter(base, cfg.adapter, seed=0)
    for name, p in model.named_parameters():  # non-zero B so every LoRA factor gets a gradient
        if p.requires_grad and "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    return model


def _tokens(b=3, t=17, seed=0):
    return torch.randint(0, 260, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_fused_loss_and_grad_equal_full_cross_entropy(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(20, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 50, (20,), generator=g)
    y[3] = -100  # ignored positions count neither in the sum nor in the mean
    full = torch.nn.functional.cross_entropy(h @ w.t(), y, ignore_index=-100)
    (ref,) = torch.autograd.grad(full, h)
    fused = fused_linear_cross_entropy(h, w, y, chunk)
    (got,) = torch.autograd.grad(2.5 * fused, h)
    torch.testing.assert_close(fused, full)
    torch.testing.assert_close(got, 2.5 * ref)


def test_fused_loss_refuses_a_trainable_head():
    with pytest.raises(ValueError, match="frozen"):
        fused_linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4, requires_grad=True),
                                   torch.zeros(2, dtype=torch.long), 1)


def _lora_grads(model, loss):
    loss.backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out


def test_model_loss_and_adapter_grads_match_the_unchunked_loss():
    model = _model()
    x = _tokens()
    full = model(input_ids=x, labels=x).loss
    ref = _lora_grads(model, full)
    chunked = causal_lm_loss(model, x, chunk_tokens=5)
    got = _lora_grads(model, chunked)
    torch.testing.assert_close(chunked, full)
    assert ref.keys() == got.keys() and all(ref[k].abs().sum() > 0 for k in ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6)


def test_prompt_tuning_falls_back_to_the_model_loss():
    model = _model(method="prompt_tuning", num_virtual_tokens=4)
    x = _tokens()
    torch.testing.assert_close(causal_lm_loss(model, x, chunk_tokens=5), model(input_ids=x, labels=x).loss)


def _per_sample_grads(model, x, chunk, checkpointing):
    from opacus import GradSampleModule

    set_gradient_checkpointing(model, checkpointing)
    model.train()
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    try:
        causal_lm_loss(model, x, chunk).backward()
        out = {n: p.grad_sample.clone() for n, p in model.named_parameters() if p.requires_grad}
    finally:
        gsm._close()
        model.zero_grad(set_to_none=True)
        set_gradient_checkpointing(model, False)
    return out


@pytest.mark.parametrize("chunk,checkpointing", [(5, False), (None, True), (5, True)])
def test_opacus_per_sample_grads_are_unchanged(chunk, checkpointing):
    """Per-sample gradients under the fused loss and reentrant checkpointing equal the plain ones."""
    model = _model()
    x = _tokens(b=4)
    ref = _per_sample_grads(model, x, None, False)
    got = _per_sample_grads(model, x, chunk, checkpointing)
    assert ref.keys() == got.keys()
    for k in ref:
        assert got[k].shape == ref[k].shape and got[k].shape[0] == 4
        assert ref[k].abs().sum() > 0
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6)


def test_dp_training_with_the_memory_options_gives_the_same_update():
    """train_local under DP-SGD (same seed, same noise) with the fused loss + checkpointing == plain."""
    from fedtune.adapters import get_adapter_state
    from fedtune.privacy import PrivacyLedger
    from fedtune.training import train_local
    from fedtune.types import ClientData, ClientTask

    cfg = make_config(privacy={"enabled": True, "noise_multiplier": 0.5})
    data = ClientData("u", _tokens(b=16, t=16), _tokens(b=2, t=16, seed=1))
    task = ClientTask(1, 3, 4, 0.01, seed=3)
    updates = []
    for chunk, ckpt in [(None, False), (7, True)]:
        model = _model()
        updates.append(train_local(model, get_adapter_state(model), data, task, cfg.privacy, PrivacyLedger("u"),
                                   loss_chunk_tokens=chunk, gradient_checkpointing=ckpt))
    assert updates[0].train_loss == pytest.approx(updates[1].train_loss, rel=1e-5)
    for k, v in updates[0].adapter.items():
        torch.testing.assert_close(updates[1].adapter[k], v, rtol=1e-4, atol=1e-6)
