"""AdapterState <-> Flower records. Only adapter tensors ever go into a message.

Tensors travel in Flower's own format (an ``Array`` of ``.npy`` bytes, ``stype`` numpy.ndarray), but are
encoded and decoded here rather than by ``np.save`` / ``np.load`` per tensor: an adapter has hundreds of small
tensors (SmolLM2-135M, LoRA on q,k,v,o: 240) whose ``.npy`` headers repeat, and parsing each one
(``ast.literal_eval``) cost more than the bytes. Headers are parsed and written once per layout and cached;
the bytes are the same as ``np.save`` writes, and anything unusual (non-contiguous, object dtype, another
``stype``) goes through Flower's own path.

An adapter travels *flat*: one ``.npy`` ``Array`` per dtype (``flat:<dtype>``,
the tensors' values end to end) and a ``layout`` ``Array`` (uint8: JSON of name, dtype, shape in order), so a
reply is two ``Array``s instead of 240 and decoding is one buffer and slices. Both are plain ``.npy`` arrays:
Flower's own ``to_torch_state_dict`` and FedAvg (same layout on every reply) still work on them. Records in the
per-tensor form (older devices, other Flower apps) still decode; a flat record whose layout does not add up is
refused.
"""

from __future__ import annotations

import io
import json
import math
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MessageType, MetricRecord

from fedtune.compression import decode_update, encode_update
from fedtune.types import AdapterState, ClientUpdate

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
CONFIG_KEY = "config"

# Every reply carries the same metric keys (Flower's FedAvg requires it).
UPDATE_METRIC_KEYS = ("partition", "device", "rank", "sim-seconds", "num-examples", "train-loss", "epsilon", "delta", "steps", "tokens", "train-seconds")


_NPY = "numpy.ndarray"  # flwr's SType.NUMPY


def _header_length(data: bytes) -> int:
    """Bytes of an ``.npy`` preamble (magic, version, header): 10 + len for version 1, 12 + len for 2 and 3."""
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not .npy bytes")
    if data[6] == 1:
        return 10 + int.from_bytes(data[8:10], "little")
    return 12 + int.from_bytes(data[8:12], "little")


@lru_cache(maxsize=4096)
def _layout(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    """(dtype, shape, fortran order) of an ``.npy`` header, parsed by numpy once per distinct header."""
    fp = io.BytesIO(header)
    major, _ = np.lib.format.read_magic(fp)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(fp)
    return dtype, tuple(shape), bool(fortran)


def to_tensor(array: Array) -> torch.Tensor:
    """A writable tensor with the values of a Flower ``Array`` (what ``torch.from_numpy(array.numpy())`` gives)."""
    data = array.data
    if array.stype == _NPY and isinstance(data, bytes) and data[:6] == b"\x93NUMPY":
        start = _header_length(data)
        dtype, shape, fortran = _layout(data[:start])
        if not fortran and not dtype.hasobject:
            count = int(np.prod(shape, dtype=np.int64))
            return torch.from_numpy(np.frombuffer(data, dtype, count, start).reshape(shape).copy())
    return torch.from_numpy(array.numpy())


@lru_cache(maxsize=4096)
def _header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header ``np.save`` writes for a C-ordered array of this dtype and shape."""
    buf = io.BytesIO()
    np.save(buf, np.empty(shape, dtype=dtype), allow_pickle=False)
    data = buf.getvalue()
    return data[:_header_length(data)]


def to_array(tensor: torch.Tensor) -> Array:
    """A Flower ``Array`` of a CPU tensor: the bytes ``Array.from_numpy_ndarray`` writes, header cached."""
    a = tensor.detach().cpu().numpy()
    if not a.flags.c_contiguous or a.dtype.hasobject:
        return Array.from_numpy_ndarray(a)
    return Array(dtype=str(a.dtype), shape=tuple(a.shape), stype=_NPY, data=_header(a.dtype.str, a.shape) + a.tobytes())


LAYOUT_KEY = "layout"
FLAT_PREFIX = "flat:"


def tensors_to_arrays(tensors: dict[str, torch.Tensor], flat: bool = True) -> ArrayRecord:
    """An ArrayRecord of CPU tensors: flat (module docstring), or with ``flat=False`` one ``Array`` per tensor
    (``ArrayRecord(state_dict)``'s bytes, without parsing a header per tensor)."""
    record = ArrayRecord()  # set item by item: ArrayRecord(dict of Arrays) would build each Array again
    values = {k: v.detach().cpu() for k, v in tensors.items()}
    if flat and values:
        groups: dict[torch.dtype, list[torch.Tensor]] = {}
        for v in values.values():
            groups.setdefault(v.dtype, []).append(v.reshape(-1))
        layout = [[k, str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in values.items()]
        data = json.dumps(layout, separators=(",", ":")).encode()
        record[LAYOUT_KEY] = to_array(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        for dtype, parts in groups.items():
            record[FLAT_PREFIX + str(dtype).removeprefix("torch.")] = to_array(torch.cat(parts))
        return record
    for k, v in values.items():
        record[k] = to_array(v)
    return record


def _refuse(detail: str) -> ValueError:
    return ValueError(f"malformed flat adapter record: {detail}")


@lru_cache(maxsize=64)
def _layout_entries(data: bytes) -> tuple[tuple[tuple[str, str, tuple[int, ...], int], ...], dict[str, int]]:
    """((name, dtype, shape, count), ...) of a layout and the values it needs per dtype; parsed and checked
    once per distinct layout (every reply of a round shares one)."""
    try:
        entries = tuple((str(k), str(d), tuple(int(n) for n in shape)) for k, d, shape in json.loads(data))
    except (ValueError, TypeError) as err:
        raise _refuse(f"unreadable layout ({err})") from None
    if len({k for k, _, _ in entries}) != len(entries) or any(n < 0 for _, _, shape in entries for n in shape):
        raise _refuse("a name twice in the layout, or a negative dimension")
    out, totals = [], {}
    for name, dtype, shape in entries:
        count = math.prod(shape)  # Python ints: a hostile shape cannot overflow to a small count
        out.append((name, dtype, shape, count))
        totals[dtype] = totals.get(dtype, 0) + count
    return tuple(out), totals


def _flat_to_tensors(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    entries, totals = _layout_entries(to_tensor(arrays[LAYOUT_KEY]).numpy().tobytes())
    buffers = {k.removeprefix(FLAT_PREFIX): v for k, v in arrays.items() if k != LAYOUT_KEY}
    if len(buffers) != len(arrays) - 1 or set(buffers) != set(totals):
        raise _refuse(f"buffers {sorted(arrays.keys())} for a layout of dtypes {sorted(totals)}")
    flats = {d: to_tensor(a) for d, a in buffers.items()}  # one fresh copy per dtype
    for d, buf in flats.items():  # what the bytes hold, not what the Array says
        if tuple(buf.shape) != (totals[d],) or str(buf.dtype).removeprefix("torch.") != d:
            raise _refuse(f"a flat:{d} buffer holding {buf.dtype} {tuple(buf.shape)}, the layout needs ({totals[d]},)")
    offsets = dict.fromkeys(flats, 0)
    out = {}
    for name, dtype, shape, count in entries:
        start = offsets[dtype]
        out[name] = flats[dtype][start:start + count].view(shape)  # a view of the buffer's fresh copy
        offsets[dtype] = start + count
    return out


def arrays_to_tensors(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """The tensors of an ArrayRecord, flat or per tensor, writable and never aliasing the record's bytes
    (``to_torch_state_dict()``, faster). A flat record's tensors are views of one fresh buffer per dtype
    (``.clone()`` one before saving it alone with safetensors). A flat record whose layout does not add up
    raises ``ValueError``."""
    if LAYOUT_KEY in arrays:
        return _flat_to_tensors(arrays)
    return {k: to_tensor(v) for k, v in arrays.items()}


def state_to_arrays(state: AdapterState) -> ArrayRecord:
    # ArrayRecord rejects bf16; adapters travel as fp32 (fp16 compression is a later option)
    return tensors_to_arrays({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()})


def arrays_to_state(arrays: ArrayRecord) -> AdapterState:
    return arrays_to_tensors(arrays)


def encode_upload(state: AdapterState, sent: AdapterState, scheme: str,
                  residual: AdapterState | None = None) -> tuple[ArrayRecord, AdapterState | None]:
    """A device's reply arrays under ``federation.upload`` (fedtune.compression), and its new residual."""
    payload, new_residual = encode_update(state, sent, scheme, residual)
    return tensors_to_arrays(payload), new_residual


def decode_upload(arrays: ArrayRecord, sent: AdapterState | None) -> AdapterState:
    """The fp32 adapter a reply carries, whatever its upload scheme; ``sent``: what the device was sent."""
    return decode_update(arrays_to_tensors(arrays), sent)


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
