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
    bad = _non_finite(update, list(reference))
    if bad is not None:
        raise UpdateRejected("non_finite", f"{bad} holds NaN or Inf")
    if not math.isfinite(num_examples) or not (num_examples > 0) or (max_examples is not None and num_examples > max_examples):
        raise UpdateRejected("bad_num_examples", f"num-examples={num_examples} outside (0, {max_examples}]")


def _non_finite(update: AdapterState, names: list[str]) -> str | None:
    """The first of ``names`` whose tensor holds NaN or Inf, else None. One fused norm per tensor
    (``torch._foreach_norm``, as ``clip_grad_norm_`` does: no Python op per tensor); a finite norm proves every
    value finite, and a tensor whose norm is not finite (NaN, Inf, or finite values whose squares overflow) is
    checked value by value."""
    if not names:
        return None
    norms = torch.stack(torch._foreach_norm([update[n] for n in names])).float()
    if bool(torch.isfinite(norms).all()):
        return None
    for i in torch.nonzero(~torch.isfinite(norms)).flatten().tolist():
        if not bool(torch.isfinite(update[names[i]]).all()):
            return names[i]
    return None


def update_norm(update: AdapterState, reference: AdapterState) -> float:
    """L2 norm of (update - reference) over all adapter tensors (the delta a device sends): every tensor's delta
    and norm in one fused op each (in the wider of the two dtypes), their squares summed in float64."""
    names = list(reference)
    if not names:
        return 0.0
    wide = [torch.promote_types(update[n].dtype, reference[n].dtype) for n in names]
    deltas = torch._foreach_sub([update[n].to(d) for n, d in zip(names, wide)],
                                [reference[n].to(d) for n, d in zip(names, wide)])
    total = float(torch.stack(torch._foreach_norm(deltas)).double().pow(2).sum())
    if not math.isfinite(total):  # a norm past fp32's range (or NaN): recomputed exactly in float64
        total = sum(float((update[n].double() - reference[n].double()).pow(2).sum()) for n in names)
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
