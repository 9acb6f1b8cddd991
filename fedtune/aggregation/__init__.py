"""Adapter-aware aggregation and update validation (tensors in, tensors out; no Flower here)."""

from fedtune.aggregation.validate import UpdateRejected, validate_update
from fedtune.aggregation.fedavg import weighted_average
from fedtune.aggregation.hetero import (
    FlexLoRAAggregator,
    FlexLoRAState,
    HeteroAggregator,
    ZeroPadAggregator,
    aggregate_products,
    aggregate_zeropad,
    available_hetero_aggregators,
    create_hetero_aggregator,
    factorization_error,
    factorize,
    lora_modules,
    lora_rank,
    products,
    register_hetero_aggregator,
    truncate_rank,
    zero_pad_rank,
)

__all__ = [
    "FlexLoRAAggregator",
    "FlexLoRAState",
    "HeteroAggregator",
    "UpdateRejected",
    "ZeroPadAggregator",
    "aggregate_products",
    "aggregate_zeropad",
    "available_hetero_aggregators",
    "create_hetero_aggregator",
    "factorization_error",
    "factorize",
    "lora_modules",
    "lora_rank",
    "products",
    "register_hetero_aggregator",
    "truncate_rank",
    "validate_update",
    "weighted_average",
    "zero_pad_rank",
]
