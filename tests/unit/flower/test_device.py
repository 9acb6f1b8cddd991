"""The ClientApp on a real device: its node config, its own file, its eligibility, a clean decline."""

import json
from types import SimpleNamespace

import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedtune.flower.device import (
    DeviceSettings, check_eligibility, decline, declined_reason, device_data, device_micro_batch, device_settings,
)
from tests.conftest import make_config


def _ctx(node_config, node_id=42):
    return SimpleNamespace(node_config=node_config, node_id=node_id)


def test_a_virtual_node_has_no_device_settings():
    assert device_settings(_ctx({"partition-id": 0, "num-partitions": 4})) is None


def test_device_settings_from_node_config(tmp_path):
    s = device_settings(_ctx({"data-path": "/d.jsonl", "profile": "phone-low", "eligibility": "charging",
                              "device-id": "", "state-dir": str(tmp_path)}))
    assert s.data_path == "/d.jsonl" and s.profile == "phone-low" and s.device_id == "node-42"
    assert 0 <= s.index < 2**31 and s.index == device_settings(_ctx({"data-path": "x"}, 42)).index


def test_device_loads_its_own_file_and_profile_caps_the_micro_batch(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"text": "alpha bravo charlie " * 20, "user_id": "x"}) + "\n"
                            for _ in range(6)))
    cfg = make_config(data={"seq_len": 32})
    s = DeviceSettings(str(path), "phone-low", "always", "me", str(tmp_path))
    data = device_data(cfg, s)
    assert data.user_id == "me" and data.num_train > 0 and data.train.shape[1] == 32
    assert device_micro_batch(cfg, s) == 2  # phone-low's batch size
    assert device_micro_batch(make_config(train={"batch_size": 8, "physical_batch_size": 1}), s) == 1  # the smaller
    assert device_micro_batch(cfg, DeviceSettings(str(path), "", "always", "me", str(tmp_path))) is None  # no cap
    with pytest.raises(ValueError, match="not in"):
        device_micro_batch(cfg, DeviceSettings(str(path), "toaster", "always", "me", str(tmp_path)))


def test_an_ineligible_device_declines_with_its_reason(tmp_path):
    s = DeviceSettings("x", "", "never", "me", str(tmp_path))
    verdict = check_eligibility(s)
    assert not verdict.eligible and verdict.reason == "paused"
    msg = Message(content=RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=3,
                  message_type=MessageType.TRAIN)
    reply = decline(msg, verdict.reason)
    assert declined_reason(reply) == "paused"


@pytest.fixture
def deployed(tmp_path):
    from fedtune.config import dump_config
    from fedtune.workspace import RunDir

    cfg = make_config(privacy={"enabled": True, "noise_multiplier": 0.8}, data={"seq_len": 32})
    run = RunDir.create(tmp_path / "run")  # the server's run dir: this device never reads its data
    dump_config(cfg, run.config)
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"text": f"note {i}: " + "charlie delta echo " * 12}) + "\n" for i in range(8)))
    return {"config-path": str(run.config), "run-dir": str(run.root)}, path, tmp_path / "state"


def _train(run_config, node_config, batch_size=4):
    import torch
    from flwr.app import Context

    from fedtune.flower.client_app import handle_train
    from fedtune.flower.context import run_context
    from fedtune.adapters import get_adapter_state
    from fedtune.flower.records import state_to_arrays

    state = get_adapter_state(run_context(run_config).model()[0])
    msg = Message(content=RecordDict({"arrays": state_to_arrays(state), "config": ConfigRecord(
        {"server-round": 1, "local-steps": 2, "batch-size": batch_size, "lr": 0.01})}), dst_node_id=7,
        message_type=MessageType.TRAIN)
    ctx = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config)
    return handle_train(msg, ctx)


def test_client_app_on_a_device_trains_on_its_own_file(deployed):
    run_config, path, state = deployed
    reply = _train(run_config, {"data-path": str(path), "profile": "laptop-8gb", "device-id": "phone-7",
                                "state-dir": str(state)})
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] > 0 and metrics["epsilon"] > 0 and metrics["partition"] == -1
    # a deployed device's reply carries only what aggregation needs (reply_figures: auto -> minimal)
    n = metrics["num-examples"]
    assert n & (n - 1) == 0 and metrics["train-loss"] == -1 and metrics["tokens"] == -1
    assert (state / "ledgers" / "phone-7.json").is_file()  # the device keeps its own privacy ledger


def test_a_deployed_devices_memory_profile_caps_its_micro_batch_not_the_planned_batch(deployed):
    """phone-low holds 2 sequences a step: asked for a logical (Poisson) batch of 8, the device trains that
    batch (its DP sample rate is the planned one) with no forward above 2 sequences."""
    from fedtune.flower.context import run_context
    from fedtune.privacy import LedgerStore
    from fedtune.privacy.device_budget import loader_sample_rate

    run_config, path, state = deployed
    node = {"data-path": str(path), "profile": "phone-low", "device-id": "phone-2", "state-dir": str(state)}
    ctx = run_context(run_config)
    embeddings = ctx.model()[0].get_input_embeddings()
    seen = []
    hook = embeddings.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    try:
        reply = _train(run_config, node, batch_size=8)
    finally:
        hook.remove()
    assert "arrays" in reply.content, reply.content
    assert seen and max(seen) <= 2  # every forward within the profile's cap, Poisson tails included
    n = device_data(ctx.cfg, DeviceSettings(str(path), "phone-low", "always", "phone-2", str(state))).num_train
    (_, q, steps), = LedgerStore(state / "ledgers").load("phone-2").history
    assert q == pytest.approx(loader_sample_rate(n, 8)) and q != pytest.approx(loader_sample_rate(n, 2))
    assert steps == 2 and len(seen) >= steps


def test_a_device_declines_a_replayed_round_and_never_trains_it_twice(deployed):
    """A server that resends a round (to average two noise draws on the same data) gets a decline."""
    from fedtune.privacy import LedgerStore

    run_config, path, state = deployed
    node = {"data-path": str(path), "device-id": "phone-8", "state-dir": str(state)}
    first = _train(run_config, node)
    assert "arrays" in first.content
    again = _train(run_config, node)  # the same run, server-round 1 again
    assert declined_reason(again) == "stale_round" and "arrays" not in again.content
    assert LedgerStore(state / "ledgers").load("phone-8").rounds == [1]  # charged once


def test_client_app_on_an_ineligible_device_declines(deployed):
    run_config, path, state = deployed
    reply = _train(run_config, {"data-path": str(path), "eligibility": "never", "state-dir": str(state)})
    assert declined_reason(reply) == "paused" and "arrays" not in reply.content
    assert not (state / "ledgers").exists()  # nothing trained, nothing spent


def test_a_device_that_cannot_read_the_servers_files_uses_the_shipped_config(tmp_path, monkeypatch):
    from fedtune.config import dump_config
    from fedtune.flower.context import run_context

    cfg = make_config(train={"local_steps": 7})
    dump_config(cfg, tmp_path / "server.yaml")
    monkeypatch.setenv("FEDTUNE_DEVICE_HOME", str(tmp_path / "device"))
    ctx = run_context({"config-path": "/srv/nowhere/config.yaml", "run-dir": "/srv/nowhere/run",
                       "config-yaml": (tmp_path / "server.yaml").read_text()})
    assert ctx.cfg == cfg and ctx.cfg.train.local_steps == 7
    assert str(ctx.run.root).startswith(str(tmp_path / "device" / "runs"))
    assert not __import__("pathlib").Path("/srv/nowhere").exists()


def test_a_warm_process_rereads_a_changed_data_file(tmp_path):
    """One ClientApp process serves every round of a device: new rows in its file are seen next round."""
    import json
    import os

    from fedtune.flower.device import DeviceSettings, device_data
    from tests.conftest import make_config

    cfg = make_config()
    path = tmp_path / "me.jsonl"
    path.write_text(json.dumps({"text": "alpha bravo " * 60}) + "\n")
    settings = DeviceSettings(data_path=str(path), profile="", eligibility="always", device_id="me",
                              state_dir=str(tmp_path / "state"))
    first = device_data(cfg, settings)
    assert device_data(cfg, settings) is first  # cached while the file is unchanged
    path.write_text(path.read_text() + json.dumps({"text": "charlie delta " * 120}) + "\n")
    os.utime(path, ns=(1, 1))
    assert device_data(cfg, settings).num_train > first.num_train
