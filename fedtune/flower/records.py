"""AdapterState <-> Flower records. Only adapter tensors ever go into a message."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, MessageType, MetricRecord

from fedtune.compression import decode_update, encode_update
from fedtune.types import AdapterState, ClientUpdate

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
CONFIG_KEY = "config"

# Every reply carries the same metric keys (Flower's FedAvg requires it).
UPDATE_METRIC_KEYS = ("partition", "device", "rank", "sim-seconds", "num-examples", "train-loss", "epsilon", "delta", "steps", "tokens", "train-seconds")


def state_to_arrays(state: AdapterState) -> ArrayRecord:
    # ArrayRecord rejects bf16; adapters travel as fp32 (fp16 compression is a later option)
    return ArrayRecord({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()})


def arrays_to_state(arrays: ArrayRecord) -> AdapterState:
    return {k: v.clone() for k, v in arrays.to_torch_state_dict().items()}


def encode_upload(state: AdapterState, sent: AdapterState, scheme: str,
                  residual: AdapterState | None = None) -> tuple[ArrayRecord, AdapterState | None]:
    """A device's reply arrays under ``federation.upload`` (fedtune.compression), and its new residual."""
    payload, new_residual = encode_update(state, sent, scheme, residual)
    return ArrayRecord(payload), new_residual


def decode_upload(arrays: ArrayRecord, sent: AdapterState | None) -> AdapterState:
    """The fp32 adapter a reply carries, whatever its upload scheme; ``sent``: what the device was sent."""
    return decode_update(arrays.to_torch_state_dict(), sent)


def update_to_metrics(update: ClientUpdate, seconds: float, partition: int, *, device: int | None = None,
                      rank: int = 0, sim_seconds: float = -1.0, policy: str = "exact") -> MetricRecord:
    """The reply's figures (``fedtune.federation.reply_figures``; every key present, -1 where withheld)."""
    from fedtune.federation.reply_figures import reply_figures

    return MetricRecord(reply_figures(update, policy, device=partition if device is None else device, rank=rank,
                                      partition=partition, seconds=seconds, sim_seconds=sim_seconds))


def payload_bytes(arrays: ArrayRecord) -> int:
    """Serialized bytes of the tensors in a record (what crosses the wire for the adapter)."""
    return sum(len(a.data) for a in arrays.values())


def pass_through_non_train(grid, messages, timeout: float | None) -> tuple[list, list]:
    """(the train messages, the replies to every other message, sent unchanged through ``grid``): what a grid
    wrapper that rewrites only train messages (packed groups, secure aggregation) does first."""
    messages = list(messages)
    train = [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
    other = [m for m in messages if m.metadata.message_type != MessageType.TRAIN]
    return train, (list(grid.send_and_receive(other, timeout=timeout)) if other else [])
