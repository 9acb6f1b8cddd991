"""Ghost clipping for peft LoRA: per-sample norms and clipped sums from hooks on the lora_A / lora_B linears.

peft's LoRA linear computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``. A forward hook on each
trainable ``lora_A`` / ``lora_B`` ``nn.Linear`` keeps its input a [B, T, d] and registers a hook on its
output that keeps the output gradient g [B, T, p] when the backward pass reaches it. So for lora_A,
a = dropout(x) and g = the gradient of lora_B's input; for lora_B, a = x A^T (r-dim) and g = the layer's
output gradient times ``scaling``: exactly the two factors whose product is each sample's weight gradient.
When the output gradient arrives the hook keeps, per layer, whichever is smaller (``choose_storage``): the
factors (a, g), or the per-sample gradient g_i^T a_i [B, p, d] (then a and g are let go). After the
backward pass, ``clipped_sums`` turns them into per-sample norms over every LoRA factor (Gram or direct form
for factors) and the sum of clipped per-sample gradients (``fedtune.privacy.ghost.norms``). No second
backward runs, and no per-sample gradient larger than its layer's factors is ever held.

With reentrant gradient checkpointing the first forward runs without grad (nothing is kept) and the
recompute inside backward is what the hooks see. A module called twice in one forward contributes the
concatenation of its calls along T, which is exact (g1^T a1 + g2^T a2 = [g1; g2]^T [a1; a2]), or the sum
of its calls' per-sample gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from fedtune.privacy.ghost.norms import (
    NormMode,
    choose_storage,
    clip_factors,
    clipped_weight_grad,
    per_sample_grads,
    per_sample_sq_norms,
)


def lora_linears(model: nn.Module) -> list[nn.Linear]:
    """Every trainable ``lora_A`` / ``lora_B`` linear of a peft LoRA model, in module order."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if getattr(module, "lora_variant", None) or any(getattr(module, "use_dora", {}).values()):
            raise ValueError(f"ghost clipping covers plain LoRA; {name} uses a LoRA variant (DoRA or another "
                             "lora_variant); use privacy.clipping=hooks")
        for adapter in module.lora_A:
            for linear in (module.lora_A[adapter], module.lora_B[adapter]):
                if not isinstance(linear, nn.Linear) or linear.bias is not None:
                    raise ValueError(f"ghost clipping needs bias-free nn.Linear LoRA factors; {name} has "
                                     f"{type(linear).__name__} (bias={getattr(linear, 'bias', None) is not None}); "
                                     "use privacy.clipping=hooks")
                if linear.weight.requires_grad:
                    out.append(linear)
    return out


class _Kept:
    """What one LoRA factor's hooks kept this step: a summed per-sample gradient, and/or factor pairs."""

    def __init__(self):
        self.grad: torch.Tensor | None = None  # [B, p, d]
        self.factors: list[tuple[torch.Tensor, torch.Tensor]] = []  # [(a [B, T, d], g [B, T, p])]

    def batch(self) -> int | None:
        return self.grad.shape[0] if self.grad is not None else self.factors[0][0].shape[0] if self.factors else None


class GhostClipper:
    """Hooks on a LoRA model's trainable factors; clipped per-sample gradient sums after each backward.

    ``params`` fixes the order of the returned sums (the optimizer's order). ``loss_reduction`` "mean"
    means the loss was averaged over the batch, so each sample's gradient is B times what backward
    delivers (as opacus does). ``mode``: ``auto`` keeps the smaller of factors and per-sample gradient per
    layer and takes the cheaper norm form; ``gram`` / ``direct`` keep factors and force that norm form;
    ``per_sample`` keeps per-sample gradients everywhere (tests force each).
    """

    def __init__(self, model: nn.Module, params: list[torch.nn.Parameter], loss_reduction: str = "mean",
                 mode: NormMode = "auto"):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if mode not in ("auto", "gram", "direct", "per_sample"):
            raise ValueError(f"mode must be 'auto', 'gram', 'direct' or 'per_sample', got {mode!r}")
        by_weight = {id(m.weight): m for m in lora_linears(model)}
        names = {id(p): n for n, p in model.named_parameters()}
        uncovered = [names.get(id(p), "?") for p in params if id(p) not in by_weight]
        if uncovered:
            raise ValueError(f"ghost clipping computes norms of LoRA A/B weights only; these trainable tensors "
                             f"are not LoRA linear weights: {uncovered[:3]}{'...' if len(uncovered) > 3 else ''}; "
                             "use privacy.clipping=hooks")
        self.modules = [by_weight[id(p)] for p in params]
        self.loss_reduction = loss_reduction
        self.mode: NormMode = mode
        self._kept: dict[nn.Module, _Kept] = {m: _Kept() for m in self.modules}
        self._handles = [m.register_forward_hook(self._capture) for m in self.modules]
        self.last_norms: torch.Tensor | None = None  # [B] per-sample norms of the last clipped step

    def _capture(self, module: nn.Module, args, output: torch.Tensor) -> None:
        if not (torch.is_grad_enabled() and output.requires_grad):
            return  # evaluation, or the no-grad first pass of reentrant checkpointing
        a = args[0].detach()  # [B, T, d]
        kept = self._kept[module]

        def on_grad(g: torch.Tensor) -> None:  # g [B, T, p]
            g = g.detach()
            if a.dim() != 3 or g.dim() != 3:
                raise ValueError(f"ghost clipping needs batch-first [B, T, features] LoRA inputs; got "
                                 f"{tuple(a.shape)}; use privacy.clipping=hooks")
            if self.mode == "per_sample" or (self.mode == "auto" and
                                              choose_storage(a.shape[1], a.shape[2], g.shape[2]) == "per_sample"):
                grad = per_sample_grads(a, g)  # [B, p, d]
                kept.grad = grad if kept.grad is None else kept.grad + grad
            else:
                kept.factors.append((a, g))

        output.register_hook(on_grad)

    def _sq_norms(self, kept: _Kept) -> torch.Tensor:
        if kept.grad is not None:
            for a, g in kept.factors:  # a layer seen at two lengths: fold its factors into the gradient
                kept.grad = kept.grad + per_sample_grads(a, g)
            kept.factors = []
            return kept.grad.pow(2).sum((1, 2))  # [B]
        a, g = kept.factors[0] if len(kept.factors) == 1 else (torch.cat([a for a, _ in kept.factors], 1),
                                                               torch.cat([g for _, g in kept.factors], 1))
        kept.factors = [(a, g)]  # along T
        return per_sample_sq_norms(a, g, self.mode if self.mode in ("gram", "direct") else "auto")

    @staticmethod
    def _clipped(kept: _Kept, clip: torch.Tensor) -> torch.Tensor:
        if kept.grad is not None:
            return (clip.to(kept.grad.dtype) @ kept.grad.flatten(1)).view(kept.grad.shape[1:])  # [p, d]
        a, g = kept.factors[0]
        return clipped_weight_grad(a, g, clip)  # [p, d]

    def clipped_sums(self, max_grad_norm: float) -> list[torch.Tensor]:
        """sum_i c_i grad_i per parameter (zeros when nothing was recorded: an empty batch), then forget."""
        kept = [self._kept[m] for m in self.modules]
        batch = {k.batch() for k in kept} - {None}
        if not batch:
            self.last_norms = None
            return [torch.zeros_like(m.weight) for m in self.modules]
        if len(batch) != 1:
            raise RuntimeError(f"LoRA layers saw different batch sizes {sorted(batch)} in one step; ghost clipping "
                               "needs one batch through every layer per step")
        n = batch.pop()
        scale = float(n) if self.loss_reduction == "mean" else 1.0  # sample i's gradient = scale * its share
        device = self.modules[0].weight.device
        acc = torch.promote_types(self.modules[0].weight.dtype, torch.float32)
        sq = torch.zeros(n, device=device, dtype=acc)  # [B]
        for k in kept:
            if k.batch() is not None:
                sq += self._sq_norms(k).to(acc)
        norms = sq.sqrt() * scale  # [B]
        clip = clip_factors(norms.square(), max_grad_norm) * scale  # [B]
        sums = [self._clipped(k, clip).to(m.weight.dtype) if k.batch() is not None else torch.zeros_like(m.weight)
                for m, k in zip(self.modules, kept)]
        self.last_norms = norms
        self.reset()
        return sums

    def reset(self) -> None:
        for k in self._kept.values():  # in place: a hook registered in this step's forward writes to it
            k.grad, k.factors = None, []

    def close(self) -> None:
        """Remove the hooks and what they kept; the (cached) model is reused by the next call."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.reset()
