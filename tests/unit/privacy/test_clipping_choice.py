"""`privacy.clipping: auto` (the default): ghost clipping for plain LoRA on a CUDA device, where it measured faster
than opacus' hooks; hooks on a CPU, for prompt tuning and for LoRA variants ghost clipping does not cover."""

import pytest
import torch

from fedtune.adapters import create_adapter
from fedtune.config import config_from_dict
from fedtune.models import load_base_model
from fedtune.privacy import PrivacyLedger
from fedtune.privacy.dpsgd import choose_clipping, make_private
from fedtune.privacy.ghost import GhostPrivateTraining
from tests.conftest import make_config


def _model(**adapter):
    cfg = make_config(adapter=adapter)
    base, _ = load_base_model(cfg.model)
    return create_adapter(base, cfg.adapter, seed=0), cfg


def test_auto_is_the_default():
    assert config_from_dict({}).privacy.clipping == "auto"


def test_auto_takes_ghost_for_plain_lora_on_cuda_only():
    lora, _ = _model()
    assert choose_clipping("auto", lora, "cuda") == "ghost"
    assert choose_clipping("auto", lora, "cpu") == "hooks"
    assert choose_clipping("hooks", lora, "cuda") == "hooks"  # an explicit setting is kept
    assert choose_clipping("ghost", lora, "cpu") == "ghost"


def test_auto_keeps_hooks_where_ghost_clipping_does_not_apply():
    from peft.tuners.lora import LoraLayer

    from fedtune.privacy.ghost.clipper import lora_linears

    prompt, _ = _model(method="prompt_tuning")
    assert choose_clipping("auto", prompt, "cuda") == "hooks"
    dora, _ = _model()
    layer = next(m for m in dora.modules() if isinstance(m, LoraLayer))
    layer.use_dora = {k: True for k in layer.lora_A}  # a LoRA variant ghost clipping refuses
    assert choose_clipping("auto", dora, "cuda") == "hooks"
    with pytest.raises(ValueError, match="clipping=hooks"):  # what an explicit ghost setting meets
        lora_linears(dora)


def test_make_private_follows_the_choice(monkeypatch):
    """make_private wires the chosen path: ghost where auto picks it (CUDA simulated by patching the choice's
    device input), opacus' hooks on this CPU."""
    import fedtune.privacy.dpsgd as dpsgd

    model, cfg = _model()
    data = torch.utils.data.TensorDataset(torch.randint(0, 200, (32, 8)))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    privacy = cfg.privacy.model_copy(update={"enabled": True, "clipping": "auto"})
    hooks = make_private(model, opt, loader, privacy, PrivacyLedger("a"), planned_steps=2, seed=0)
    assert not isinstance(hooks, GhostPrivateTraining)
    model, cfg = _model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    real = dpsgd.choose_clipping
    monkeypatch.setattr(dpsgd, "choose_clipping", lambda s, m, device_type: real(s, m, "cuda"))
    ghost = make_private(model, opt, loader, privacy, PrivacyLedger("b"), planned_steps=2, seed=0)
    assert isinstance(ghost, GhostPrivateTraining)
