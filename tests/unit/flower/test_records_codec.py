"""fedtune's Array codec: per tensor, the bytes Flower's ``np.save`` path writes, read back as ``np.load`` reads;
flat (the default), one buffer per dtype and a layout, which decodes to the same tensors and refuses a layout that
does not add up."""

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedtune.flower.records import (
    FLAT_PREFIX, LAYOUT_KEY, arrays_to_state, arrays_to_tensors, state_to_arrays, tensors_to_arrays, to_array,
    to_tensor,
)

TENSORS = {
    "a.lora_A.weight": torch.randn(8, 576),
    "a.lora_B.weight": torch.randn(192, 8),
    "half": torch.randn(3, 5).half(),
    "int8": torch.randint(-128, 127, (7,), dtype=torch.int8),
    "long": torch.arange(4),
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 3),
    "wide": torch.randn(2, 3, 4, 5).double(),
}


def test_encoding_writes_flowers_bytes():
    ours, flowers = tensors_to_arrays(TENSORS, flat=False), ArrayRecord(TENSORS)
    assert list(ours.keys()) == list(flowers.keys())
    for k in TENSORS:
        a, b = ours[k], flowers[k]
        assert (a.dtype, tuple(a.shape), a.stype, a.data) == (b.dtype, tuple(b.shape), b.stype, b.data), k


def test_decoding_reads_what_flower_reads_as_writable_copies():
    record = ArrayRecord(TENSORS)
    ours, flowers = arrays_to_tensors(record), record.to_torch_state_dict()
    for k in TENSORS:
        assert ours[k].dtype == flowers[k].dtype and ours[k].shape == flowers[k].shape, k
        assert torch.equal(ours[k], flowers[k]), k
    ours["a.lora_A.weight"] += 1  # a copy: the record's bytes do not change
    assert torch.equal(arrays_to_tensors(record)["a.lora_A.weight"], TENSORS["a.lora_A.weight"])


def test_unusual_layouts_take_flowers_path():
    t = torch.randn(4, 6).t()  # not C-contiguous
    assert to_array(t).data == Array.from_numpy_ndarray(t.numpy()).data and torch.equal(to_tensor(to_array(t)), t)
    fortran = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    assert torch.equal(to_tensor(Array(fortran)), torch.from_numpy(np.ascontiguousarray(fortran)))


def test_round_trip_of_an_adapter_state():
    state = {k: v for k, v in TENSORS.items() if v.is_floating_point()}
    back = arrays_to_state(state_to_arrays(state))
    for k, v in state.items():
        assert back[k].dtype == torch.float32 and torch.equal(back[k], v.float()), k


def test_a_corrupt_header_is_refused():
    array = to_array(torch.ones(3))
    bad = Array(dtype=array.dtype, shape=array.shape, stype=array.stype, data=b"garbage" + array.data[7:])
    with pytest.raises(ValueError):
        to_tensor(bad)


def test_flat_record_is_one_buffer_per_dtype_and_decodes_to_the_same_tensors():
    record = tensors_to_arrays(TENSORS)
    dtypes = {str(v.dtype).removeprefix("torch.") for v in TENSORS.values()}
    assert set(record.keys()) == {LAYOUT_KEY} | {FLAT_PREFIX + d for d in dtypes}
    back = arrays_to_tensors(record)
    assert list(back) == list(TENSORS)  # names in order
    for k, v in TENSORS.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k
    a, b = back["a.lora_A.weight"], back["a.lora_B.weight"]
    a += 1  # writable, and neither the record nor the next tensor of the buffer changes
    assert torch.equal(b, TENSORS["a.lora_B.weight"])
    assert torch.equal(arrays_to_tensors(record)["a.lora_A.weight"], TENSORS["a.lora_A.weight"])
    t = torch.randn(4, 6).t()  # not contiguous: flattened in its logical order
    assert torch.equal(arrays_to_tensors(tensors_to_arrays({"t": t}))["t"], t)


def test_flat_record_reads_with_flowers_own_decoder():
    # plain .npy arrays: a stock Flower strategy can still average flat records (same layout on every reply)
    flowers = tensors_to_arrays({k: v for k, v in TENSORS.items() if v.dtype == torch.float32}).to_torch_state_dict()
    assert flowers[FLAT_PREFIX + "float32"].numel() == sum(v.numel() for v in TENSORS.values()
                                                          if v.dtype == torch.float32)


def _with_layout(record, layout):
    out = ArrayRecord()
    for k, v in record.items():
        out[k] = v
    data = json.dumps(layout).encode()
    out[LAYOUT_KEY] = to_array(torch.frombuffer(bytearray(data), dtype=torch.uint8)) if data else to_array(torch.zeros(0))
    return out


@pytest.mark.parametrize("layout", [
    [["a", "float32", [3]]],                                          # fewer values than the buffer holds
    [["a", "float32", [3]], ["b", "float32", [3]]],                   # more
    [["a", "float32", [2]], ["a", "float32", [2]]],                   # a name twice
    [["a", "float16", [4]]],                                          # no buffer of that dtype
    [["a", "float32", [-1, -4]]],                                     # negative dimensions
    [["a", "float32", [2 ** 32, 2 ** 32]]],                           # a count that overflows int64
    [["a", "float32"]],                                               # not (name, dtype, shape)
    {"a": 1},                                                         # not a list
])
def test_a_flat_record_whose_layout_does_not_add_up_is_refused(layout):
    record = _with_layout(tensors_to_arrays({"x": torch.ones(4)}), layout)
    with pytest.raises(ValueError, match="malformed flat adapter record"):
        arrays_to_tensors(record)


def test_a_flat_record_with_stray_keys_is_refused():
    record = tensors_to_arrays({"x": torch.ones(4)})
    record["base.weight"] = to_array(torch.ones(2))  # a tensor the layout does not name
    with pytest.raises(ValueError, match="malformed flat adapter record"):
        arrays_to_tensors(record)


def test_a_flat_buffer_whose_npy_bytes_disagree_with_its_shape_is_refused():
    record = tensors_to_arrays({"x": torch.ones(4)})
    good = record[FLAT_PREFIX + "float32"]
    record[FLAT_PREFIX + "float32"] = Array(dtype=good.dtype, shape=good.shape, stype=good.stype,
                                            data=to_array(torch.ones(2)).data)  # says (4,), holds 2 values
    with pytest.raises(ValueError, match="malformed flat adapter record"):
        arrays_to_tensors(record)


def test_a_flat_buffer_whose_bytes_hold_another_dtype_is_refused():
    record = tensors_to_arrays({"x": torch.ones(4)})
    record[FLAT_PREFIX + "float32"] = to_array(torch.ones(4).half())  # named float32, holds float16
    with pytest.raises(ValueError, match="malformed flat adapter record"):
        arrays_to_tensors(record)
