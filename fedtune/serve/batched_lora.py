"""A gathered batched-LoRA product for peft's mixed-adapter batches (punica/S-LoRA style).

peft routes ``adapter_names=[...]`` to each LoRA layer's ``_mixed_batch_forward``, which loops over the
distinct adapters of the batch: with 32 users on 32 adapters that is 32 small matmul chains per layer and
step, and the batch gains little over serving one adapter at a time. ``StackedLoRA`` replaces that method
on every LoRA layer with two batched matmuls over stacked weights:

    A_all [N+1, r, in], B_all [N+1, out, r] (scaling folded into B; slot 0 = zeros = "__base__")
    idx   [B]            slot of each row's adapter
    y = base(x) + bmm(bmm(x, A_all[idx]^T), B_all[idx]^T)        x [B, T, in] -> y [B, T, out]

peft still owns loading, names and routing; only the arithmetic of the mixed batch changes. Ranks are
zero-padded to the largest (exact: zero rows and columns add nothing). The stacks are rebuilt by the
pool whenever the set of loaded adapters changes (between batches).
"""

from __future__ import annotations

import types

import torch


def _lora_layers(model):
    return [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


def _stacked_forward(self, x: torch.Tensor, *args, adapter_names: list[str], **kwargs) -> torch.Tensor:
    kwargs.pop("alora_offsets", None)
    result = self.base_layer(x, *args, **kwargs)  # [B, T, out]
    idx = self._fedtune_stack.index(adapter_names, x.device)  # [B]
    a = self._fedtune_A[idx]  # [B, r, in]
    b = self._fedtune_B[idx]  # [B, out, r]
    h = torch.bmm(x.to(a.dtype), a.transpose(1, 2))  # [B, T, r]
    return result + torch.bmm(h, b.transpose(1, 2)).to(result.dtype)  # [B, T, out]


def unstack(model) -> None:
    """Give every LoRA layer back peft's own ``_mixed_batch_forward`` (and drop the stacked weights)."""
    for layer in _lora_layers(model):
        for attr in ("_mixed_batch_forward", "_fedtune_A", "_fedtune_B", "_fedtune_stack"):
            layer.__dict__.pop(attr, None)


class StackedLoRA:
    def __init__(self, dtype: torch.dtype | None = None):
        self.dtype = dtype  # None: the dtype of the LoRA weights
        self.slots: dict[str, int] = {}
        self._index: dict[tuple, torch.Tensor] = {}

    def rebuild(self, model, names: list[str]) -> None:
        """Stack the LoRA weights of ``names`` (in this order, slots 1..N) in every LoRA layer of ``model``."""
        self.slots = {n: i + 1 for i, n in enumerate(names)}
        self._index.clear()
        model_dtype = getattr(model, "dtype", None)
        for layer in _lora_layers(model):
            present = [n for n in names if n in layer.lora_A]
            if not present:
                continue
            ref = layer.lora_A[present[0]].weight
            dtype = self.dtype or (model_dtype if model_dtype is not None and model_dtype.is_floating_point
                                   else ref.dtype)
            rank = max(layer.lora_A[n].weight.shape[0] for n in present)
            d_in, d_out = ref.shape[1], layer.lora_B[present[0]].weight.shape[0]
            a_all = torch.zeros(len(names) + 1, rank, d_in, dtype=dtype, device=ref.device)
            b_all = torch.zeros(len(names) + 1, d_out, rank, dtype=dtype, device=ref.device)
            for n in present:
                a, b = layer.lora_A[n].weight, layer.lora_B[n].weight  # [r, in], [out, r]
                a_all[self.slots[n], : a.shape[0]] = a.to(dtype)
                b_all[self.slots[n], :, : b.shape[1]] = (b * layer.scaling[n]).to(dtype)
            layer._fedtune_A, layer._fedtune_B, layer._fedtune_stack = a_all, b_all, self
            layer._mixed_batch_forward = types.MethodType(_stacked_forward, layer)

    def index(self, adapter_names: list[str], device) -> torch.Tensor:
        key = tuple(adapter_names)
        idx = self._index.get(key)
        if idx is None:
            if len(self._index) > 64:
                self._index.clear()
            missing = {n for n in adapter_names if n != "__base__" and n not in self.slots}
            if missing:  # never fall back to the base silently
                raise RuntimeError(f"adapters {sorted(missing)} are not stacked; loaded: {sorted(self.slots)}")
            idx = torch.tensor([self.slots.get(n, 0) for n in adapter_names], dtype=torch.long, device=device)
            self._index[key] = idx
        return idx

    @staticmethod
    def stacked_bytes(model) -> int:
        return sum(l._fedtune_A.nbytes + l._fedtune_B.nbytes for l in _lora_layers(model) if hasattr(l, "_fedtune_A"))
