"""FFA-LoRA (Sun et al., ICLR 2024): LoRA with ``A`` frozen at its initialization; only ``B`` trains.

With ``A`` fixed the update ``B @ A`` is linear in the trained tensor, which keeps DP-SGD noise from being
amplified by the product of two noisy factors, and FedAvg of the ``B``s is the exact average of the
updates. The upload halves for square modules (only ``B`` is in the adapter state, see ``state.py``).

Why sending only ``B`` is correct: ``create_adapter`` runs this builder under ``torch.manual_seed(seed)``
with the run seed, so the server and every device build bit-identical ``A`` matrices without ever
exchanging them (peft 0.21 initializes ``A`` on the CPU before moving it to the base layer's device, so a
CPU server and CUDA devices agree). A party that builds its adapter with another seed gets another ``A`` and its ``B`` means
something else: always build FFA-LoRA adapters with the run's seed. Saved adapters (``save_pretrained``)
still hold both ``A`` and ``B``, so they load as ordinary PEFT LoRA adapters.
"""

from __future__ import annotations

from fedtune.adapters.lora import build_lora
from fedtune.adapters.registry import register_adapter


@register_adapter("ffa_lora")
def build_ffa_lora(base_model, cfg):
    model = build_lora(base_model, cfg)  # same modules, ranks and seeded init as LoRA
    frozen = 0
    for name, p in model.named_parameters():
        if ".lora_A." in name:
            p.requires_grad_(False)
            frozen += 1
    if frozen == 0:
        raise ValueError(f"ffa_lora: no lora_A parameters to freeze for target_modules {list(cfg.target_modules)}")
    return model
