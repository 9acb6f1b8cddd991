"""Adapter-aware aggregation and update validation (tensors in, tensors out; no Flower here)."""

from fedtune.aggregation.validate import UpdateRejected, validate_update
from fedtune.aggregation.fedavg import weighted_average

__all__ = ["UpdateRejected", "validate_update", "weighted_average"]
