"""Split adapters on real Flower messages: the private part never leaves the device, and it persists."""

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.serde import message_to_proto

from fedtune.adapters import get_adapter_state
from fedtune.adapters.split import private_part, shared_part
from fedtune.config import dump_config
from fedtune.data import build_client_data, load_client_data, save_client_data
from fedtune.flower.client_app import build_client_app
from fedtune.flower.context import run_context
from fedtune.flower.records import arrays_to_tensors, state_to_arrays
from fedtune.models.tokenizer import ByteEncoder
from fedtune.personalization import PrivateStateStore
from fedtune.workspace import RunDir
from tests.conftest import make_config


@pytest.fixture
def split_run(tmp_path):
    cfg = make_config(privacy={"enabled": True, "noise_multiplier": 0.8}, personalization={"split": "fedsa"})
    run = RunDir.create(tmp_path / "run")
    dump_config(cfg, run.config)
    save_client_data(build_client_data(cfg.data, ByteEncoder(), cfg.seed), run.data)
    run_config = {"config-path": str(run.config), "run-dir": str(run.root)}
    shared = shared_part(get_adapter_state(run_context(run_config).model()[0]), "fedsa")
    return run, run_config, shared


def _message(shared, server_round, kind=MessageType.TRAIN):
    cfg = ConfigRecord({"server-round": server_round, "local-steps": 3, "batch-size": 4, "lr": 0.05})
    return Message(content=RecordDict({"arrays": state_to_arrays(shared), "config": cfg}), dst_node_id=7,
                   message_type=kind)


def _context(run_config, partition=0):
    return Context(run_id=1, node_id=7, node_config={"partition-id": partition, "num-partitions": 3},
                   state=RecordDict(), run_config=run_config)


def test_private_part_never_crosses_the_wire(split_run):
    run, run_config, shared = split_run
    down = _message(shared, 1)
    assert not any(".lora_B." in k for k in arrays_to_tensors(down.content["arrays"]))  # the server never has B
    reply = build_client_app()(down, _context(run_config))
    assert not reply.has_error(), reply.error
    assert set(arrays_to_tensors(reply.content["arrays"])) == set(shared)
    user = load_client_data(run.data, 0).user_id
    private = PrivateStateStore(run.private).load(user)
    assert private and all(".lora_B." in k for k in private) and all(v.abs().sum() > 0 for v in private.values())
    # not the keys alone: the trained B's bytes appear nowhere in the serialized reply
    wire = message_to_proto(reply).SerializeToString()
    for name, t in private.items():  # in any precision the upload may use
        for dtype in (torch.float32, torch.float16):
            needle = t.to(dtype).numpy().tobytes()[:64]
            assert needle not in wire, f"{name} ({dtype}) leaked into the reply"
    # the shared part is all there (fp16 uploads by default)
    assert len(wire) > sum(t.numel() * 2 for t in shared.values())


def test_private_state_survives_between_rounds(split_run, tmp_path):
    run, run_config, shared = split_run
    store = PrivateStateStore(run.private)
    user = load_client_data(run.data, 0).user_id
    build_client_app()(_message(shared, 1), _context(run_config))
    b1 = store.load(user)
    reply2 = build_client_app()(_message(shared, 2), _context(run_config))  # a fresh app, as a recycled worker
    b2 = store.load(user)
    assert any(not torch.equal(b1[k], b2[k]) for k in b1)
    # the same round-2 message on a device that lost its private state trains from B=0: a different result
    store.path(user).unlink()
    reply2_fresh = build_client_app()(_message(shared, 2), _context(run_config))
    b2_fresh = store.load(user)
    assert any(not torch.allclose(b2[k], b2_fresh[k]) for k in b2)
    a2, a2_fresh = arrays_to_tensors(reply2.content["arrays"]), arrays_to_tensors(reply2_fresh.content["arrays"])
    assert any(not torch.allclose(a2[k], a2_fresh[k]) for k in a2)


def test_evaluate_uses_the_devices_private_part(split_run):
    run, run_config, shared = split_run
    app = build_client_app()
    before = app(_message(shared, 1, MessageType.EVALUATE), _context(run_config)).content["metrics"]["eval-loss"]
    app(_message(shared, 1), _context(run_config))  # trains B on the device
    after = app(_message(shared, 1, MessageType.EVALUATE), _context(run_config)).content["metrics"]["eval-loss"]
    assert after < before
