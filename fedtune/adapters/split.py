"""Shared vs private adapter tensors: which part of a device's adapter the federation may see.

A split is a rule over adapter-state keys (peft's checkpoint names). The shared part is sent to the
server and aggregated; the private part never leaves the device and persists in its state store.

    none   everything is shared (FedAvg of the whole adapter)
    fedsa  FedSA-LoRA (Guo et al., 2024): ``lora_A`` shared, ``lora_B`` private. A learns what users have
           in common, B what is theirs; B starts at zero (peft's LoRA init), so a device that has never
           trained uses exactly the shared model.
"""

from __future__ import annotations

from typing import Callable

import torch

from fedtune.types import AdapterState

_PRIVATE: dict[str, Callable[[str], bool]] = {}


def register_split(name: str):
    """Decorator: register ``is_private(key) -> bool`` under ``name``."""

    def deco(fn: Callable[[str], bool]) -> Callable[[str], bool]:
        if name in _PRIVATE:
            raise ValueError(f"adapter split {name!r} is already registered")
        _PRIVATE[name] = fn
        return fn

    return deco


@register_split("none")
def _nothing_private(key: str) -> bool:
    return False


@register_split("fedsa")
def _lora_b_private(key: str) -> bool:
    return ".lora_B." in key


def _rule(split: str) -> Callable[[str], bool]:
    if split not in _PRIVATE:
        raise ValueError(f"unknown adapter split {split!r}; available: {sorted(_PRIVATE)} "
                         "(register one with fedtune.adapters.split.register_split)")
    return _PRIVATE[split]


def shared_part(state: AdapterState, split: str) -> AdapterState:
    is_private = _rule(split)
    return {k: v for k, v in state.items() if not is_private(k)}


def private_part(state: AdapterState, split: str) -> AdapterState:
    is_private = _rule(split)
    return {k: v for k, v in state.items() if is_private(k)}


def initial_private(template: AdapterState, split: str) -> AdapterState:
    """A device's private part before it has ever trained: zeros (LoRA's B init), shaped like ``template``."""
    return {k: torch.zeros_like(v, dtype=torch.float32) for k, v in private_part(template, split).items()}


def merge(shared: AdapterState, private: AdapterState) -> AdapterState:
    """The device's whole adapter; refuses a key on both sides (a private tensor must never be shared)."""
    both = sorted(set(shared) & set(private))
    if both:
        raise ValueError(f"adapter tensors {both[:3]} are both shared and private; the split is inconsistent")
    return {**shared, **private}
