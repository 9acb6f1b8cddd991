"""Through the real ClientApps (plain, packed, deployed): a device too small for its per-device DP budget
answers a clean decline (``too_small``) instead of a failed reply, and trains and spends nothing."""

import json

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedtune.adapters import get_adapter_state
from fedtune.config import dump_config
from fedtune.data import save_client_data
from fedtune.flower.client_app import build_client_app, handle_train
from fedtune.flower.context import run_context
from fedtune.flower.device import declined_reason
from fedtune.flower.packed_grid import PackedGrid
from fedtune.flower.records import state_to_arrays
from fedtune.workspace import RunDir, read_jsonl
from tests.conftest import make_config
from tests.unit.federation.test_sit_out import DP, tiny_fleet
from tests.unit.flower.test_packed_grid import NODES, LocalGrid, _messages


def _run(tmp_path, **sections):
    cfg = make_config(privacy=DP, federation={"rounds": 1}, train={"local_steps": 1}, **sections)
    run = RunDir.create(tmp_path / "run")
    dump_config(cfg, run.config)
    clients = tiny_fleet(cfg)
    save_client_data(clients, run.data)
    return clients, run, {"config-path": str(run.config), "run-dir": str(run.root)}


def _message(run_config, node=7):
    state = get_adapter_state(run_context(run_config).model()[0])
    return Message(content=RecordDict({"arrays": state_to_arrays(state), "config": ConfigRecord(
        {"server-round": 1, "local-steps": 1, "batch-size": 4, "lr": 0.01})}), dst_node_id=node,
        message_type=MessageType.TRAIN)


def test_a_too_small_virtual_device_declines_and_the_others_train(tmp_path):
    clients, run, run_config = _run(tmp_path)
    app = build_client_app()
    replies = [app(_message(run_config), Context(run_id=1, node_id=7, node_config={"partition-id": p,
                                                  "num-partitions": 3}, state=RecordDict(), run_config=run_config))
               for p in range(3)]
    assert [declined_reason(r) for r in replies] == [None, "too_small", None]
    assert not replies[1].has_error() and "arrays" not in replies[1].content
    assert all("arrays" in replies[p].content for p in (0, 2))
    assert not (run.ledgers / f"{clients[1].user_id}.json").exists()
    events = [e for e in read_jsonl(run.events) if e["event"] == "client_declined"]
    assert [(e["user"], e["reason"]) for e in events] == [(clients[1].user_id, "too_small")]


def test_packed_group_declines_only_the_too_small_device(tmp_path):
    clients, run, run_config = _run(tmp_path)
    state = get_adapter_state(run_context(run_config).model()[0])
    msgs = _messages(state, device_index=False)
    for m in msgs:  # one step, as the run plans
        m.content["config"]["local-steps"] = 1
    replies = {r.metadata.src_node_id: r for r in PackedGrid(LocalGrid(run_config), 3).send_and_receive(msgs)}
    by_device = [replies[n] for n in sorted(NODES)]  # sorted node ids are devices 0, 1, 2
    assert [declined_reason(r) for r in by_device] == [None, "too_small", None]
    assert not by_device[1].has_error() and "arrays" not in by_device[1].content
    assert all("arrays" in by_device[d].content for d in (0, 2))
    assert not (run.ledgers / f"{clients[1].user_id}.json").exists()


def test_a_deployed_device_with_too_little_data_declines(tmp_path):
    _, _, run_config = _run(tmp_path, data={"seq_len": 32})
    path = tmp_path / "mine.jsonl"  # a device with one short note: about two chunks
    path.write_text(json.dumps({"text": "note: " + "charlie delta echo " * 4}) + "\n")
    reply = handle_train(_message(run_config), Context(run_id=1, node_id=7, node_config={
        "data-path": str(path), "device-id": "phone-9", "state-dir": str(tmp_path / "state")},
        state=RecordDict(), run_config=run_config))
    assert declined_reason(reply) == "too_small" and "arrays" not in reply.content
    assert not (tmp_path / "state" / "ledgers").exists()  # nothing trained, nothing spent


def test_the_fleet_strategy_counts_a_decline_as_declined_not_rejected():
    from fedtune.adapters import create_adapter
    from fedtune.flower.device import decline
    from fedtune.flower.fleet_strategy import FleetFedAvg
    from fedtune.models import load_base_model
    from tests.unit.flower.test_fleet import _cfg, _coord

    cfg = _cfg()
    init = get_adapter_state(create_adapter(load_base_model(cfg.model)[0], cfg.adapter, seed=0))
    s = FleetFedAvg(reference=init, coordinator=_coord(), rank_aggregation="zeropad", scale=2.0, min_clients=2, seed=0)
    s.aggregate_train(1, [decline(Message(RecordDict(), dst_node_id=5, message_type=MessageType.TRAIN), "too_small")])
    stats = s.stats[1]
    assert dict(stats.declined) == {"too_small": 1} and not stats.rejected and stats.failed == 0
