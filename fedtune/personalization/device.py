"""One device's round with a split adapter: restore the private part, train the whole adapter, keep the
private part, hand back only the shared part. Flower-free, so the ClientApp and the in-process engine
(``fedtune.federation.inprocess``) run the same code.
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
    # a device that never trained starts from the split's initial private part (zeros for LoRA's B)
    private = _private_or_init(store, device_key, get_adapter_state(model), split)
    update = train_local(model, merge(shared_in, private), data, task, privacy, ledger, **train_kwargs)
    store.save(device_key, private_part(update.adapter, split))
    return dataclasses.replace(update, adapter=shared_part(update.adapter, split))


def device_round_group(model, shared_in: AdapterState, datas: list[ClientData], tasks: list[ClientTask], privacy,
                       ledgers, *, split: str, store: PrivateStateStore | None, device_keys: list[str],
                       micro_batch: int | None = None, **train_kwargs) -> list[ClientUpdate]:
    """``device_round`` for a group of devices trained at once by the packed engine (``fedtune.packed``):
    the same updates, private parts and ledgers as one device at a time, in shared batched kernels."""
    from fedtune.packed import train_packed

    if split != "none" and store is None:
        raise ValueError(f"split {split!r} keeps a private adapter part on the device: pass its PrivateStateStore")
    template = get_adapter_state(model) if split != "none" else None
    starts = [shared_in if split == "none" else merge(shared_in, _private_or_init(store, key, template, split))
              for key in device_keys]
    updates = train_packed(model, starts, datas, tasks, privacy, ledgers, micro_batch=micro_batch, **train_kwargs)
    if split == "none":
        return updates
    for key, update in zip(device_keys, updates):
        store.save(key, private_part(update.adapter, split))
    return [dataclasses.replace(u, adapter=shared_part(u.adapter, split)) for u in updates]


def _private_or_init(store: PrivateStateStore, key: str, template: AdapterState, split: str) -> AdapterState:
    private = store.load(key)
    return private if private is not None else initial_private(template, split)
