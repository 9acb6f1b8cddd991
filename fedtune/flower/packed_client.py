"""Client side of packed training: one ``train.packed`` message trains a group of virtual devices at once.

Message translation only: the group's parts (``arrays.<i>`` / ``config.<i>``; one fleet tier per group) become typed tasks for
the engine's ``train_group`` (``fedtune.federation.device_round``: the same device state, ledgers, private
parts, streams and upload encoding as one device at a time), and its results become ``arrays.<i>`` /
``metrics.<i>`` per device, ``declined.<i>`` (its reason) for a device that declines (too small for its DP
budget: ``too_small``; its own budget spent: ``budget_spent``), or ``error.<i>`` for a device that dropped out.
``PackedGrid`` on the server turns the reply back into one reply per device.
"""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedtune.data.partition import load_client_data
from fedtune.federation.device_round import Declined, DeviceState, declined_event, train_group
from fedtune.federation.reply_figures import resolve as resolve_figures
from fedtune.federation.task import TaskPlan
from fedtune.federation.virtual_device import client_done, ledger_key, partition_of
from fedtune.flower.context import run_context, simulated_params
from fedtune.flower.device import DECLINED_KEY
from fedtune.flower.packed_grid import GROUP_KEY, arrays_part, part_key
from fedtune.federation.fleet_device import fleet_device
from fedtune.types import AdapterState
from fedtune.flower.records import (
    ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, arrays_to_state, payload_bytes, tensors_to_arrays, update_to_metrics,
)


def handle_train_group(msg: Message, context: Context) -> Message:
    ctx = run_context(context.run_config)
    cfg = ctx.cfg
    start = time.perf_counter()
    group = msg.content[GROUP_KEY]
    size = int(group["size"])
    decoded: dict[int, AdapterState] = {}  # the adapter a part carries, decoded once for every device sent it
    state = DeviceState.simulated(ctx.run.root / "state", cfg.seed)
    plans, devices, partitions, datas, keys, incoming = [], [], [], [], [], []
    for i in range(size):
        plan = TaskPlan.from_wire(msg.content[part_key(CONFIG_KEY, i)])
        device = plan.device if plan.device is not None else i
        partition = partition_of(device, len(ctx.data_index))
        data = load_client_data(ctx.run.data, partition)
        plans.append(plan), devices.append(device), partitions.append(partition), datas.append(data)
        keys.append(ledger_key(device, partition, data.user_id))
        j = arrays_part(group, i)
        if j not in decoded:
            decoded[j] = arrays_to_state(msg.content[part_key(ARRAYS_KEY, j)])
        incoming.append({k: v.clone() for k, v in decoded[j].items()} if j != i else decoded[j])
    model, info = ctx.model(quantization=plans[0].quantization, rank=plans[0].rank, alpha=plans[0].alpha)
    reply = RecordDict()
    fleet = [None] * size
    if cfg.fleet.enabled:  # a fleet tier's group: simulated dropouts and clocks per device
        params = simulated_params(cfg, info)
        fleet = [fleet_device(cfg, d, params) for d in devices]
    train = [i for i in range(size) if fleet[i] is None or not fleet[i].drops_out(plans[i].server_round)]
    for i in set(range(size)) - set(train):
        reply[part_key("error", i)] = ConfigRecord({"reason": f"device {devices[i]} dropped out"})
    pick = lambda xs: [xs[i] for i in train]  # noqa: E731
    results = dict(zip(train, train_group(model, state, cfg, pick(incoming), pick(datas), pick(plans), pick(keys),
                                           pick(devices)) if train else []))
    seconds = time.perf_counter() - start
    for i, res in results.items():
        if isinstance(res, Declined):
            reply[part_key(DECLINED_KEY, i)] = ConfigRecord({"reason": res.reason})
            ctx.run.append_event(declined_event(plans[i].server_round, devices[i], datas[i].user_id, res))
            continue
        update = res.update
        arrays = tensors_to_arrays(res.payload)
        sim_seconds = fleet[i].seconds(plans[i].server_round, payload_bytes(msg.content[part_key(ARRAYS_KEY, arrays_part(group, i))]),
                                       update.tokens, payload_bytes(arrays)) if fleet[i] is not None else -1.0
        reply[part_key(ARRAYS_KEY, i)] = arrays
        reply[part_key(METRICS_KEY, i)] = update_to_metrics(update, seconds, partitions[i], device=devices[i],
                                                            rank=plans[i].rank or cfg.adapter.rank,
                                                            sim_seconds=sim_seconds,
                                                            policy=resolve_figures(cfg.federation.reply_figures,
                                                                                   False))
        ctx.run.append_event(client_done(plans[i], partition=partitions[i], device=devices[i], user=datas[i].user_id,
                                         seconds=seconds, update=update, sim_seconds=sim_seconds, packed_group=size))
    return Message(content=reply, reply_to=msg)
