import torch

from fedtune.adapters import create_adapter
from fedtune.models import load_base_model
from fedtune.training.checkpointing import set_gradient_checkpointing
from tests.conftest import make_config


def test_checkpointing_toggles_and_keeps_adapter_grads():
    cfg = make_config()
    model = create_adapter(load_base_model(cfg.model)[0], cfg.adapter, seed=0)
    causal = model.get_base_model()
    set_gradient_checkpointing(model, True)
    set_gradient_checkpointing(model, True)  # idempotent: one input hook, not two
    assert causal.is_activation_checkpointing and len(causal._require_grads_hooks) == 1
    model.train()
    x = torch.randint(0, 260, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=x, labels=x).loss.backward()
    # B = 0 at init, so only B gets a gradient yet
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    set_gradient_checkpointing(model, False)
    assert not causal.is_activation_checkpointing and getattr(causal, "_require_grads_hook", None) is None


def test_every_n_layers_checkpoints_only_those_layers_and_keeps_the_gradient():
    from fedtune.training.checkpointing import _layers

    cfg = make_config(model={"tiny": {"num_hidden_layers": 4}})
    model = create_adapter(load_base_model(cfg.model)[0], cfg.adapter, seed=0)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)  # B != 0, so A gets a gradient too
    causal = model.get_base_model()
    x = torch.randint(0, 260, (2, 16), generator=torch.Generator().manual_seed(0))

    def grads():
        model.zero_grad(set_to_none=True)
        model(input_ids=x, labels=x).loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    model.train()
    reference = grads()
    set_gradient_checkpointing(model, True, every_n_layers=2)
    assert [m.gradient_checkpointing for m in _layers(causal)] == [True, False, True, False]
    set_gradient_checkpointing(model, True, every_n_layers=2)  # idempotent
    assert len(causal._require_grads_hooks) == 1
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads(), reference))
    set_gradient_checkpointing(model, True)  # every layer
    assert all(m.gradient_checkpointing for m in _layers(causal))
    set_gradient_checkpointing(model, False)
    assert not any(m.gradient_checkpointing for m in _layers(causal))
