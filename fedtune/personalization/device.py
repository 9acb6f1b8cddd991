"""One device's round with a split adapter: restore the private part, train the whole adapter, keep the
private part, hand back only the shared part. Flower-free, so the ClientApp and the in-process engine
(``fedtune.personalization.federate``) run the same code.
"""

from __future__ import annotations

import dataclasses

from fedtune.adapters import get_adapter_state
from fedtune.adapters.split import initial_private, merge, private_part, shared_part
from fedtune.personalization.store import PrivateStateStore
from fedtune.training import train_local
from fedtune.types import AdapterState, ClientData, ClientTask, ClientUpdate


def device_round(model, shared_in: AdapterState, data: ClientData, task: ClientTask, privacy, ledger, *,
                 split: str, store: PrivateStateStore | None, device_key: str, **train_kwargs) -> ClientUpdate:
    """``train_local`` on (shared from the server + this device's private part); the update holds only the
    shared tensors. With ``split='none'`` this is plain ``train_local``."""
    if split == "none":
        return train_local(model, shared_in, data, task, privacy, ledger, **train_kwargs)
    if store is None:
        raise ValueError(f"split {split!r} keeps a private adapter part on the device: pass its PrivateStateStore")
    private = store.load(device_key)
    if private is None:  # never trained: the split's initial private part (zeros for LoRA's B)
        private = initial_private(get_adapter_state(model), split)
    update = train_local(model, merge(shared_in, private), data, task, privacy, ledger, **train_kwargs)
    store.save(device_key, private_part(update.adapter, split))
    return dataclasses.replace(update, adapter=shared_part(update.adapter, split))
