"""Client side of packed training: one ``train.packed`` message trains a group of virtual devices at once.

The group's node loads the base once (the worker's cache), restores each device's ledger, trains all
of them with ``fedtune.packed.train_packed`` and replies ``arrays.<i>`` / ``metrics.<i>`` per device,
or ``error.<i>`` for a device that declines (its privacy budget is spent). ``PackedGrid`` on the
server turns the reply back into one reply per device.
"""

from __future__ import annotations

import os
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedtune.data.partition import load_client_data
from fedtune.flower.client_app import task_from_config
from fedtune.flower.context import run_context
from fedtune.flower.packed_grid import GROUP_KEY, part_key
from fedtune.compression import ResidualStore
from fedtune.flower.records import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, arrays_to_state, encode_upload, update_to_metrics
from fedtune.packed import train_packed
from fedtune.privacy import LedgerStore


def handle_train_group(msg: Message, context: Context) -> Message:
    ctx = run_context(context.run_config)
    cfg = ctx.cfg
    if cfg.fleet.enabled:
        raise ValueError("packed training of fleet simulations (per-device ranks, quantization, clocks) is not "
                         "supported yet; set fleet.enabled: false or train unpacked")
    start = time.perf_counter()
    size = int(msg.content[GROUP_KEY]["size"])
    store = LedgerStore(ctx.run.ledgers) if cfg.privacy.enabled else None
    reply = RecordDict()
    parts = []  # (i, device, data, task, adapter, ledger)
    for i in range(size):
        config = msg.content[part_key(CONFIG_KEY, i)]
        device = int(config["device-index"])
        partition = device % len(ctx.data_index)
        data = load_client_data(ctx.run.data, partition)
        key = data.user_id if device == partition else f"device-{device}"
        ledger = store.load(key, cfg.privacy.accountant) if store is not None else None
        budget = cfg.privacy.device_epsilon_budget
        if ledger is not None and budget is not None and ledger.epsilon(cfg.privacy.delta) >= budget:
            reply[part_key("error", i)] = ConfigRecord({"reason": f"device {device} has spent its sample-level "
                                                        f"budget (epsilon >= {budget}); it no longer trains"})
            continue
        parts.append((i, device, partition, data, task_from_config(config, device, cfg.seed),
                      arrays_to_state(msg.content[part_key(ARRAYS_KEY, i)]), ledger))
    parts_sent = {p[0]: p[5] for p in parts}
    if parts:
        model, _ = ctx.model()
        updates = train_packed(
            model, [p[5] for p in parts], [p[3] for p in parts], [p[4] for p in parts], cfg.privacy,
            [p[6] for p in parts] if store is not None else None,
            planned_steps=cfg.federation.rounds * cfg.train.local_steps, weight_decay=cfg.train.weight_decay,
            micro_batch=cfg.simulation.packed_micro_batch,
        )
        seconds = time.perf_counter() - start
        for (i, device, partition, data, task, _, ledger), update in zip(parts, updates):
            if ledger is not None:
                store.save(ledger)
            reply[part_key(ARRAYS_KEY, i)] = _encoded(ctx, cfg.federation.upload, data, device, partition,
                                                      update.adapter, parts_sent[i])
            reply[part_key(METRICS_KEY, i)] = update_to_metrics(update, seconds, partition, device=device,
                                                                rank=cfg.adapter.rank)
            ctx.run.append_event({"event": "client_done", "round": task.server_round, "partition": partition,
                                  "device": device, "user": data.user_id, "seconds": round(seconds, 2),
                                  "train_loss": update.train_loss, "epsilon": update.epsilon, "pid": os.getpid(),
                                  "packed_group": size, "sim_seconds": -1.0})
    return Message(content=reply, reply_to=msg)


def _encoded(ctx, scheme: str, data, device: int, partition: int, adapter, sent):
    """The device's reply arrays under ``federation.upload`` (as the unpacked ClientApp encodes them)."""
    key = data.user_id if device == partition else f"device-{device}"
    residuals = ResidualStore(ctx.run.root / "state" / "residuals") if scheme == "int8" else None
    arrays, residual = encode_upload(adapter, sent, scheme, residuals.load(key) if residuals else None)
    if residuals is not None:
        residuals.save(key, residual)
    return arrays
