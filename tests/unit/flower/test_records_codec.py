"""fedtune's Array codec writes the bytes Flower's ``np.save`` path writes and reads back what ``np.load`` reads."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedtune.flower.records import (
    arrays_to_state, arrays_to_tensors, state_to_arrays, tensors_to_arrays, to_array, to_tensor,
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
    ours, flowers = tensors_to_arrays(TENSORS), ArrayRecord(TENSORS)
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
