import pytest
import torch

from fedtune.adapters import adapter_bytes, create_adapter, get_adapter_state, set_adapter_state
from fedtune.models import load_base_model
from tests.conftest import make_config


def _model(**adapter):
    cfg = make_config(adapter=adapter)
    base, _ = load_base_model(cfg.model)
    return create_adapter(base, cfg.adapter, seed=0), cfg


def test_lora_state_holds_only_adapter_tensors():
    model, cfg = _model()
    state = get_adapter_state(model)
    n_layers = cfg.model.tiny.num_hidden_layers
    assert len(state) == n_layers * 2 * 2  # q,v x A,B
    assert all(("lora_A" in k or "lora_B" in k) for k in state)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(t.numel() for t in state.values()) == trainable
    assert adapter_bytes(state) == trainable * 4


def test_set_get_roundtrip_and_changes_output():
    model, _ = _model()
    state = get_adapter_state(model)
    new = {k: torch.randn_like(v) * 0.1 for k, v in state.items()}
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        before = model(input_ids=x).logits
        set_adapter_state(model, new)
        after = model(input_ids=x).logits
    assert not torch.allclose(before, after)
    got = get_adapter_state(model)
    assert all(torch.equal(got[k], new[k]) for k in new)


def test_set_rejects_mismatched_state():
    model, _ = _model()
    state = get_adapter_state(model)
    key = next(iter(state))
    with pytest.raises(ValueError, match="missing"):
        set_adapter_state(model, {k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match="expected shape"):
        set_adapter_state(model, dict(state, **{key: torch.zeros(3, 3)}))


def test_same_seed_same_init():
    m1, _ = _model()
    m2, _ = _model()
    s1, s2 = get_adapter_state(m1), get_adapter_state(m2)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_prompt_tuning_state_is_the_prompt_embedding():
    model, cfg = _model(method="prompt_tuning", num_virtual_tokens=5)
    state = get_adapter_state(model)
    assert list(state) == ["prompt_embeddings"]
    assert state["prompt_embeddings"].shape == (5, cfg.model.tiny.hidden_size)


def test_unknown_target_module_is_explained():
    with pytest.raises(ValueError, match="not modules of this model"):
        _model(target_modules=["query"])


def test_cached_key_mapping_follows_a_change_of_trainable_parameters():
    """The state-key mapping is cached per model; freezing a factor must change the state, not reuse it."""
    model, _ = _model()
    state = get_adapter_state(model)
    frozen = next(k for k in state if "lora_A" in k)
    param = next(p for n, p in model.named_parameters() if n.startswith(frozen.rsplit(".weight", 1)[0]))
    param.requires_grad_(False)
    assert frozen not in get_adapter_state(model)
    with pytest.raises(ValueError, match="unexpected"):
        set_adapter_state(model, state)
    param.requires_grad_(True)
    assert set(get_adapter_state(model)) == set(state)


def test_prompt_tuning_state_loads_through_peft():
    model, _ = _model(method="prompt_tuning", num_virtual_tokens=5)
    new = {k: torch.randn_like(v) for k, v in get_adapter_state(model).items()}
    set_adapter_state(model, new)
    assert torch.equal(get_adapter_state(model)["prompt_embeddings"], new["prompt_embeddings"])
