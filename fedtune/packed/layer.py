"""A multi-adapter LoRA linear: one shared base layer, K devices' LoRA factors, each sample its own.

    y[i] = base(x[i]) + scale * (x[i] @ A[dev[i]].T) @ B[dev[i]].T

The base layer (plain or bitsandbytes-quantized) is shared by every device; ``A`` [K, r, in] and
``B`` [K, out, r] stack the K devices' factors. ``dev`` [N] says which device each sample of the packed
batch belongs to. The backward pass computes each sample's exact gradient of A and B from the layer's
input and output gradient (the LoRA factors are linear maps, so no second backward is needed):

    dB_i = scale * sum_t g[i,t] (x A_i^T)[i,t]^T          [out, r]
    dA_i = sum_t (scale * g[i,t] B_i)^T x[i,t]            [r, in]

Without DP they are summed per device into ``A.grad`` / ``B.grad``; with DP they are kept per sample
(``grad_samples``) for per-device clipping and noise (``fedtune.packed.grad_sample``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class PackedBatch:
    """What every packed layer needs to know about the current micro-batch (shared, set per forward)."""

    dev: torch.Tensor | None = None  # [N] int64: device of each sample
    per_sample: bool = False  # DP: keep per-sample gradients instead of per-device sums
    num_devices: int = 0


class _PackedLora(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, B, layer):  # x [N, T, in], A [K, r, in], B [K, out, r]
        dev = layer.batch.dev
        A_sel = A.index_select(0, dev)  # [N, r, in]
        B_sel = B.index_select(0, dev)  # [N, out, r]
        u = torch.bmm(x, A_sel.transpose(1, 2))  # [N, T, r]
        y = torch.bmm(u, B_sel.transpose(1, 2)) * layer.scale  # [N, T, out]
        ctx.save_for_backward(x, u, A_sel, B_sel, dev)
        ctx.layer = layer
        return y

    @staticmethod
    def backward(ctx, g):  # g [N, T, out]
        x, u, A_sel, B_sel, dev = ctx.saved_tensors
        layer = ctx.layer
        gs = g.to(u.dtype) * layer.scale  # [N, T, out]
        gu = torch.bmm(gs, B_sel)  # [N, T, r]
        gx = torch.bmm(gu, A_sel) if ctx.needs_input_grad[0] else None  # [N, T, in]
        ps_B = torch.bmm(gs.transpose(1, 2), u)  # [N, out, r]
        ps_A = torch.bmm(gu.transpose(1, 2), x)  # [N, r, in]
        if layer.batch.per_sample:
            layer.grad_samples.append((dev, ps_A, ps_B))
            return gx, None, None, None
        k = layer.batch.num_devices
        gA = ps_A.new_zeros((k, *ps_A.shape[1:])).index_add_(0, dev, ps_A)  # [K, r, in]
        gB = ps_B.new_zeros((k, *ps_B.shape[1:])).index_add_(0, dev, ps_B)  # [K, out, r]
        return gx, gA, gB, None


class PackedLoraLinear(nn.Module):
    """Stands in for one peft LoRA linear while a packed fleet trains; ``base_layer`` is peft's own."""

    def __init__(self, base_layer: nn.Module, num_devices: int, rank: int, scale: float,
                 in_features: int, out_features: int, batch: PackedBatch, device, dtype=torch.float32):
        super().__init__()
        self.base_layer = base_layer
        self.scale = float(scale)
        self.batch = batch
        self.lora_A = nn.Parameter(torch.zeros(num_devices, rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(num_devices, out_features, rank, device=device, dtype=dtype))
        self.grad_samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        # a frozen LoRA branch shared by every device (FedDPA's global adapter next to the private one being
        # trained): (A [r, in], B [out, r], scale); it passes gradients to its input, has none of its own
        self.frozen: tuple[torch.Tensor, torch.Tensor, float] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [N, T, in]
        result = self.base_layer(x)  # [N, T, out]
        dtype = result.dtype
        if x.dim() != 3 or self.batch.dev is None or self.batch.dev.shape[0] != x.shape[0]:
            raise ValueError(f"a packed LoRA layer needs a batch-first [N, T, in] input with the device of "
                             f"each of its N samples set; got input {tuple(x.shape)}, devices "
                             f"{None if self.batch.dev is None else tuple(self.batch.dev.shape)}")
        delta = _PackedLora.apply(x.to(self.lora_A.dtype), self.lora_A, self.lora_B, self)  # [N, T, out]
        result = result + delta
        if self.frozen is not None:  # after the trained branch, as peft adds its active adapters in order
            A, B, scale = self.frozen
            result = result + (x.to(A.dtype) @ A.T @ B.T) * scale
        return result.to(dtype)

    def take_grad_samples(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dev [N], dA [N, r, in], dB [N, out, r]) of every micro-batch since the last call."""
        if not self.grad_samples:
            raise RuntimeError("no per-sample gradients were recorded: run a backward pass in per-sample mode")
        dev, ps_A, ps_B = (torch.cat(parts) for parts in zip(*self.grad_samples))
        self.grad_samples = []
        return dev, ps_A, ps_B

