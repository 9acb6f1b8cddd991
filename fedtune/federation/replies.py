"""Decode and validate one device's reply before it may reach aggregation (the pipeline's first two stages).

``accept_reply`` takes the reply's payload tensors (as its upload scheme encoded them) and its reported
figures, decodes them against what this device was sent, checks keys / shapes / dtypes / finite values /
example count / reported metrics / the update's norm, and returns a typed ``Reply``; a bad reply raises
``UpdateRejected`` with a reason the round counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedtune.aggregation import UpdateRejected, validate_metrics, validate_norm, validate_update
from fedtune.federation.aggregate import Reply
from fedtune.types import AdapterState


@dataclass(frozen=True)
class ReplyLimits:
    max_examples: int | None = None
    max_update_norm: float | None = None
    max_train_loss: float | None = None


def accept_reply(payload: dict[str, torch.Tensor], metrics: dict, *, sent: AdapterState | None,
                 reference: AdapterState, limits: ReplyLimits, device: int = -1) -> Reply:
    """The decoded, validated reply; raises ``UpdateRejected`` (reason, detail) otherwise.

    ``sent``: the adapter this device was sent this round (an int8 delta decodes on it; the norm bound is
    measured from it); ``reference``: the adapter the reply must match in keys and shapes.
    """
    from fedtune.compression import decode_update

    try:
        state = decode_update(payload, sent)
    except ValueError as err:
        raise UpdateRejected("malformed", str(err)) from None
    num_examples = float(metrics.get("num-examples", 0))
    validate_update(state, reference, num_examples, limits.max_examples)
    validate_metrics(metrics, limits.max_train_loss)
    if limits.max_update_norm is not None:
        validate_norm(state, sent if sent is not None else reference, limits.max_update_norm)
    eps = float(metrics.get("epsilon", -1.0))
    loss = float(metrics.get("train-loss", -1.0))
    return Reply(device=int(metrics.get("device", device)), state=state, num_examples=num_examples,
                 train_loss=loss if loss >= 0 else None, rank=int(metrics.get("rank", 0)),
                 epsilon=eps if eps >= 0 else None,
                 delta=float(metrics["delta"]) if eps >= 0 and "delta" in metrics else None)
