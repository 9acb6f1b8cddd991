"""Upload compression on real Flower messages: bytes on the wire, and the server decodes before it averages."""

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedtune.adapters import get_adapter_state
from fedtune.config import dump_config
from fedtune.data import build_client_data, save_client_data
from fedtune.flower.client_app import build_client_app
from fedtune.flower.context import run_context
from fedtune.flower.records import arrays_to_tensors, payload_bytes, state_to_arrays
from fedtune.flower.strategy import AdapterFedAvg, RoundStats
from fedtune.models.tokenizer import ByteEncoder
from fedtune.workspace import RunDir
from tests.conftest import make_config


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 7
    yield


def _reply(tmp_path, upload, server_round=1):
    """The reply of device 0 to the same round-1 message, under ``federation.upload=upload``."""
    cfg = make_config(federation={"upload": upload})
    run = RunDir.create(tmp_path / upload)
    dump_config(cfg, run.config)
    save_client_data(build_client_data(cfg.data, ByteEncoder(), cfg.seed), run.data)
    run_config = {"config-path": str(run.config), "run-dir": str(run.root)}
    shapes = get_adapter_state(run_context(run_config).model()[0])  # (the cached model's current values vary)
    gen = torch.Generator().manual_seed(1)
    sent = {k: 0.05 * torch.randn(v.shape, generator=gen) for k, v in sorted(shapes.items())}
    content = RecordDict({"arrays": state_to_arrays(sent),
                          "config": ConfigRecord({"server-round": server_round, "local-steps": 2, "batch-size": 4,
                                                  "lr": 0.01})})
    msg = Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                  run_config=run_config)
    reply = build_client_app()(msg, ctx)
    assert not reply.has_error(), reply.error
    return sent, reply, run


def test_bytes_on_the_wire_per_scheme(tmp_path):
    sent, r32, _ = _reply(tmp_path, "fp32")
    _, r16, _ = _reply(tmp_path, "fp16")
    _, r8, run = _reply(tmp_path, "int8")
    b32, b16, b8 = (payload_bytes(r.content["arrays"]) for r in (r32, r16, r8))
    tensor_bytes = sum(v.numel() * 4 for v in sent.values())
    assert b32 - b16 == tensor_bytes // 2  # fp16: exactly half of every tensor's bytes (same .npy headers)
    assert b32 / b8 >= 3.5, (b32, b8)  # int8 + one fp32 scale per 256 values + two headers
    assert set(arrays_to_tensors(r8.content["arrays"])) == {"delta.int8", "delta.scale"}
    assert list((run.root / "state" / "residuals").glob("*.safetensors"))  # error feedback stays on the device


def test_server_decodes_an_int8_reply_before_it_aggregates(tmp_path):
    sent, r32, _ = _reply(tmp_path, "fp32")
    _, r8, _ = _reply(tmp_path, "int8")
    strategy = AdapterFedAvg(reference=sent, clients_per_round=1, min_clients=1, seed=0)
    strategy.current = sent  # what configure_train keeps: the adapter this round's devices were sent
    exact = strategy._validated(r32, RoundStats()).state
    decoded = strategy._validated(r8, RoundStats()).state
    assert decoded.keys() == sent.keys()
    for k in sent:  # the same training (same seed), up to int8 rounding of the delta
        step = (exact[k] - sent[k]).abs().max() / 127
        assert (decoded[k] - exact[k]).abs().max() <= step + 1e-6
    arrays, _ = strategy.aggregate_train(1, [r8])  # the pipeline averages the decoded fp32 adapter
    assert strategy.stats[1].upload_bytes == payload_bytes(r8.content["arrays"])  # counted as sent: int8
    out = arrays_to_tensors(arrays)
    assert out.keys() == sent.keys() and all(out[k].dtype == torch.float32 for k in out)
    for k in sent:  # one reply: the average is that reply's decoded adapter
        torch.testing.assert_close(out[k], decoded[k])


def test_an_int8_reply_without_a_sent_adapter_is_rejected_not_crashed(tmp_path):
    sent, r8, _ = _reply(tmp_path, "int8")
    strategy = AdapterFedAvg(reference=sent, clients_per_round=1, min_clients=1, seed=0)
    stats = RoundStats()
    assert strategy._validated(r8, stats) is None and stats.rejected["malformed"] == 1
