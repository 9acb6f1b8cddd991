"""Packed training through real Flower messages and the real ClientApp: the strategy sees the same
per-device replies (same source nodes, same keys, same adapters) as when every device trains alone."""

import pytest
import torch
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict

from fedtune.adapters import get_adapter_state
from fedtune.config import dump_config
from fedtune.data import build_client_data, save_client_data
from fedtune.flower.client_app import build_client_app
from fedtune.flower.context import run_context
from fedtune.flower.packed_grid import PackedGrid, arrays_part, make_groups, pack_group, unpack_reply
from fedtune.flower.records import UPDATE_METRIC_KEYS, arrays_to_state, state_to_arrays
from fedtune.models.tokenizer import ByteEncoder
from fedtune.workspace import RunDir
from tests.conftest import make_config

NODES = [31, 12, 27]  # sorted: 12 -> device 0, 27 -> device 1, 31 -> device 2


def _run(tmp_path, name):
    cfg = make_config(privacy={"enabled": True, "noise_multiplier": 0.8})
    run = RunDir.create(tmp_path / name)
    dump_config(cfg, run.config)
    save_client_data(build_client_data(cfg.data, ByteEncoder(), cfg.seed), run.data)
    return {"config-path": str(run.config), "run-dir": str(run.root)}


class LocalGrid:
    """Delivers each message to the real ClientApp as its node would (no Ray)."""

    def __init__(self, run_config):
        self.app, self.run_config, self.sent = build_client_app(), run_config, []

    def get_node_ids(self):
        return list(NODES)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            self.sent.append(m)
            node = m.metadata.dst_node_id
            ctx = Context(run_id=1, node_id=node, node_config={"partition-id": 0, "num-partitions": 3},
                          state=RecordDict(), run_config=self.run_config)
            out.append(self.app(m, ctx))
        return out


def _messages(state, device_index: bool):
    shared = ConfigRecord({"server-round": 1, "local-steps": 2, "batch-size": 4, "lr": 0.01})
    record = RecordDict({"arrays": state_to_arrays(state), "config": shared})  # one record, as FedAvg sends
    out = []
    for node in NODES:
        content = record
        if device_index:
            content = RecordDict({"arrays": record["arrays"],
                                  "config": ConfigRecord({**dict(shared), "device-index": sorted(NODES).index(node)})})
        out.append(Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN))
    return out


def test_packed_replies_equal_unpacked_replies(tmp_path):
    alone_config, packed_config = _run(tmp_path, "alone"), _run(tmp_path, "packed")
    state = get_adapter_state(run_context(alone_config).model()[0])
    alone = LocalGrid(alone_config).send_and_receive(_messages(state, device_index=True))
    inner = LocalGrid(packed_config)
    packed = list(PackedGrid(inner, group_size=2).send_and_receive(_messages(state, device_index=False)))
    assert [m.metadata.message_type for m in inner.sent] == ["train.packed", "train.packed"]  # groups of 2 + 1
    assert all(not m.has_error() for m in alone + packed)
    by_node = {m.metadata.src_node_id: m for m in packed}
    assert sorted(by_node) == sorted(NODES)
    for a in alone:
        p = by_node[a.metadata.src_node_id]
        assert set(p.content.keys()) == {"arrays", "metrics"} and set(p.content["metrics"]) == set(UPDATE_METRIC_KEYS)
        sa, sp = arrays_to_state(a.content["arrays"]), arrays_to_state(p.content["arrays"])
        assert set(sa) == set(sp)
        # equal up to one fp16 rounding step of the upload (packed and one-at-a-time sum in another order)
        assert all(((sa[k] - sp[k]).abs() <= 1e-5 + 2.0 ** -10 * sa[k].abs()).all() for k in sa)
        assert max((sa[k] - state[k]).abs().max().item() for k in sa) > 1e-4  # it trained
        for key in ("device", "num-examples", "epsilon", "steps", "tokens"):
            assert a.content["metrics"][key] == p.content["metrics"][key], key


def test_a_failed_part_or_group_fails_only_those_devices():
    state = {"x.lora_A.weight": torch.zeros(2, 3)}
    msgs = _messages(state, device_index=False)
    group = pack_group(msgs, [0, 1, 2])
    assert [dict(group.content[f"config.{i}"])["device-index"] for i in range(3)] == [0, 1, 2]
    assert "device-index" not in msgs[0].content["config"]  # the strategy's shared record is untouched
    reply_content = RecordDict({"arrays.0": group.content["arrays.0"], "error.1": ConfigRecord({"reason": "budget"}),
                                "arrays.2": group.content["arrays.0"]})
    from fedtune.flower.records import update_to_metrics
    from fedtune.types import ClientUpdate

    for i in (0, 2):
        reply_content[f"metrics.{i}"] = update_to_metrics(ClientUpdate(state, 1, 0.5), 1.0, i)
    replies = unpack_reply(Message(reply_content, reply_to=group), msgs)
    assert [r.has_error() for r in replies] == [False, True, False]
    assert [r.metadata.src_node_id for r in replies] == NODES
    failed = unpack_reply(Message(Error(5, "worker died"), reply_to=group), msgs)
    assert all(r.has_error() and "worker died" in r.error.reason for r in failed)


def test_groups_share_steps_and_lr():
    state = {"x.lora_A.weight": torch.zeros(2, 3)}
    msgs = _messages(state, device_index=False)
    odd = Message(RecordDict({"arrays": msgs[0].content["arrays"],
                              "config": ConfigRecord({"server-round": 1, "local-steps": 5, "batch-size": 4, "lr": 0.01})}),
                  dst_node_id=99, message_type=MessageType.TRAIN)
    groups = make_groups(msgs + [odd], group_size=8)
    assert [len(g) for g in groups] == [3, 1]


def test_a_shared_adapter_travels_once_and_each_device_gets_its_own():
    state = {"x.lora_A.weight": torch.zeros(2, 3)}
    msgs = _messages(state, device_index=False)  # FedAvg's way: one ArrayRecord for every device
    other = state_to_arrays({"x.lora_A.weight": torch.ones(2, 3)})  # a device sent another adapter
    msgs[1] = Message(RecordDict({"arrays": other, "config": msgs[1].content["config"]}),
                      dst_node_id=NODES[1], message_type=MessageType.TRAIN)
    group = pack_group(msgs, [0, 1, 2])
    assert sorted(k for k in group.content.array_records) == ["arrays.0", "arrays.1"]  # not a copy per device
    assert [arrays_part(group.content["group"], i) for i in range(3)] == [0, 1, 0]
    assert arrays_part(ConfigRecord({"size": 3}), 2) == 2  # a group packed before sharing: its own part
