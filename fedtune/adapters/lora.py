"""LoRA (Hu et al., 2021) through peft."""

from __future__ import annotations

from fedtune.adapters.registry import register_adapter


@register_adapter("lora")
def build_lora(base_model, cfg):
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in base_model.named_modules()}
    missing = [m for m in cfg.target_modules if m not in names]
    if missing:
        raise ValueError(
            f"adapter.target_modules {missing} are not modules of this model; "
            f"linear layers here include {sorted(n for n in names if n.endswith('proj'))}"
        )
    config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base_model, config)
