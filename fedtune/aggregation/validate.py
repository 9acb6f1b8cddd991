"""Check one client's adapter update against the global adapter before it may be aggregated."""

from __future__ import annotations

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
        if not torch.isfinite(t).all():
            raise UpdateRejected("non_finite", f"{name} holds NaN or Inf")
    if not (num_examples > 0) or (max_examples is not None and num_examples > max_examples):
        raise UpdateRejected("bad_num_examples", f"num-examples={num_examples} outside (0, {max_examples}]")
