"""The Flower ClientApp: one device's round, as Flower messages.

train:    adapter (ArrayRecord) + task (ConfigRecord) in -> trained adapter + metrics out
evaluate: adapter in -> held-out loss / perplexity / accuracy of this client out
query.secagg / train.secagg: the secure-aggregation stages (``secagg_client``); train.secagg trains as above

The base model comes from the worker's cache (loaded once per process, never per round); the
client's privacy ledger is read from and written back to the run's on-disk state store, so a
recycled worker or a client served by another worker never forgets its ε.
"""

from __future__ import annotations

import logging
import time

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune.adapters import get_adapter_state, set_adapter_state
from fedtune.adapters.split import initial_private, merge
from fedtune.data.partition import load_client_data
from fedtune.federation.device_round import (  # noqa: F401
    Declined, DeviceBudgetSpent, DeviceSitsOut, DeviceState, StaleRound, declined_event, train_one,
)
from fedtune.federation.reply_figures import resolve as resolve_figures
from fedtune.federation.task import TaskPlan
from fedtune.federation.virtual_device import client_done, ledger_key, partition_of
from fedtune.models.cache import load_count
from fedtune.flower.context import run_context, simulated_params
from fedtune.flower.device import check_eligibility, decline, device_data, device_micro_batch, device_settings
from fedtune.federation.fleet_device import fleet_device
from fedtune.flower.records import (
    ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, arrays_to_state, payload_bytes, tensors_to_arrays, update_to_metrics,
)
from fedtune.personalization import PrivateStateStore
from fedtune.training import evaluate_chunks

log = logging.getLogger(__name__)


def _partition(context: Context) -> int:
    try:
        return int(context.node_config["partition-id"])
    except KeyError:
        raise KeyError(
            "node config has no 'partition-id'; start the SuperNode with "
            "--node-config \"partition-id=<i> num-partitions=<n>\""
        ) from None


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
    plan = TaskPlan.from_wire(config)
    if deployed is None:
        device = _device(config, context)
        state = DeviceState.simulated(ctx.run.root / "state", cfg.seed)
    else:  # secret streams, drawn now; the device's own state directory
        device, state = deployed.index, DeviceState.deployed_device(deployed.state_dir)
        try:
            state.admit_round(str(msg.metadata.run_id), plan.server_round)
        except StaleRound as err:
            log.warning("declined: %s", err)
            return decline(msg, "stale_round")
    # a population larger than the data reuses its users; a real device has only its own data
    partition = partition_of(device, len(ctx.data_index)) if deployed is None else -1
    start = time.perf_counter()
    model, info = ctx.model(quantization=plan.quantization, rank=plan.rank, alpha=plan.alpha)
    params = simulated_params(cfg, info)
    fleet = fleet_device(cfg, device, params) if cfg.fleet.enabled else None
    if fleet is not None and fleet.drops_out(plan.server_round):
        raise DeviceDropout(f"device {device} ({fleet.profile.name}) dropped out in round {plan.server_round}")
    data = load_client_data(ctx.run.data, partition) if deployed is None else device_data(cfg, deployed)
    key = deployed.device_id if deployed else ledger_key(device, partition, data.user_id)
    incoming = arrays_to_state(msg.content[ARRAYS_KEY])
    micro = device_micro_batch(cfg, deployed) if deployed is not None else None  # its memory profile's cap
    # with a split adapter the private part is restored from, and saved back to, the device's own state
    try:
        trained = train_one(model, state, cfg, incoming, data, plan, key, device, physical_batch_size=micro)
    except Declined as err:  # too small for its DP budget or its budget spent: a clean decline, detail kept here
        log.warning("declined round %d (%s): %s", plan.server_round, err.reason, err)
        if deployed is None:
            ctx.run.append_event(declined_event(plan.server_round, device, data.user_id, err))
        return decline(msg, err.reason)
    update, arrays = trained.update, tensors_to_arrays(trained.payload)
    seconds = time.perf_counter() - start
    sim_seconds = fleet.seconds(plan.server_round, payload_bytes(msg.content[ARRAYS_KEY]), update.tokens,
                                payload_bytes(arrays)) if fleet is not None else -1.0
    ctx.run.append_event(client_done(plan, partition=partition, device=device, user=data.user_id, seconds=seconds,
                                     update=update, sim_seconds=sim_seconds, model_loads=load_count()))
    policy = resolve_figures(cfg.federation.reply_figures, deployed is not None)
    metrics = update_to_metrics(update, seconds, partition, device=device, rank=plan.rank or cfg.adapter.rank,
                                sim_seconds=sim_seconds, policy=policy)
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
    from fedtune.flower.secagg_client import handle_secagg  # it calls handle_train

    app.query("secagg")(handle_secagg)  # secure aggregation's key, share and unmask stages
    app.train("secagg")(handle_secagg)  # its masked-input stage: train, then mask
    app.evaluate()(handle_evaluate)
    return app
