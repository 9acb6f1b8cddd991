"""Registry of adapter methods: ``register_adapter(name)`` / ``create_adapter(model, cfg)``."""

from __future__ import annotations

from typing import Callable

_BUILDERS: dict[str, Callable] = {}


def register_adapter(name: str):
    """Decorator: register ``fn(base_model, adapter_cfg, seed) -> PeftModel`` under ``name``."""

    def deco(fn: Callable) -> Callable:
        if name in _BUILDERS:
            raise ValueError(f"adapter method {name!r} is already registered")
        _BUILDERS[name] = fn
        return fn

    return deco


def available_adapters() -> list[str]:
    return sorted(_BUILDERS)


def create_adapter(base_model, cfg, seed: int = 0):
    """Attach the configured adapter to ``base_model``. Adapter init is seeded (same seed, same init)."""
    import torch

    if cfg.method not in _BUILDERS:
        raise ValueError(
            f"unknown adapter method {cfg.method!r}; available: {available_adapters()} "
            "(register a new one with fedtune.adapters.register_adapter)"
        )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _BUILDERS[cfg.method](base_model, cfg)
