"""Secure aggregation through the Flower apps: the real ServerApp (strategy, SecAggGrid) and the real ClientApp
(``query.secagg`` / ``train.secagg``) exchange Flower messages through a grid that runs each node in this
process with its own persistent Context, as a SuperNode does. The server side never holds one device's
update: it receives masked vectors, the strategy tensor-free replies and the unmasked sum, and that sum
gives plain FedAvg within the quantization error, with dropouts below the threshold and not above it."""

import json

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto

from fedtune.config import config_from_dict, dump_config
from fedtune.data import build_client_data, save_client_data
from fedtune.federation.aggregate import Pipeline
from fedtune.flower.client_app import build_client_app
from fedtune.flower.server_app import run_server
from fedtune.models.cache import clear_cache
from fedtune.models.tokenizer import ByteEncoder
from fedtune.privacy.secagg import SecAggClient
from fedtune.workspace import RunDir
from tests.unit.federation.test_secure_round import SMOKE

USERS = 5


class InProcessGrid:
    """A Flower Grid in one process: node i is the ClientApp with its own Context (kept across messages, as a
    SuperNode keeps it); ``drop(message)`` -> True: that node does not answer that message (it vanished);
    "error": it answers with an error."""

    def __init__(self, run_config: dict, drop=lambda m: False):
        self.app, self.drop, self.replies = build_client_app(), drop, []
        self.contexts = {node: Context(run_id=1, node_id=node, state=RecordDict(), run_config=run_config,
                                       node_config={"partition-id": node - 1, "num-partitions": USERS})
                         for node in range(1, USERS + 1)}

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            if (fate := self.drop(m)) == "error":  # the device fails: Flower answers with an error
                out.append(_wire(Message(Error(0, "device failed"), reply_to=_wire(m))))
                continue
            if fate:
                continue
            m = _wire(m)  # the device gets its own copy (server and devices share this process's model cache)
            try:
                reply = _wire(self.app(m, self.contexts[m.metadata.dst_node_id]))
            except Exception as exc:  # as a SuperNode does: the error goes back as the reply
                reply = Message(Error(0, repr(exc)), reply_to=m)
            self.replies.append(reply)
            out.append(reply)
        return out


def _wire(m: Message) -> Message:
    """The message as it arrives on the other side: serialized and parsed (no shared buffers)."""
    return message_from_proto(message_to_proto(m))


def _run(tmp_path, name, secure=None, drop=lambda m: False, **privacy):
    raw = json.loads(json.dumps(SMOKE))
    raw["data"]["synthetic_users"] = raw["federation"]["clients_per_round"] = USERS
    raw["privacy"].update(privacy)
    if secure is not None:
        raw["privacy"]["secure_aggregation"] = dict(secure, enabled=True)
    cfg = config_from_dict(raw)
    clear_cache()  # every run starts from the seeded adapter, as a fresh SuperLink / SuperNode process does
    run = RunDir.create(tmp_path / name)
    dump_config(cfg, run.config)
    save_client_data(build_client_data(cfg.data, ByteEncoder(), cfg.seed), run.data)
    run_config = {"config-path": str(run.config), "run-dir": str(run.root)}
    grid = InProcessGrid(run_config, drop)
    run_server(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    last = json.loads((run.root / "metrics.jsonl").read_text().splitlines()[-1])
    return last, _adapter(run.root, 1), grid


def _adapter(root, r):
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(root / "adapters" / f"round-{r}" / "adapter_model.safetensors")).items()}


def _close(a, b, tol):
    return max((a[k] - b[k]).abs().max().item() for k in a) <= tol


TOL = 2 * USERS / (2 ** 15 - 1)  # the weighted mean's rounding at 16 bits (range 1), with margin


def _kind(m: Message) -> str:
    return m.metadata.message_type + ":" + str(m.content["secagg"]["type"] if "secagg" in m.content else "")


@pytest.fixture
def spies(monkeypatch):
    seen = {"pipeline": [], "payloads": [], "masked": []}
    original, masked_input = Pipeline.aggregate_secure, SecAggClient.masked_input

    def spy_pipeline(self, current, replies, cohort, r):
        seen["pipeline"].append(([dict(x.state) for x in replies], cohort))
        return original(self, current, replies, cohort, r)

    def spy_device(self, update, sealed, rng=None):  # on the device: what it masks, and what it sends
        out = masked_input(self, update, sealed, rng)
        seen["payloads"].append(np.asarray(update).copy())
        seen["masked"].append(out.vector.copy())
        return out

    monkeypatch.setattr(Pipeline, "aggregate_secure", spy_pipeline)
    monkeypatch.setattr(SecAggClient, "masked_input", spy_device)
    return seen


def test_the_server_gets_masked_vectors_and_the_sum_only_and_it_is_fedavg(tmp_path, spies, monkeypatch):
    plain_last, plain, _ = _run(tmp_path, "plain")
    monkeypatch.setattr(Pipeline, "aggregate", lambda *a: pytest.fail("plain aggregation ran under secure "
                                                                        "aggregation"))
    last, state, grid = _run(tmp_path, "secure", secure={})
    (states, cohort), = spies["pipeline"]  # the strategy's pipeline: tensor-free replies and the sum
    assert all(s == {} for s in states) and len(states) == USERS and cohort.survivors == USERS
    # every message the ServerApp received: keys, ciphertexts, masked ring vectors, shares; no adapter tensor
    arrays = [(k, a) for r in grid.replies for k, rec in r.content.array_records.items() for a in rec.values()]
    assert [k for k, _ in arrays] == ["secagg-masked"] * USERS
    received = [a.numpy() for _, a in arrays]
    assert sorted(map(bytes, received)) == sorted(map(bytes, spies["masked"]))
    for vector in received:  # uniform in the 32-bit ring, not any device's 16-bit levels (nor its float update)
        levels = vector.view(np.int32).astype(np.int64)
        assert (np.abs(levels) > 2 ** 15).mean() > 0.9
        assert all(not np.allclose(levels / ((2 ** 15 - 1) / 1.0), p, atol=1e-3) for p in spies["payloads"])
    # a curious server rebuilds every survivor's self-mask seed from the unmask replies it received and strips
    # it from that survivor's masked vector: the pairwise masks still hide the update
    from fedtune.flower.secagg_records import from_record
    from fedtune.privacy.secagg import crypto, shamir

    masked = {int(r.content["secagg"]["cid"]): r.content["secagg-masked"]["y"].numpy() for r in grid.replies
              if _kind(r) == "train.secagg:masked"}
    unmask = [from_record(r.content) for r in grid.replies if _kind(r) == "query.secagg:unmask-reply"]
    for cid, vector in masked.items():
        shares = [shamir.Share.from_bytes(u.seed_shares[cid]) for u in unmask if cid in u.seed_shares]
        seed = shamir.combine(shares, len(shares))
        stripped = (vector - crypto.prg(seed, len(vector), vector.dtype)).view(np.int32).astype(np.int64)
        assert (np.abs(stripped) > 2 ** 15).mean() > 0.9
    assert {_kind(r) for r in grid.replies} == {"query.secagg:advert", "query.secagg:shares",
                                                "train.secagg:masked", "query.secagg:unmask-reply"}
    assert last["aggregation"] == "secure_aggregation+fedavg" and last["secure_aggregation"] is True
    assert last["secagg_survivors"] == USERS and last["clients_succeeded"] == USERS
    assert last["engine"] == "flower" and plain_last["aggregation"] == "fedavg"
    assert _close(state, plain, TOL) and not _close(state, _adapter(tmp_path / "secure", 0), 1e-3)


def _unmask_request(m):
    return _kind(m) == "query.secagg:unmask-request"


@pytest.mark.parametrize("secure_drop, plain_drop, summed", [
    # node 2 sends its masked input, then never answers the unmask request: its update is in the sum
    pytest.param(lambda m: m.metadata.dst_node_id == 2 and _unmask_request(m), lambda m: False, USERS,
                 id="after-masked-input"),
    # node 4 never trains (shared keys, then vanished): its pairwise masks are removed, its update is not summed
    pytest.param(lambda m: m.metadata.dst_node_id == 4 and m.metadata.message_type == "train.secagg",
                 lambda m: m.metadata.dst_node_id == 4, USERS - 1, id="before-masked-input"),
    # node 3 fails while training: the strategy counts a failure, the others are summed
    pytest.param(lambda m: "error" if m.metadata.dst_node_id == 3 and m.metadata.message_type == "train.secagg"
                 else False, lambda m: m.metadata.dst_node_id == 3, USERS - 1, id="fails-training"),
])
def test_a_dropout_below_the_threshold_still_gives_the_right_sum(tmp_path, spies, secure_drop, plain_drop, summed,
                                                                 request):
    _, plain, _ = _run(tmp_path, "plain", drop=plain_drop)
    last, state, _ = _run(tmp_path, "secure", secure={}, drop=secure_drop)
    assert last["secagg_aborted"] is False, last.get("secagg_reason")
    assert last["secagg_survivors"] == summed == last["clients_succeeded"]
    assert last["clients_failed"] == (1 if request.node.callspec.id == "fails-training" else 0)
    assert _close(state, plain, TOL)  # FedAvg over exactly the devices whose masked input was summed


def test_too_many_vanishing_before_unmasking_aborts_the_round_with_its_reason(tmp_path, spies):
    last, state, _ = _run(tmp_path, "abort", secure={},
                          drop=lambda m: m.metadata.dst_node_id > 2 and _unmask_request(m))
    assert last["round_skipped"] and last["secagg_aborted"] is True
    assert "fewer than the threshold" in last["secagg_reason"]
    assert _close(state, _adapter(tmp_path / "abort", 0), 0.0)  # nothing moved; no partial sum revealed


def test_an_aborted_round_under_user_level_dp_is_still_noised_and_charged(tmp_path, spies):
    last, state, _ = _run(tmp_path, "abort-dp", secure={}, user_level={"enabled": True, "noise_multiplier": 1.0},
                          drop=lambda m: m.metadata.dst_node_id > 1 and _unmask_request(m))
    (_, cohort), = spies["pipeline"]
    assert cohort.aborted and last["secagg_aborted"] is True
    assert last["aggregation"] == "secure_aggregation+user_level_dp" and last["user_epsilon"] > 0
    assert not _close(state, _adapter(tmp_path / "abort-dp", 0), 1e-6)  # the noise moved it: the round counted
