"""The ClientApp on real Flower messages: what crosses the wire, and nothing else."""

import io

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedtune.adapters import get_adapter_state
from fedtune.config import dump_config
from fedtune.data import build_client_data, save_client_data
from fedtune.flower.client_app import build_client_app
from fedtune.flower.context import run_context
from fedtune.flower.records import UPDATE_METRIC_KEYS, arrays_to_tensors, payload_bytes, state_to_arrays
from fedtune.models.tokenizer import ByteEncoder
from fedtune.privacy import LedgerStore
from fedtune.workspace import RunDir
from tests.conftest import make_config


@pytest.fixture
def run_setup(tmp_path):
    cfg = make_config(model={"quantization": "nf4"}, privacy={"enabled": True, "noise_multiplier": 0.8})
    run = RunDir.create(tmp_path / "run")
    dump_config(cfg, run.config)
    save_client_data(build_client_data(cfg.data, ByteEncoder(), cfg.seed), run.data)
    run_config = {"config-path": str(run.config), "run-dir": str(run.root)}
    return cfg, run, run_config


def _train_message(state, server_round=1):
    content = RecordDict({"arrays": state_to_arrays(state),
                          "config": ConfigRecord({"server-round": server_round, "local-steps": 2,
                                                  "batch-size": 4, "lr": 0.01})})
    return Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)


def _context(run_config, partition):
    return Context(run_id=1, node_id=7, node_config={"partition-id": partition, "num-partitions": 3},
                   state=RecordDict(), run_config=run_config)


def test_only_adapter_tensors_cross_the_wire(run_setup):
    cfg, run, run_config = run_setup
    app = build_client_app()
    model, _ = run_context(run_config).model()
    state = get_adapter_state(model)
    msg = _train_message(state)
    # downlink: the message the server sends holds the adapter and the task, nothing else
    assert set(msg.content.keys()) == {"arrays", "config"}
    assert set(arrays_to_tensors(msg.content["arrays"])) == set(state)
    reply = app(msg, _context(run_config, 0))
    assert not reply.has_error(), reply.error
    content = reply.content
    # uplink: exactly one ArrayRecord with exactly the adapter keys, one MetricRecord of numbers
    assert set(content.array_records) == {"arrays"} and set(content.metric_records) == {"metrics"}
    assert not content.config_records
    # the adapter travels flat: a layout and one buffer that holds exactly the adapter's values, no more
    assert set(content["arrays"].keys()) == {"layout", "flat:float16"}  # fp16: federation.upload's default
    assert content["arrays"]["flat:float16"].shape == (sum(v.numel() for v in state.values()),)
    arrays = arrays_to_tensors(content["arrays"])
    assert set(arrays) == set(state) and all(arrays[k].shape == state[k].shape for k in state)
    assert all("lora_" in k for k in arrays)
    assert set(content["metrics"].keys()) == set(UPDATE_METRIC_KEYS)
    base_names = {n for n, _ in model.named_parameters() if "lora_" not in n}
    assert not (set(arrays) & base_names)


def test_upload_byte_count(run_setup):
    cfg, run, run_config = run_setup
    app = build_client_app()
    state = get_adapter_state(run_context(run_config).model()[0])
    reply = app(_train_message(state), _context(run_config, 1))
    arrays: ArrayRecord = reply.content["arrays"]
    # the adapter travels as one fp16 .npy buffer (federation.upload's default) plus its layout: .npy bytes
    npy = lambda a: (np.save(buf := io.BytesIO(), a, allow_pickle=False), len(buf.getvalue()))[1]  # noqa: E731
    flat = arrays["flat:float16"].numpy()
    assert flat.shape == (sum(t.numel() for t in state.values()),)
    assert payload_bytes(arrays) == npy(flat) + npy(arrays["layout"].numpy())
    raw = sum(t.numel() * 2 for t in state.values())
    assert raw < payload_bytes(arrays) <= raw + 2 * 128 + sum(len(k) + 32 for k in state)  # headers + layout
    # LoRA r=4 on q (64->64) and v (64->32: 2 kv heads x 16) of the 2-layer tiny model, fp16
    assert raw == 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4)) * 2


def test_epsilon_persists_across_rounds_and_workers(run_setup):
    cfg, run, run_config = run_setup
    state = get_adapter_state(run_context(run_config).model()[0])
    eps = []
    for server_round in (1, 2, 3):
        app = build_client_app()  # a fresh app object each round, as a recycled worker would have
        reply = app(_train_message(state, server_round), _context(run_config, 2))
        eps.append(reply.content["metrics"]["epsilon"])
    assert 0 < eps[0] < eps[1] < eps[2]
    ledger = LedgerStore(run.ledgers).load("user-002")
    assert ledger.rounds == [1, 2, 3] and ledger.steps == 6
    assert ledger.epsilon(cfg.privacy.delta) == pytest.approx(eps[2])


def test_missing_partition_id_is_explained(run_setup):
    cfg, run, run_config = run_setup
    app = build_client_app()
    state = get_adapter_state(run_context(run_config).model()[0])
    ctx = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config=run_config)
    with pytest.raises(KeyError, match="partition-id"):
        app(_train_message(state), ctx)


def test_state_written_in_round_r_is_read_back_in_round_r_plus_k(run_setup):
    """A device's ledger lives on disk: sampled in rounds 2 and 5, it resumes where it stopped."""
    cfg, run, run_config = run_setup
    state = get_adapter_state(run_context(run_config).model()[0])
    r2 = build_client_app()(_train_message(state, 2), _context(run_config, 1))
    store = LedgerStore(run.ledgers)
    assert store.load("user-001").rounds == [2]
    r5 = build_client_app()(_train_message(state, 5), _context(run_config, 1))
    ledger = store.load("user-001")
    assert ledger.rounds == [2, 5] and ledger.steps == 4
    assert r5.content["metrics"]["epsilon"] > r2.content["metrics"]["epsilon"]
    assert (run.ledgers / "user-001.json").is_file()


def test_fleet_device_index_overrides_the_partition(run_setup, tmp_path):
    """In a fleet simulation the server names the device; its data is user (device mod users)."""
    cfg, run, run_config = run_setup
    state = get_adapter_state(run_context(run_config).model()[0])
    msg = _train_message(state, 1)
    msg.content["config"]["device-index"] = 7  # 7 mod 3 users -> user-001's data, its own ledger
    reply = build_client_app()(msg, _context(run_config, 0))
    metrics = reply.content["metrics"]
    assert metrics["device"] == 7 and metrics["partition"] == 1
    assert LedgerStore(run.ledgers).load("device-7").rounds == [1]


def test_a_device_stops_contributing_once_its_own_budget_is_spent(tmp_path):
    from fedtune.flower.device import declined_reason

    cfg = make_config(model={"quantization": "nf4"},
                      privacy={"enabled": True, "noise_multiplier": 0.8, "device_epsilon_budget": 1.0})
    run = RunDir.create(tmp_path / "run")
    dump_config(cfg, run.config)
    save_client_data(build_client_data(cfg.data, ByteEncoder(), cfg.seed), run.data)
    run_config = {"config-path": str(run.config), "run-dir": str(run.root)}
    state = get_adapter_state(run_context(run_config).model()[0])
    first = build_client_app()(_train_message(state, 1), _context(run_config, 0))
    assert first.content["metrics"]["epsilon"] > 1.0  # one round already spends more than the budget
    second = build_client_app()(_train_message(state, 2), _context(run_config, 0))
    assert declined_reason(second) == "budget_spent" and "arrays" not in second.content  # a decline, not an error
    assert LedgerStore(run.ledgers).load("user-000").rounds == [1]  # nothing trained after the budget


def test_evaluate_reports_the_clients_heldout_loss(run_setup):
    from fedtune.data.partition import load_client_data
    from fedtune.training import evaluate_chunks

    cfg, run, run_config = run_setup
    model = run_context(run_config).model()[0]
    state = {k: v + 0.01 for k, v in get_adapter_state(model).items()}
    msg = Message(content=RecordDict({"arrays": state_to_arrays(state), "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=7, message_type=MessageType.EVALUATE)
    reply = build_client_app()(msg, _context(run_config, 2))
    metrics = reply.content["metrics"]
    held = load_client_data(run.data, 2).heldout
    assert metrics["num-examples"] == held.shape[0]
    assert metrics["eval-loss"] == pytest.approx(evaluate_chunks(model, held).loss)  # model holds `state` now
    assert not reply.content.array_records  # evaluation sends nothing back but numbers
