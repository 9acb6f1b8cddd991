"""The device's private-state store."""

import torch

from fedtune.personalization import PrivateStateStore


def test_round_trip_and_atomic_files(tmp_path):
    store = PrivateStateStore(tmp_path / "private")
    assert store.load("user/1") is None and not store.has("user/1")
    state = {"m.lora_B.weight": torch.randn(8, 4), "n.lora_B.weight": torch.randn(8, 4)}
    store.save("user/1", state)
    back = store.load("user/1")
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    store.save("user/1", {k: v + 1 for k, v in state.items()})  # overwrite in place
    assert torch.equal(store.load("user/1")["m.lora_B.weight"], state["m.lora_B.weight"] + 1)
    assert store.keys() == ["user_1"]
    assert not list((tmp_path / "private").glob("*.tmp"))
