"""Adapter state: exactly the tensors peft saves for the adapter, nothing of the base model."""

from __future__ import annotations

import torch

from fedtune.types import AdapterState


def _unwrap(model):
    # opacus' GradSampleModule keeps the real module in `_module`
    return getattr(model, "_module", model)


def get_adapter_state(model) -> AdapterState:
    """Detached CPU fp32 copies of the adapter tensors (peft's get_peft_model_state_dict)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(_unwrap(model))
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}


def set_adapter_state(model, state: AdapterState) -> None:
    """Load adapter tensors; refuse missing or unexpected keys and shape mismatches."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    inner = _unwrap(model)
    expected = get_peft_model_state_dict(inner)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(
            f"adapter state does not match the model's adapter: missing {missing[:5]}, "
            f"unexpected {extra[:5]} (was it made with the same adapter config?)"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"adapter tensor {k}: expected shape {tuple(expected[k].shape)}, got {tuple(v.shape)}")
    set_peft_model_state_dict(inner, state)
    loaded = get_peft_model_state_dict(inner)
    wrong = [k for k in state if not torch.equal(loaded[k].to("cpu", state[k].dtype), state[k].to("cpu"))]
    if wrong:
        raise ValueError(f"peft did not load adapter tensors {wrong[:5]}")


def adapter_bytes(state: AdapterState) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())
