"""Attention kernels for small training steps: keep PyTorch's SDPA off cuDNN attention on CUDA.

On an H200 (torch 2.11, 2026-11-28) SDPA picked cuDNN attention for a SmolLM2-shaped step, which spent
1.2-2 ms of CPU per call building its plan: 30 layers x (forward + backward) made it ~15% of a one-device
DP step's CPU time and ~25% of a packed fleet step's, and those steps are CPU-bound (the GPU idles).
Excluding it (flash / memory-efficient / math stay allowed, chosen as usual) raised a packed fleet of 64
devices from 0.47x to 0.55x the tokens/s of one bare model at the same batch (docs/benchmarks.md).

The choice is made at the forward call and the backward follows it, so wrapping the forward is enough;
the context is scoped, nothing global changes. On CPU it does nothing.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch


def training_attention(device: torch.device):
    """A context for the forward passes of a training step on ``device``."""
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
