"""A second trainable copy of a peft model that shares the frozen base: one model in memory, two adapters.

Devices that train side by side in one process (``fedtune.federation.concurrent``) each need their own
module tree (their own LoRA tensors, optimizer, autograd graph and hooks), but not their own base weights:
those are frozen and only read. ``frozen_sharing_copy`` deep-copies the module tree with every frozen
parameter and every buffer mapped to the original tensor (``copy.deepcopy``'s memo), so only the trainable
tensors (the adapter, a few MB) are new. The copy's trainable tensors start equal to the original's; the
device's incoming adapter overwrites them anyway (``train_local``).
"""

from __future__ import annotations

import copy

import torch


def frozen_sharing_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` whose frozen parameters and buffers are the original's tensors (same storage)."""
    memo: dict[int, object] = {}
    for p in model.parameters():
        if not p.requires_grad:
            memo[id(p)] = p
    for b in model.buffers():
        memo[id(b)] = b
    return copy.deepcopy(model, memo)


def shares_frozen_base(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """True when every frozen parameter of ``a`` and ``b`` is the same storage, pairwise by name."""
    fa = {n: p for n, p in a.named_parameters() if not p.requires_grad}
    fb = {n: p for n, p in b.named_parameters() if not p.requires_grad}
    return fa.keys() == fb.keys() and all(fa[n].data_ptr() == fb[n].data_ptr() for n in fa)
