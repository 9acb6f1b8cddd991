"""Per-sample gradient norms and clipped sums of a linear map, from its inputs and output gradients only.

For a linear map y = a W^T (no bias) applied to sample i's tokens a_i [T, d], with output gradient
g_i [T, p], sample i's weight gradient is G_i = g_i^T a_i [p, d]. Its squared norm is computed one of
two ways, whichever is cheaper for the layer (Li et al. 2022, "ghost clipping"; Bu et al. 2023):

    gram:    ||G_i||^2 = sum_{t,s} (a_t . a_s)(g_t . g_s)      O(T^2 (d + p)) work, [T, T] per sample
    direct:  ||G_i||^2 = ||g_i^T a_i||^2                        O(T d p) work, [p, d] per sample (freed at once)

Li et al.'s rule picks gram when 2 T^2 < d p. For LoRA factors d p = r * width is small (r = 8, width 576:
4,608), so the direct form wins from T = 48 tokens up; gram wins on short sequences or large ranks.

The clipped sum sum_i c_i G_i = (c g)^T a over every token of the batch is one matmul of the stored inputs
and output gradients ("book-keeping", Bu et al. 2023): no second backward, no per-sample gradient kept.
Tokens whose output gradient is zero (padding that no loss and no attended position reaches) add nothing
to either.

What to keep until every layer's norm is known is a memory choice per layer (Bu et al.'s hybrid): the
factors a, g cost T (d + p) floats a sample, the per-sample gradient G_i costs d p. For LoRA, d p = r (d + p)
at most, so whenever r < T the per-sample gradient is the smaller one (r = 8 against T = 128: 16x smaller;
the 1B all-linear case at 8 x 1024 would keep ~19 GiB of fp32 factors against 0.35 GiB of per-sample
gradients). ``choose_storage`` picks the smaller; with per-sample storage the direct form computes G_i once,
its norm and the clipped sum c^T G both come from it, and a, g are released as soon as the hook has run.
"""

from __future__ import annotations

from typing import Literal

import torch

NormMode = Literal["auto", "gram", "direct", "per_sample"]


def choose_mode(tokens: int, d_in: int, d_out: int) -> Literal["gram", "direct"]:
    """Li et al. 2022's rule: the [T, T] Gram form when 2 T^2 < d_in * d_out, else the direct form."""
    return "gram" if 2 * tokens * tokens < d_in * d_out else "direct"


def choose_storage(tokens: int, d_in: int, d_out: int) -> Literal["per_sample", "factors"]:
    """Keep G_i [d_out, d_in] when it is no larger than the factors a_i, g_i [T, d_in + d_out]."""
    return "per_sample" if d_in * d_out <= tokens * (d_in + d_out) else "factors"


def per_sample_grads(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """G_i = g_i^T a_i for a [B, T, d], g [B, T, p]; returns [B, p, d]."""
    return torch.bmm(g.transpose(1, 2), a)


def per_sample_sq_norms(a: torch.Tensor, g: torch.Tensor, mode: NormMode = "auto") -> torch.Tensor:
    """||g_i^T a_i||_F^2 for each sample i of a [B, T, d] and g [B, T, p]; returns [B] in a's dtype."""
    if a.dim() != 3 or g.dim() != 3 or a.shape[:2] != g.shape[:2]:
        raise ValueError(f"ghost norms need batch-first [B, T, d] inputs and [B, T, p] output gradients of the "
                         f"same B and T; got {tuple(a.shape)} and {tuple(g.shape)}")
    if mode == "auto":
        mode = choose_mode(a.shape[1], a.shape[2], g.shape[2])
    if mode == "gram":
        aa = torch.bmm(a, a.transpose(1, 2))  # [B, T, T]
        gg = torch.bmm(g, g.transpose(1, 2))  # [B, T, T]
        return (aa * gg).sum((1, 2))  # [B]
    if mode == "direct":
        return per_sample_grads(a, g).pow(2).sum((1, 2))  # [B, p, d] -> [B]
    raise ValueError(f"norm form must be 'auto', 'gram' or 'direct', got {mode!r}")


def clipped_weight_grad(a: torch.Tensor, g: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """sum_i clip_i g_i^T a_i for a [B, T, d], g [B, T, p], clip [B]; returns [p, d] (a Linear's weight shape)."""
    gc = g * clip.to(g.dtype).view(-1, 1, 1)  # [B, T, p]
    return gc.reshape(-1, gc.shape[-1]).t() @ a.reshape(-1, a.shape[-1])  # [p, d]


def clip_factors(sq_norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """opacus' flat clipping factor min(1, C / (||g_i|| + 1e-6)) from squared norms [B]."""
    return (max_grad_norm / (sq_norms.sqrt() + 1e-6)).clamp(max=1.0)
