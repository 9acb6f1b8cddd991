"""Pack a peft LoRA model for K devices: swap each LoRA linear for a :class:`PackedLoraLinear`.

The worker's cached model (base + peft LoRA) is borrowed, not copied: inside ``packed_lora(model, K)``
every peft LoRA linear is replaced by a packed layer around the *same* base layer, and on exit the peft
layers are put back untouched (the packed engine never writes the peft adapter). Adapter states keep
peft's checkpoint keys (``<module>.lora_A.weight`` / ``<module>.lora_B.weight``), so a packed device's
update is keyed exactly like ``fedtune.adapters.get_adapter_state`` of one-at-a-time training.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from fedtune.packed.layer import PackedBatch, PackedLoraLinear
from fedtune.types import AdapterState


@dataclass
class PackedModel:
    lm: torch.nn.Module  # the HF causal LM whose LoRA linears are packed
    layers: dict[str, PackedLoraLinear]  # peft module name -> packed layer, in module order
    batch: PackedBatch
    num_devices: int

    def params_in_order(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(state key, stacked parameter [K, ...]) in peft's trainable-parameter order (per module: A, B).

        This is the order of the optimizer's parameters in one-at-a-time training, hence of the flat
        DP noise vector (``fedtune.privacy.noise``).
        """
        out = []
        for name, layer in self.layers.items():
            out += [(f"{name}.lora_A.weight", layer.lora_A), (f"{name}.lora_B.weight", layer.lora_B)]
        return out

    def load(self, states: list[AdapterState]) -> None:
        """Device k's adapter state into slot k (one host-to-device copy per tensor); keys and shapes must match."""
        params = dict(self.params_in_order())
        if len(states) != self.num_devices:
            raise ValueError(f"expected {self.num_devices} adapter states (one per packed device), got {len(states)}")
        for k, state in enumerate(states):
            missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
            if missing or extra:
                raise ValueError(f"adapter state of packed device {k} does not match the model's LoRA: missing "
                                 f"{missing[:3]}, unexpected {extra[:3]} (was it made with the same adapter config?)")
            for key, p in params.items():
                if tuple(state[key].shape) != tuple(p.shape[1:]):
                    raise ValueError(f"adapter tensor {key} of packed device {k}: expected shape "
                                     f"{tuple(p.shape[1:])}, got {tuple(state[key].shape)}")
        with torch.no_grad():
            for key, p in params.items():
                p.copy_(torch.stack([s[key] for s in states]).to(p.device, p.dtype))  # [K, ...]

    def states(self) -> list[AdapterState]:
        """Every device's adapter: detached CPU fp32 copies, as ``get_adapter_state`` returns them."""
        params = self.params_in_order()
        k_dev = self.num_devices
        # one device-to-host copy of [K, P] (P: one device's adapter size), then per device one clone of
        # its row, split into views: K copies instead of K x (number of tensors), each state in its own storage
        flat = torch.cat([p.detach().reshape(k_dev, -1) for _, p in params], dim=1).to("cpu", torch.float32)
        sizes = [p[0].numel() for _, p in params]
        states = []
        for k in range(k_dev):
            parts = flat[k].clone().split(sizes)
            states.append({key: t.view(p.shape[1:]) for (key, p), t in zip(params, parts)})
        return states


@dataclass(frozen=True)
class FrozenBranch:
    """A LoRA branch every packed device shares, frozen, next to its own trained one (FedDPA dual adapters,
    ``fedtune.personalization.dual``): each layer computes base(x) + α·s·B_k A_k x + (1-α)·s·B_g A_g x,
    ``state`` holding A_g, B_g under the model's adapter keys and ``alpha`` the trained branch's weight."""

    state: AdapterState
    alpha: float


def _lora_modules(peft_model) -> list[tuple[str, torch.nn.Module]]:
    from peft.tuners.lora import LoraLayer

    mods = [(n, m) for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    if not mods:
        raise ValueError("packed training needs a LoRA model (adapter.method: lora); this model has no LoRA layers")
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    expected = {f"{n}.lora_{ab}.default.weight" for n, _ in mods for ab in "AB"}
    if trainable != expected:
        raise ValueError(
            "packed training supports plain LoRA where exactly lora_A and lora_B train (adapter.method: lora); "
            f"this model trains {sorted(trainable - expected)[:3]} and freezes {sorted(expected - trainable)[:3]}"
        )
    for n, m in mods:
        if list(m.lora_A) != ["default"] or "default" in getattr(m, "lora_variant", {}):
            raise ValueError(f"{n}: packed training supports one plain LoRA adapter named 'default' (no DoRA)")
        drop = m.lora_dropout["default"]
        if not isinstance(drop, torch.nn.Identity) and getattr(drop, "p", 0.0) > 0:
            raise ValueError(f"{n}: packed training needs adapter.dropout: 0 (dropout draws from the global "
                             "RNG, which packed and one-at-a-time training cannot share); set adapter.dropout: 0")
        if m.lora_A["default"].bias is not None or m.lora_B["default"].bias is not None:
            raise ValueError(f"{n}: packed training supports LoRA without bias (lora_bias: false)")
    return mods


@contextmanager
def packed_lora(model, num_devices: int, frozen: FrozenBranch | None = None) -> Iterator[PackedModel]:
    """Borrow ``model`` (a peft LoRA model, possibly wrapped) as a packed model for ``num_devices``; with
    ``frozen``, every layer also adds that shared frozen branch and scales the devices' own by its α."""
    if num_devices < 1:
        raise ValueError(f"a packed fleet needs at least one device, got {num_devices}")
    if frozen is not None and not 0.0 <= frozen.alpha <= 1.0:
        raise ValueError(f"the frozen branch's mixing weight must lie in [0, 1], got {frozen.alpha}")
    peft_model = getattr(model, "_module", model)
    mods = _lora_modules(peft_model)
    batch = PackedBatch(num_devices=num_devices)
    layers: dict[str, PackedLoraLinear] = {}
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    try:
        for name, m in mods:
            A = m.lora_A["default"].weight  # [r, in]
            B = m.lora_B["default"].weight  # [out, r]
            scale = m.scaling["default"]
            layer = PackedLoraLinear(m.base_layer, num_devices, A.shape[0],
                                     scale if frozen is None else frozen.alpha * scale, A.shape[1],
                                     B.shape[0], batch, device=A.device, dtype=A.dtype)
            if frozen is not None:
                keys = (f"{name}.lora_A.weight", f"{name}.lora_B.weight")
                missing = [k for k in keys if k not in frozen.state]
                if missing:
                    raise ValueError(f"the frozen branch's state lacks {missing[0]}: it must be an adapter state "
                                     "of this model (fedtune.adapters.get_adapter_state)")
                layer.frozen = tuple(frozen.state[k].to(A.device, A.dtype) for k in keys) + (
                    (1.0 - frozen.alpha) * scale,)
            parent_name, _, child = name.rpartition(".")
            parent = peft_model.get_submodule(parent_name)
            setattr(parent, child, layer)
            swapped.append((parent, child, m))
            layers[name] = layer
        yield PackedModel(lm=peft_model.get_base_model(), layers=layers, batch=batch, num_devices=num_devices)
    finally:
        for parent, child, m in reversed(swapped):
            setattr(parent, child, m)
