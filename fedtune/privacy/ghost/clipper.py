"""Ghost clipping for peft LoRA: per-sample norms and clipped sums from hooks on the lora_A / lora_B linears.

peft's LoRA linear computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``. A forward hook on each
trainable ``lora_A`` / ``lora_B`` ``nn.Linear`` keeps its input a [B, T, d] and registers a hook on its
output that keeps the output gradient g [B, T, p] when the backward pass reaches it. So for lora_A,
a = dropout(x) and g = the gradient of lora_B's input; for lora_B, a = x A^T (r-dim) and g = the layer's
output gradient times ``scaling``: exactly the two factors whose product is each sample's weight gradient.
After the backward pass, ``clipped_sums`` turns them into per-sample norms over every LoRA factor and
the sum of clipped per-sample gradients (``fedtune.privacy.ghost.norms``); no per-sample gradient is
stored and no second backward runs.

With reentrant gradient checkpointing the first forward runs without grad (nothing is kept) and the
recompute inside backward is what the hooks see. A module called twice in one forward contributes the
concatenation of its calls along T, which is exact (g1^T a1 + g2^T a2 = [g1; g2]^T [a1; a2]).
"""

from __future__ import annotations

import torch
from torch import nn

from fedtune.privacy.ghost.norms import NormMode, clip_factors, clipped_weight_grad, per_sample_sq_norms


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


class GhostClipper:
    """Hooks on a LoRA model's trainable factors; clipped per-sample gradient sums after each backward.

    ``params`` fixes the order of the returned sums (the optimizer's order). ``loss_reduction`` "mean"
    means the loss was averaged over the batch, so each sample's gradient is B times what backward
    delivers (as opacus does). ``mode`` forces the norm form (``auto``: the cheaper one per layer).
    """

    def __init__(self, model: nn.Module, params: list[torch.nn.Parameter], loss_reduction: str = "mean",
                 mode: NormMode = "auto"):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
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
        self._records: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in self.modules}
        self._handles = [m.register_forward_hook(self._capture) for m in self.modules]
        self.last_norms: torch.Tensor | None = None  # [B] per-sample norms of the last clipped step

    def _capture(self, module: nn.Module, args, output: torch.Tensor) -> None:
        if not (torch.is_grad_enabled() and output.requires_grad):
            return  # evaluation, or the no-grad first pass of reentrant checkpointing
        a = args[0].detach()  # [B, T, d]
        records = self._records[module]
        output.register_hook(lambda g: records.append((a, g.detach())))  # g [B, T, p]

    def _factors(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        records = self._records[module]
        if not records:
            return None
        if len(records) == 1:
            return records[0]
        return torch.cat([a for a, _ in records], 1), torch.cat([g for _, g in records], 1)  # along T

    def clipped_sums(self, max_grad_norm: float) -> list[torch.Tensor]:
        """sum_i c_i grad_i per parameter (zeros when nothing was recorded: an empty batch), then forget."""
        factors = [self._factors(m) for m in self.modules]
        present = [f for f in factors if f is not None]
        if not present:
            self.last_norms = None
            return [torch.zeros_like(m.weight) for m in self.modules]
        batch = {a.shape[0] for a, _ in present}
        if len(batch) != 1:
            raise RuntimeError(f"LoRA layers saw different batch sizes {sorted(batch)} in one step; ghost clipping "
                               "needs one batch through every layer per step")
        n = batch.pop()
        scale = float(n) if self.loss_reduction == "mean" else 1.0  # sample i's gradient = scale * its share
        acc = torch.promote_types(present[0][0].dtype, torch.float32)
        sq = torch.zeros(n, device=present[0][0].device, dtype=acc)  # [B]
        for a, g in present:
            sq += per_sample_sq_norms(a, g, self.mode).to(acc)
        norms = sq.sqrt() * scale  # [B]
        clip = clip_factors(norms.square(), max_grad_norm) * scale  # [B]
        sums = [clipped_weight_grad(f[0], f[1], clip).to(m.weight.dtype) if f is not None
                else torch.zeros_like(m.weight) for m, f in zip(self.modules, factors)]
        self.last_norms = norms
        self.reset()
        return sums

    def reset(self) -> None:
        for records in self._records.values():
            records.clear()

    def close(self) -> None:
        """Remove the hooks and what they kept; the (cached) model is reused by the next call."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.reset()
