"""Adapter-aware aggregation and update validation (tensors in, tensors out; no Flower here)."""

from fedtune.aggregation.validate import (
    UpdateRejected, update_norm, validate_metrics, validate_norm, validate_update,
)
from fedtune.aggregation.fedavg import weighted_average
from fedtune.aggregation.robust import (
    Aggregator, available_aggregators, create_aggregator, register_aggregator,
)
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
    "Aggregator",
    "available_aggregators",
    "create_aggregator",
    "register_aggregator",
    "update_norm",
    "validate_metrics",
    "validate_norm",
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
