"""Through the real ClientApps (plain, packed, deployed): a device whose own ε is at its
``privacy.device_epsilon_budget`` answers a clean decline (``budget_spent``), not a failed reply, and trains and
spends nothing; the strategies count it as declined."""

import json

import pytest
from flwr.app import Context, Message, MessageType, RecordDict

from fedtune.adapters import get_adapter_state
from fedtune.config import dump_config
from fedtune.data import build_client_data, save_client_data
from fedtune.flower.client_app import build_client_app, handle_train
from fedtune.flower.context import run_context
from fedtune.flower.device import decline, declined_reason
from fedtune.flower.packed_grid import PackedGrid
from fedtune.models.tokenizer import ByteEncoder
from fedtune.privacy import LedgerStore
from fedtune.workspace import RunDir, read_jsonl
from tests.conftest import make_config
from tests.unit.federation.test_budget_spent import dp_at_budget, spend
from tests.unit.flower.test_packed_grid import NODES, LocalGrid, _messages
from tests.unit.flower.test_sit_out import _message


@pytest.fixture
def spent_run(tmp_path):
    """A run whose user 1 already holds a ledger at its budget."""
    cfg = make_config(privacy=dp_at_budget(), federation={"rounds": 1}, train={"local_steps": 1})
    run = RunDir.create(tmp_path / "run")
    dump_config(cfg, run.config)
    clients = build_client_data(cfg.data, ByteEncoder(), cfg.seed)
    save_client_data(clients, run.data)
    return clients, run, {"config-path": str(run.config), "run-dir": str(run.root)}, spend(run.ledgers,
                                                                                          clients[1].user_id)


def _unchanged(ledgers, user, before) -> bool:
    after = LedgerStore(ledgers).load(user)
    return (after.history, after.rounds) == (before.history, before.rounds)


def test_a_spent_virtual_device_declines_and_the_others_train(spent_run):
    clients, run, run_config, before = spent_run
    app = build_client_app()
    replies = [app(_message(run_config), Context(run_id=1, node_id=7, node_config={"partition-id": p,
                                                  "num-partitions": 3}, state=RecordDict(), run_config=run_config))
               for p in range(3)]
    assert [declined_reason(r) for r in replies] == [None, "budget_spent", None]
    assert not replies[1].has_error() and "arrays" not in replies[1].content
    assert all("arrays" in replies[p].content for p in (0, 2))
    assert _unchanged(run.ledgers, clients[1].user_id, before)
    events = [e for e in read_jsonl(run.events) if e["event"] == "client_declined"]
    assert [(e["user"], e["reason"]) for e in events] == [(clients[1].user_id, "budget_spent")]


def test_packed_group_declines_only_the_spent_device(spent_run):
    clients, run, run_config, before = spent_run
    state = get_adapter_state(run_context(run_config).model()[0])
    msgs = _messages(state, device_index=False)
    for m in msgs:
        m.content["config"]["local-steps"] = 1
    replies = {r.metadata.src_node_id: r for r in PackedGrid(LocalGrid(run_config), 3).send_and_receive(msgs)}
    by_device = [replies[n] for n in sorted(NODES)]  # sorted node ids are devices 0, 1, 2
    assert [declined_reason(r) for r in by_device] == [None, "budget_spent", None]
    assert not by_device[1].has_error() and "arrays" not in by_device[1].content
    assert _unchanged(run.ledgers, clients[1].user_id, before)
    events = [e for e in read_jsonl(run.events) if e["event"] == "client_declined"]
    assert [(e["user"], e["reason"]) for e in events] == [(clients[1].user_id, "budget_spent")]


def test_a_deployed_device_at_its_budget_declines(spent_run, tmp_path):
    _, _, run_config, _ = spent_run
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"note {i}: " + "charlie delta echo " * 40}) for i in range(8)))
    before = spend(tmp_path / "state" / "ledgers", "phone-9")
    reply = handle_train(_message(run_config), Context(run_id=1, node_id=7, node_config={
        "data-path": str(path), "device-id": "phone-9", "state-dir": str(tmp_path / "state")},
        state=RecordDict(), run_config=run_config))
    assert declined_reason(reply) == "budget_spent" and "arrays" not in reply.content
    assert _unchanged(tmp_path / "state" / "ledgers", "phone-9", before)


def test_the_strategy_counts_the_spent_devices_reply_as_declined_not_failed(spent_run):
    """The plain ClientApp's three replies (one of them the spent device's) into the server's strategy."""
    from fedtune.flower.strategy import AdapterFedAvg

    _, _, run_config, _ = spent_run
    state = get_adapter_state(run_context(run_config).model()[0])
    app = build_client_app()
    replies = [app(_message(run_config, node=10 + p), Context(run_id=1, node_id=10 + p, node_config={
        "partition-id": p, "num-partitions": 3}, state=RecordDict(), run_config=run_config)) for p in range(3)]
    s = AdapterFedAvg(reference=state, clients_per_round=3, min_clients=2, seed=0)
    s.aggregate_train(1, replies)
    stats = s.stats[1]
    assert dict(stats.declined) == {"budget_spent": 1} and stats.failed == 0 and not stats.rejected
    assert stats.succeeded == 2


def test_the_fleet_strategy_counts_a_spent_device_as_declined_not_failed():
    from fedtune.adapters import create_adapter
    from fedtune.flower.fleet_strategy import FleetFedAvg
    from fedtune.models import load_base_model
    from tests.unit.flower.test_fleet import _cfg, _coord

    cfg = _cfg()
    init = get_adapter_state(create_adapter(load_base_model(cfg.model)[0], cfg.adapter, seed=0))
    s = FleetFedAvg(reference=init, coordinator=_coord(), rank_aggregation="zeropad", scale=2.0, min_clients=2, seed=0)
    s.aggregate_train(1, [decline(Message(RecordDict(), dst_node_id=5, message_type=MessageType.TRAIN),
                                  "budget_spent")])
    stats = s.stats[1]
    assert dict(stats.declined) == {"budget_spent": 1} and not stats.rejected and stats.failed == 0
