"""The Flower ClientApp: one device's round, as Flower messages.

train:    adapter (ArrayRecord) + task (ConfigRecord) in -> trained adapter + metrics out
evaluate: adapter in -> held-out loss / perplexity / accuracy of this client out

The base model comes from the worker's cache (loaded once per process, never per round); the
client's privacy ledger is read from and written back to the run's on-disk state store, so a
recycled worker or a client served by another worker never forgets its ε.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune.adapters import get_adapter_state, set_adapter_state
from fedtune.adapters.split import initial_private, merge
from fedtune.compression import ResidualStore
from fedtune.data.partition import load_client_data
from fedtune.models.cache import load_count
from fedtune.flower.context import run_context
from fedtune.flower.device import (
    check_eligibility, decline, device_data, device_ledgers, device_private, device_settings, device_task,
)
from fedtune.flower.fleet_device import fleet_device
from fedtune.flower.records import (
    ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, arrays_to_state, encode_upload, payload_bytes, update_to_metrics,
)
from fedtune.personalization import PrivateStateStore, device_round
from fedtune.privacy import LedgerStore
from fedtune.training import evaluate_chunks
from fedtune.types import ClientTask

log = logging.getLogger(__name__)


def _partition(context: Context) -> int:
    try:
        return int(context.node_config["partition-id"])
    except KeyError:
        raise KeyError(
            "node config has no 'partition-id'; start the SuperNode with "
            "--node-config \"partition-id=<i> num-partitions=<n>\""
        ) from None


def task_from_config(config, partition: int, seed: int) -> ClientTask:
    server_round = int(config["server-round"])
    return ClientTask(
        server_round=server_round,
        local_steps=int(config["local-steps"]),
        batch_size=int(config["batch-size"]),
        lr=float(config["lr"]),
        # a fresh, reproducible stream per (run seed, round, client)
        seed=(seed * 1_000_003 + server_round * 10_007 + partition) % (2**31),
    )


class DeviceBudgetSpent(RuntimeError):
    """A device whose own privacy budget is spent declines the round (a failed reply the round survives)."""


class DeviceDropout(RuntimeError):
    """A simulated device that drops out mid-round (its reply is a failure the round survives)."""


def _device(config, context: Context) -> int:
    """The device this message is for: the server's ``device-index`` (fleet simulations map devices
    onto interchangeable virtual nodes), else the SuperNode's own partition id."""
    return int(config["device-index"]) if "device-index" in config else _partition(context)


def handle_train(msg: Message, context: Context) -> Message:
    ctx = run_context(context.run_config)
    cfg, config = ctx.cfg, msg.content[CONFIG_KEY]
    deployed = device_settings(context)  # a real device (`fedtune device join`); None: a virtual node
    if deployed is not None and not (verdict := check_eligibility(deployed)).eligible:
        return decline(msg, verdict.reason)
    device = _device(config, context) if deployed is None else deployed.index
    # a population larger than the data reuses its users; a real device has only its own data
    partition = device % len(ctx.data_index) if deployed is None else -1
    start = time.perf_counter()
    task = task_from_config(config, device, cfg.seed)
    if deployed is not None:
        task = device_task(task, cfg, deployed)
    rank = int(config["rank"]) if "rank" in config else None
    model, info = ctx.model(quantization=config.get("quantization"), rank=rank, alpha=config.get("alpha"))
    params = cfg.fleet.simulated_params or info["base_bytes_dense"] // 4
    fleet = fleet_device(cfg, device, params) if cfg.fleet.enabled else None
    if fleet is not None and fleet.drops_out(task.server_round):
        raise DeviceDropout(f"device {device} ({fleet.profile.name}) dropped out in round {task.server_round}")
    data = load_client_data(ctx.run.data, partition) if deployed is None else device_data(cfg, deployed)
    key = deployed.device_id if deployed else data.user_id if device == partition else f"device-{device}"
    store = LedgerStore(ctx.run.ledgers if deployed is None else device_ledgers(deployed))
    ledger = store.load(key, cfg.privacy.accountant) if cfg.privacy.enabled else None
    budget = cfg.privacy.device_epsilon_budget
    if ledger is not None and budget is not None and ledger.epsilon(cfg.privacy.delta) >= budget:
        raise DeviceBudgetSpent(f"device {device} has spent its sample-level budget "
                                f"(epsilon {ledger.epsilon(cfg.privacy.delta):.3f} >= {budget}); it no longer trains")
    incoming = arrays_to_state(msg.content[ARRAYS_KEY])
    # with a split adapter the private part is restored from, and saved back to, the device's own store;
    # only the shared part is in `update`
    update = device_round(
        model, incoming, data, task, cfg.privacy, ledger, split=cfg.personalization.split,
        store=PrivateStateStore(ctx.run.private if deployed is None else device_private(deployed)), device_key=key,
        planned_steps=cfg.federation.rounds * cfg.train.local_steps, weight_decay=cfg.train.weight_decay,
        loss_chunk_tokens=cfg.train.loss_chunk_tokens, gradient_checkpointing=cfg.train.gradient_checkpointing,
        checkpoint_every_n_layers=cfg.train.checkpoint_every_n_layers,
    )
    if ledger is not None:
        store.save(ledger)
    seconds = time.perf_counter() - start
    upload = cfg.federation.upload  # int8 deltas keep their error-feedback residual on the device
    residual_dir = ctx.run.root / "state" / "residuals" if deployed is None else Path(deployed.state_dir) / "residuals"
    residuals = ResidualStore(residual_dir) if upload == "int8" else None
    arrays, residual = encode_upload(update.adapter, incoming, upload, residuals.load(key) if residuals else None)
    if residuals is not None:
        residuals.save(key, residual)
    sim_seconds = fleet.seconds(task.server_round, payload_bytes(msg.content[ARRAYS_KEY]), update.tokens,
                                payload_bytes(arrays)) if fleet is not None else -1.0
    ctx.run.append_event({"event": "client_done", "round": task.server_round, "partition": partition,
                          "device": device, "user": data.user_id, "seconds": round(seconds, 2),
                          "train_loss": update.train_loss, "epsilon": update.epsilon, "pid": os.getpid(),
                          "model_loads": load_count(), "sim_seconds": sim_seconds})
    metrics = update_to_metrics(update, seconds, partition, device=device, rank=rank or cfg.adapter.rank,
                                sim_seconds=sim_seconds)
    return Message(content=RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: metrics}), reply_to=msg)


def handle_evaluate(msg: Message, context: Context) -> Message:
    ctx = run_context(context.run_config)
    model, _ = ctx.model()
    data = load_client_data(ctx.run.data, _partition(context))
    state, split = arrays_to_state(msg.content[ARRAYS_KEY]), ctx.cfg.personalization.split
    if split != "none":  # the device evaluates its own model: the shared part plus its private part
        private = PrivateStateStore(ctx.run.private).load(data.user_id)
        state = merge(state, private if private is not None else initial_private(get_adapter_state(model), split))
    set_adapter_state(model, state)
    if data.heldout.shape[0] == 0:
        metrics = {"num-examples": 0, "eval-loss": 0.0, "eval-accuracy": 0.0}
    else:
        res = evaluate_chunks(model, data.heldout, ctx.cfg.train.eval_batch_size)
        metrics = {"num-examples": int(data.heldout.shape[0]), "eval-loss": res.loss,
                   "eval-accuracy": res.accuracy}
    return Message(content=RecordDict({METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)


def build_client_app() -> ClientApp:
    app = ClientApp()
    app.train()(handle_train)
    from fedtune.flower.packed_client import handle_train_group  # it imports this module

    app.train("packed")(handle_train_group)
    app.evaluate()(handle_evaluate)
    return app
