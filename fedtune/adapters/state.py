"""Adapter state: the *trainable* adapter tensors, in peft's checkpoint naming, nothing of the base model.

For LoRA and prompt tuning that is every tensor peft saves for the adapter. For FFA-LoRA, whose ``lora_A``
is frozen at its seeded init, it is only the ``lora_B`` tensors: the frozen part is never sent, because
every party rebuilds it identically from the run seed (see ``fedtune.adapters.ffa_lora``).
"""

from __future__ import annotations

import weakref

import torch

from fedtune.types import AdapterState

# model -> (its trainable parameters' (name, id, storage), {state key: parameter name}): peft's key
# mapping walks the whole model (~15 ms for a 30-layer model), every device call needs it twice
_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _unwrap(model):
    # opacus' GradSampleModule keeps the real module in `_module`
    return getattr(model, "_module", model)


def _trainable_adapter_tensors(inner) -> dict[str, torch.Tensor]:
    """peft-named adapter tensors whose parameter has ``requires_grad`` (live tensors, not copies).

    peft's ``get_peft_model_state_dict`` is given only the trainable parameters, so peft itself selects the
    adapter entries and maps parameter names to checkpoint keys (it strips the adapter name:
    ``...q_proj.lora_B.default.weight`` -> ``...q_proj.lora_B.weight``; prompt learning saves its encoder
    as ``prompt_embeddings``). Refuses a model whose trainable parameters are not all in that state, since
    local training would then change tensors that are never uploaded.
    """
    from peft import get_peft_model_state_dict

    params = {n: p for n, p in inner.named_parameters() if p.requires_grad}
    signature = tuple((n, id(p), p.data_ptr()) for n, p in params.items())
    cached = _KEYS.get(inner)
    if cached is not None and cached[0] == signature:  # same trainable parameters: peft's key mapping holds
        return {k: params[n].detach() for k, n in cached[1].items()}
    trainable = {n: p.detach() for n, p in params.items()}
    state = get_peft_model_state_dict(inner, state_dict=trainable)
    n_state = sum(t.numel() for t in state.values())
    n_trainable = sum(t.numel() for t in trainable.values())
    if n_state != n_trainable:
        raise ValueError(
            f"the adapter state holds {n_state} values but the model trains {n_trainable}: trainable parameters "
            f"outside the adapter ({sorted(trainable)[:5]}...) would never be uploaded; freeze base-model "
            "parameters (only adapter tensors may have requires_grad)"
        )
    by_storage = {(p.data_ptr(), tuple(p.shape)): n for n, p in params.items()}
    names = {k: by_storage.get((v.data_ptr(), tuple(v.shape))) for k, v in state.items()}
    if all(names.values()) and len(set(names.values())) == len(names):  # live views (not prompt learning)
        _KEYS[inner] = (signature, names)
    return state


def get_adapter_state(model) -> AdapterState:
    """Detached CPU fp32 copies of the trainable adapter tensors, keyed as peft saves them."""
    state = _trainable_adapter_tensors(_unwrap(model))
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}


def _is_whole(t: torch.Tensor, p: torch.nn.Parameter | None) -> bool:
    """``t`` is all of parameter ``p`` (same storage, offset, shape and strides)."""
    return (p is not None and t.shape == p.shape and t.stride() == p.stride()
            and t.storage_offset() == p.storage_offset())


def set_adapter_state(model, state: AdapterState) -> None:
    """Load the trainable adapter tensors; refuse missing or unexpected keys and shape mismatches.

    Frozen adapter tensors (FFA-LoRA's ``lora_A``) are not part of the state and are left untouched.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    inner = _unwrap(model)
    expected = _trainable_adapter_tensors(inner)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        frozen = sorted(set(extra) & set(get_peft_model_state_dict(inner)))
        hint = (f"; {frozen[:5]} are frozen in this model (e.g. FFA-LoRA's lora_A, rebuilt from the run seed) "
                "and are not part of its state: send only the trainable tensors" if frozen else "")
        raise ValueError(
            f"adapter state does not match the model's adapter: missing {missing[:5]}, "
            f"unexpected {extra[:5]} (was it made with the same adapter config?){hint}"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"adapter tensor {k}: expected shape {tuple(expected[k].shape)}, got {tuple(v.shape)}")
    params = {p.data_ptr(): p for p in inner.parameters() if p.requires_grad}
    live = {k: expected[k] for k in state if _is_whole(expected[k], params.get(expected[k].data_ptr()))}
    if len(live) == len(state):  # LoRA & co: the keys name live parameters, a copy into each is the load
        with torch.no_grad():
            for k, v in state.items():
                live[k].copy_(v)
        return
    set_peft_model_state_dict(inner, state)  # prompt learning: peft maps the saved embedding back
    loaded = _trainable_adapter_tensors(inner)
    wrong = [k for k in state if not torch.equal(loaded[k].to("cpu", state[k].dtype), state[k].to("cpu"))]
    if wrong:
        raise ValueError(f"peft did not load adapter tensors {wrong[:5]}")


def adapter_bytes(state: AdapterState) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())
