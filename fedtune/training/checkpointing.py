"""Activation (gradient) checkpointing that opacus accepts: the reentrant kind.

opacus' hooks record a layer's input in the forward pass and pop it in the backward pass. Reentrant
checkpointing runs the first forward under ``no_grad`` (opacus records nothing), then re-runs each
layer with grad on just before its backward (opacus records it once, pops it once), so per-sample
gradients stay exact. The non-reentrant kind records twice and breaks that pairing.

Reentrant checkpointing only back-propagates into a segment whose input requires grad; with a frozen
embedding nothing does, so the embedding output is made to require grad
(``enable_input_require_grads``, as peft's ``prepare_model_for_kbit_training`` does).
"""

from __future__ import annotations


def _causal(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def set_gradient_checkpointing(model, enabled: bool) -> None:
    """Turn reentrant checkpointing of the decoder layers on or off (idempotent; the model is cached)."""
    causal = _causal(model)
    on = getattr(causal, "is_activation_checkpointing", None)  # transformers >= 5.2x; earlier: is_gradient_...
    if enabled == bool(on if on is not None else getattr(causal, "is_gradient_checkpointing", False)):
        return
    if not getattr(causal, "supports_gradient_checkpointing", False):
        raise ValueError(f"train.gradient_checkpointing: {type(causal).__name__} does not support it; "
                         "set train.gradient_checkpointing=false")
    if enabled:
        causal.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        if getattr(causal, "_require_grads_hook", None) is None:
            causal.enable_input_require_grads()
    else:
        causal.gradient_checkpointing_disable()
        if getattr(causal, "_require_grads_hook", None) is not None:
            causal.disable_input_require_grads()
