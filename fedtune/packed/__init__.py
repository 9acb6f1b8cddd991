"""The packed fleet engine: many virtual devices train at once in shared batched kernels on one GPU,
each with its own LoRA adapter, optimizer state, data, Poisson sampling, DP clipping and noise."""

from fedtune.packed.engine import train_packed
from fedtune.packed.layer import PackedBatch, PackedLoraLinear
from fedtune.packed.model import FrozenBranch, PackedModel, packed_lora

__all__ = ["FrozenBranch", "PackedBatch", "PackedLoraLinear", "PackedModel", "packed_lora", "train_packed"]
