"""Check one client's adapter update against the global adapter before it may be aggregated."""

from __future__ import annotations

import math

import torch

from fedtune.types import AdapterState


class UpdateRejected(ValueError):
    """An update that must not be aggregated; ``reason`` is a short machine-countable tag."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


def validate_update(update: AdapterState, reference: AdapterState, num_examples: float,
                    max_examples: int | None = None) -> None:
    """Raise UpdateRejected unless keys, shapes, dtypes, values and the example count are sane."""
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing:
        raise UpdateRejected("missing_keys", f"{len(missing)} adapter tensors missing, e.g. {missing[0]}")
    if extra:
        raise UpdateRejected("extra_keys", f"{len(extra)} unexpected tensors, e.g. {extra[0]}")
    for name, ref in reference.items():
        t = update[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise UpdateRejected("bad_shape", f"{name}: expected {tuple(ref.shape)}, got {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise UpdateRejected("bad_dtype", f"{name}: expected a floating tensor, got {t.dtype}")
        if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():  # a finite sum: every value is finite
            raise UpdateRejected("non_finite", f"{name} holds NaN or Inf")
    if not math.isfinite(num_examples) or not (num_examples > 0) or (max_examples is not None and num_examples > max_examples):
        raise UpdateRejected("bad_num_examples", f"num-examples={num_examples} outside (0, {max_examples}]")


def update_norm(update: AdapterState, reference: AdapterState) -> float:
    """L2 norm of (update - reference) over all adapter tensors (the delta a device sends)."""
    total = 0.0
    for name, ref in reference.items():
        total += float((update[name].double() - ref.double()).pow(2).sum())
    return math.sqrt(total)


def validate_norm(update: AdapterState, reference: AdapterState, max_norm: float | None) -> float:
    """Raise UpdateRejected if the delta's L2 norm exceeds ``max_norm``; return the norm. Run after
    ``validate_update`` (keys and shapes already match)."""
    norm = update_norm(update, reference)
    if max_norm is not None and not norm <= max_norm:
        raise UpdateRejected("norm_bound", f"update norm {norm:.4g} > validation.max_update_norm={max_norm}")
    return norm


def validate_metrics(metrics: dict, max_train_loss: float | None = None) -> None:
    """Raise UpdateRejected unless the reply's reported figures are sane (finite loss, within bounds)."""
    if "train-loss" not in metrics:
        raise UpdateRejected("bad_metrics", "reply has no train-loss")
    loss = float(metrics["train-loss"])
    if not math.isfinite(loss):
        raise UpdateRejected("bad_metrics", f"train-loss={loss} is not finite")
    if max_train_loss is not None and loss > max_train_loss:
        raise UpdateRejected("bad_metrics", f"train-loss={loss:.4g} > validation.max_train_loss={max_train_loss}")
    for key in ("epsilon", "delta"):
        if key in metrics and not math.isfinite(float(metrics[key])):
            raise UpdateRejected("bad_metrics", f"{key}={metrics[key]} is not finite")
