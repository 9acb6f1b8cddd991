"""Blockwise symmetric int8 quantization of a flat vector: one fp32 scale per ``BLOCK`` values.

At BLOCK=256 the scales add 4/256 bytes per value: 1.016 bytes per value against fp32's 4 (3.94x).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BLOCK = 256


def quantize_blockwise(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (any shape) -> (q [n] int8, scale [ceil(n / block)] fp32) with x ~= q * scale per block."""
    flat = x.detach().reshape(-1).to(torch.float32)  # [n]
    n = flat.numel()
    nb = max(1, math.ceil(n / block))
    blocks = F.pad(flat, (0, nb * block - n)).view(nb, block)  # [nb, block]
    scale = blocks.abs().amax(dim=1) / 127.0  # [nb]
    q = torch.round(blocks / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).clamp_(-127, 127)
    return q.to(torch.int8).reshape(-1)[:n], scale


def dequantize_blockwise(q: torch.Tensor, scale: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """(q [n] int8, scale [nb]) -> [n] fp32."""
    n = q.numel()
    nb = scale.numel()
    if nb != max(1, math.ceil(n / block)):
        raise ValueError(f"int8 payload: {n} values need {math.ceil(n / block)} scales of block {block}, got {nb}")
    blocks = F.pad(q.reshape(-1).to(torch.float32), (0, nb * block - n)).view(nb, block)
    return (blocks * scale.to(torch.float32)[:, None]).reshape(-1)[:n]
