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


def _layers(causal) -> list:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in causal.modules() if isinstance(m, GradientCheckpointingLayer)]


def set_gradient_checkpointing(model, enabled: bool, every_n_layers: int = 1) -> None:
    """Turn reentrant checkpointing of the decoder layers on or off (idempotent; the model is cached).

    ``every_n_layers`` > 1 checkpoints only layers 0, n, 2n, ...: the others keep their activations, so
    the step recomputes 1/n of the forward instead of all of it, for n-1/n of the memory saved."""
    if every_n_layers < 1:
        raise ValueError(f"train.checkpoint_every_n_layers must be >= 1, got {every_n_layers}")
    causal = _causal(model)
    layers = _layers(causal)
    want = [enabled and i % every_n_layers == 0 for i in range(len(layers))]
    if [bool(getattr(m, "gradient_checkpointing", False)) for m in layers] == want and (
            enabled == (getattr(causal, "_require_grads_hook", None) is not None)):
        return
    if not getattr(causal, "supports_gradient_checkpointing", False):
        raise ValueError(f"train.gradient_checkpointing: {type(causal).__name__} does not support it; "
                         "set train.gradient_checkpointing=false")
    if enabled:
        if getattr(causal, "_require_grads_hook", None) is not None:  # re-enabling adds its own: one only
            causal.disable_input_require_grads()
        causal.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True},
                                             every_n_layers=every_n_layers)
        if getattr(causal, "_require_grads_hook", None) is None:
            causal.enable_input_require_grads()
    else:
        causal.gradient_checkpointing_disable()
        if getattr(causal, "_require_grads_hook", None) is not None:
            causal.disable_input_require_grads()
