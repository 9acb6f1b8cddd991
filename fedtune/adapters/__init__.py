"""Parameter-efficient adapters (peft). Each method registers a builder; state = trainable tensors only."""

from fedtune.adapters import ffa_lora, lora, prompt_tuning  # noqa: F401  (register the built-in methods)
from fedtune.adapters.registry import available_adapters, create_adapter, register_adapter
from fedtune.adapters.state import adapter_bytes, get_adapter_state, set_adapter_state

__all__ = [
    "adapter_bytes",
    "available_adapters",
    "create_adapter",
    "get_adapter_state",
    "register_adapter",
    "set_adapter_state",
]
