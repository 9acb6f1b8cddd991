"""Secure aggregation in the round: the server-side pipeline holds only the unmasked sum (never one
device's update), that sum gives plain FedAvg / DP-FedAvg with the same noise within the quantization
error, dropouts below the threshold are survived and above it the round aborts and is recorded."""

import json

import pytest
import torch

from fedtune.config import config_from_dict
from fedtune.federation.aggregate import FedAvgRule, Pipeline, Reply, UserLevelDP
from fedtune.federation.secure_round import SecureAggregation, metadata_only
from fedtune.federation.seeds import Seeds
from fedtune.privacy.secagg.server import SecAggServer

SHAPES = {"a.lora_A": (2, 6), "a.lora_B": (6, 2)}


def _replies(n, seed=0, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    current = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    replies = [Reply(i, {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in current.items()},
                     float(3 + 2 * i), 1.0) for i in range(n)]
    return current, replies


def _secure(dropout=0.0, clip_norm=None, bits=16, max_examples=20.0):
    cfg = config_from_dict({"privacy": {"secure_aggregation": {"enabled": True, "bits": bits,
                                                               "simulated_dropout": dropout}}})
    return SecureAggregation(cfg.privacy.secure_aggregation, clip_norm, max_examples, Seeds.simulated(0))


def _close(a, b, tol):
    return max((a[k] - b[k]).abs().max().item() for k in a) <= tol


def test_secure_fedavg_equals_plain_fedavg_within_the_quantization_error():
    current, replies = _replies(6)
    plain = Pipeline(FedAvgRule()).aggregate(current, replies, 1).state
    secure = _secure()
    cohort = secure.run(current, replies, 1)
    out = Pipeline(FedAvgRule()).aggregate_secure(current, metadata_only(replies), cohort, 1)
    # each of 6 devices rounds by at most R/L per value, the weights sum to >= 33/20
    tol = 6 * 1.0 / (2 ** 15 - 1) / (33 / 20) * 2
    assert _close(out.state, plain, tol) and not _close(out.state, current, 1e-3)
    assert [m.name for m in out.applied] == ["secure_aggregation", "fedavg"]
    assert out.applied[0].report["survivors"] == 6 and out.applied[0].report["uplink_bytes"] > 0


def test_the_pipeline_refuses_replies_that_still_hold_an_update():
    current, replies = _replies(3)
    cohort = _secure().run(current, replies, 1)
    with pytest.raises(ValueError, match="individual update"):
        Pipeline(FedAvgRule()).aggregate_secure(current, replies, cohort, 1)


def _dp_pipeline(population=10):
    from fedtune.privacy.dp_fedavg import DPFedAvg, plan_user_level

    cfg = config_from_dict({"privacy": {"user_level": {"enabled": True, "clip_norm": 0.2,
                                                       "noise_multiplier": 0.5}}}).privacy.user_level
    plan = plan_user_level(cfg, population, 5, 3)
    return Pipeline(FedAvgRule(), user_dp=UserLevelDP(DPFedAvg(cfg, plan, population, Seeds.simulated(0))))


def test_secure_dp_fedavg_equals_dp_fedavg_with_the_same_noise():
    current, replies = _replies(5, scale=0.2)
    plain = _dp_pipeline().aggregate(current, replies, 2)
    pipe = _dp_pipeline()
    cohort = _secure(clip_norm=0.2).run(current, replies, 2)
    out = pipe.aggregate_secure(current, metadata_only(replies), cohort, 2)
    assert _close(out.state, plain.state, 5 * 0.2 / (2 ** 15 - 1) / 5)  # rounding of 5 devices / qN = 5
    assert not _close(out.state, current, 1e-3)
    assert [m.name for m in out.applied] == ["secure_aggregation", "user_level_dp"]
    assert pipe.user_dp.dp.ledger.history  # charged


def test_dropouts_below_the_threshold_are_survived_and_only_survivors_count():
    current, replies = _replies(10)
    secure = _secure(dropout=0.3)
    drop = Seeds.simulated(0).rng("secagg_dropout", 1)
    gone = {i for i in range(10) if drop.random() < 0.3}  # the same draws, device i has protocol id i + 1
    assert 0 < len(gone) <= 4, "the seed must drop some devices, leaving t + 1 = 6 of 10 (t = 5 shares from others)"
    cohort = secure.run(current, replies, 1)
    alive = [r for i, r in enumerate(replies) if i not in gone]
    plain = Pipeline(FedAvgRule()).aggregate(current, alive, 1).state
    out = Pipeline(FedAvgRule()).aggregate_secure(current, metadata_only(replies), cohort, 1)
    assert cohort.survivors == len(alive) and _close(out.state, plain, 1e-3)


def test_dropouts_past_the_threshold_abort_the_round_and_reveal_nothing():
    current, replies = _replies(6)
    cohort = _secure(dropout=0.9).run(current, replies, 1)
    assert cohort.aborted and cohort.report["aborted"] and "threshold" in cohort.report["reason"]
    out = Pipeline(FedAvgRule()).aggregate_secure(current, metadata_only(replies), cohort, 1)
    assert out.skipped and out.state is None and out.applied[0].report["aborted"]
    pipe = _dp_pipeline()  # under user-level DP the round is still noised and charged (zero sum)
    out = pipe.aggregate_secure(current, metadata_only(replies), cohort, 1)
    assert not out.skipped and len(pipe.user_dp.dp.ledger.history) == 1 and not _close(out.state, current, 1e-6)


# ---- a simulation through the in-process backend (tiny model) ----

SMOKE = {"data": {"source": "synthetic", "synthetic_users": 4, "synthetic_docs_per_user": 3, "seq_len": 16},
         "train": {"local_steps": 1, "batch_size": 2, "eval_max_chunks": 2, "lr": 0.05},
         "federation": {"rounds": 1, "clients_per_round": 4, "min_clients": 2, "upload": "fp32"},
         "model": {"source": "tiny", "quantization": "none",
                   "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                            "num_attention_heads": 2, "num_key_value_heads": 2}},
         "adapter": {"rank": 2, "alpha": 4}, "privacy": {"enabled": False}}


def _simulate(tmp_path, name, secure=None, **privacy):
    from fedtune.adapters import create_adapter, get_adapter_state
    from fedtune.data import build_client_data
    from fedtune.federation.inprocess import run_inprocess
    from fedtune.models import load_base_model
    from fedtune.models.tokenizer import ByteEncoder
    from fedtune.workspace import RunDir

    raw = json.loads(json.dumps(SMOKE))
    raw["privacy"].update(privacy)
    if secure is not None:
        raw["privacy"]["secure_aggregation"] = dict(secure, enabled=True)
    cfg = config_from_dict(raw)
    model = create_adapter(load_base_model(cfg.model)[0], cfg.adapter, cfg.seed)
    records = run_inprocess(cfg, model, build_client_data(cfg.data, ByteEncoder(), cfg.seed),
                            RunDir.create(tmp_path / name))
    return records, get_adapter_state(model), tmp_path / name


def test_a_simulation_hands_the_server_only_masked_vectors_and_the_sum(tmp_path, monkeypatch):
    seen = {"pipeline": [], "masked": []}
    original_secure, original_plain = Pipeline.aggregate_secure, Pipeline.aggregate
    collect = SecAggServer.collect_masked

    def spy_secure(self, current, replies, cohort, r):
        seen["pipeline"].append(([dict(x.state) for x in replies], cohort))
        return original_secure(self, current, replies, cohort, r)

    def spy_masked(self, inputs):
        seen["masked"] += [m.vector.copy() for m in inputs]
        return collect(self, inputs)

    monkeypatch.setattr(Pipeline, "aggregate_secure", spy_secure)
    monkeypatch.setattr(Pipeline, "aggregate", lambda *a: pytest.fail("plain aggregation ran under secure "
                                                                        "aggregation"))
    monkeypatch.setattr(SecAggServer, "collect_masked", spy_masked)
    records, state, run = _simulate(tmp_path, "secure", secure={})
    (states, cohort), = seen["pipeline"]
    assert all(s == {} for s in states) and cohort.survivors == 4  # tensors: only the sum
    assert len(seen["masked"]) == 4 and all(v.dtype.itemsize == 4 for v in seen["masked"])  # 16-bit levels, 32-bit ring
    levels = [v.view("int32") for v in seen["masked"]]  # a masked vector is uniform in the ring, not small levels
    assert all((abs(v.astype("int64")) > 2 ** 15).mean() > 0.9 for v in levels)
    last = records[-1]
    assert last["aggregation"] == "secure_aggregation+fedavg" and last["secure_aggregation"] is True
    assert last["secagg_survivors"] == 4 and last["secagg_uplink_bytes"] > 0
    meta = json.loads((run / "adapters" / "round-1" / "fedtune.json").read_text())["privacy"]
    assert meta["secure_aggregation"]["rounds"] == 1 and meta["secure_aggregation"]["bits"] == 16

    monkeypatch.setattr(Pipeline, "aggregate", original_plain)
    _, plain, _ = _simulate(tmp_path, "plain")  # the same devices, the same training: plain FedAvg
    assert _close(state, plain, 4 * 1.0 / (2 ** 15 - 1))
    from safetensors.torch import load_file

    initial = load_file(str(run / "adapters" / "round-0" / "adapter_model.safetensors"))
    assert not _close({k: state[k] for k in initial}, {k: v.float() for k, v in initial.items()}, 1e-3)  # it moved


def test_a_simulated_round_past_the_threshold_is_skipped_and_recorded(tmp_path):
    records, _, run = _simulate(tmp_path, "abort", secure={"simulated_dropout": 0.95})
    last = records[-1]
    assert last["round_skipped"] and last["secagg_aborted"] is True and last["aggregation"] == "secure_aggregation"
    assert last["secure_aggregation"] is False  # nothing trained through it: no claim on the adapter


def test_an_odd_neighbour_count_is_refused_naming_the_field():
    from fedtune.config import ConfigError

    with pytest.raises(ConfigError, match="privacy.secure_aggregation.num_neighbours: must be even"):
        config_from_dict({"privacy": {"secure_aggregation": {"enabled": True, "num_neighbours": 3}}})


def test_secagg_plus_neighbours_give_the_same_sum():
    current, replies = _replies(9)
    cfg = config_from_dict({"privacy": {"secure_aggregation": {"enabled": True, "num_neighbours": 4}}})
    secure = SecureAggregation(cfg.privacy.secure_aggregation, None, 20.0, Seeds.simulated(0))
    cohort = secure.run(current, replies, 1)
    assert cohort.report["protocol"] == "SecAgg+" and cohort.report["neighbours"] == 4
    out = Pipeline(FedAvgRule()).aggregate_secure(current, metadata_only(replies), cohort, 1)
    assert _close(out.state, Pipeline(FedAvgRule()).aggregate(current, replies, 1).state, 1e-3)
