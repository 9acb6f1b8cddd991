"""Prompt tuning (Lester et al., 2021): trainable virtual-token embeddings, through peft."""

from __future__ import annotations

from fedtune.adapters.registry import register_adapter


@register_adapter("prompt_tuning")
def build_prompt_tuning(base_model, cfg):
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

    config = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=cfg.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.RANDOM,
    )
    return get_peft_model(base_model, config)
