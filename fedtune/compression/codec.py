"""Encode a device's trained adapter for upload, and decode it on the server.

Payloads (name -> tensor, what goes into the message):
- ``fp32`` / ``fp16``: the adapter's own keys, in that dtype; decoding needs nothing else.
- ``int8``: two tensors for the whole adapter, ``delta.int8`` [n] and ``delta.scale`` [n / 256]: the
  blockwise-quantized delta (trained - sent), the tensors flattened in sorted key order. The layout
  (keys, shapes) is that of the adapter the server sent, which both sides hold, so it does not travel;
  two arrays per message keep the per-array framing out of the byte count.

Error feedback (int8): the device adds its residual (what earlier rounds' quantization lost) to this
round's delta before quantizing, and keeps the new quantization error as its next residual, so the
error does not accumulate over rounds. A residual whose layout no longer matches (a new rank) is dropped.
"""

from __future__ import annotations

import torch

from fedtune.compression.int8 import dequantize_blockwise, quantize_blockwise
from fedtune.types import AdapterState

SCHEMES = ("fp32", "fp16", "int8")
INT8_KEY, SCALE_KEY = "delta.int8", "delta.scale"
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def _flat(state: AdapterState, keys: list[str]) -> torch.Tensor:
    return torch.cat([state[k].detach().reshape(-1).to("cpu", torch.float32) for k in keys])  # [n]


def _unflat(flat: torch.Tensor, like: AdapterState) -> AdapterState:
    out, i = {}, 0
    for k in sorted(like):
        n = like[k].numel()
        out[k] = flat[i : i + n].reshape(like[k].shape).clone()
        i += n
    return out


def _same_layout(a: AdapterState | None, b: AdapterState) -> bool:
    return a is not None and a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in b)


def encode_update(state: AdapterState, sent: AdapterState, scheme: str,
                  residual: AdapterState | None = None) -> tuple[dict[str, torch.Tensor], AdapterState | None]:
    """(payload, the device's new residual); the residual is None except for ``int8``."""
    if scheme in _DTYPES:
        return {k: v.detach().to("cpu", _DTYPES[scheme]).contiguous() for k, v in state.items()}, None
    if scheme != "int8":
        raise ValueError(f"federation.upload: expected one of {SCHEMES}, got {scheme!r}")
    if state.keys() != sent.keys():
        raise ValueError(f"int8 upload: the trained adapter's keys differ from the sent adapter's "
                         f"({sorted(state.keys() ^ sent.keys())[:3]})")
    keys = sorted(sent)
    delta = _flat(state, keys) - _flat(sent, keys)  # [n]
    if _same_layout(residual, sent):
        delta += _flat(residual, keys)
    q, scale = quantize_blockwise(delta)
    new_residual = _unflat(delta - dequantize_blockwise(q, scale), sent)
    return {INT8_KEY: q, SCALE_KEY: scale}, new_residual


def payload_scheme(payload: dict[str, torch.Tensor]) -> str:
    if INT8_KEY in payload:
        return "int8"
    return "fp16" if any(v.dtype == torch.float16 for v in payload.values()) else "fp32"


def decode_update(payload: dict[str, torch.Tensor], sent: AdapterState | None) -> AdapterState:
    """The trained adapter (fp32) from a payload; ``sent`` is the adapter the server sent this device."""
    if INT8_KEY not in payload:
        return {k: v.to(torch.float32, copy=True) for k, v in payload.items()}  # one copy, never the payload
    if SCALE_KEY not in payload or set(payload) != {INT8_KEY, SCALE_KEY}:
        raise ValueError(f"int8 payload must hold exactly {INT8_KEY!r} and {SCALE_KEY!r}, got {sorted(payload)}")
    if sent is None:
        raise ValueError("an int8 payload is a delta: decoding it needs the adapter sent to the device")
    n = sum(v.numel() for v in sent.values())
    if payload[INT8_KEY].numel() != n:
        raise ValueError(f"int8 payload holds {payload[INT8_KEY].numel()} values, the sent adapter has {n}")
    keys = sorted(sent)
    return _unflat(_flat(sent, keys) + dequantize_blockwise(payload[INT8_KEY], payload[SCALE_KEY]), sent)
