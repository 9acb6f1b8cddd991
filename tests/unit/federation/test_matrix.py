"""Every allowed pair of features trains one round through the in-process backend, and the label on
metrics.jsonl and fedtune.json is the mechanism that ran (never the config's plan).

Deployment pairs need real devices (tests/integration/test_deployment.py); their refusals are tested in
test_capabilities.py."""

import json

import pytest

from fedtune.adapters import create_adapter
from fedtune.config import config_from_dict
from fedtune.data import build_client_data
from fedtune.federation import capabilities as cap
from fedtune.federation.inprocess import run_inprocess
from fedtune.models import load_base_model
from fedtune.models.tokenizer import ByteEncoder
from fedtune.workspace import RunDir
from tests.unit.federation.test_capabilities import config_with

SMOKE = {"data": {"source": "synthetic", "synthetic_users": 2, "synthetic_docs_per_user": 3, "seq_len": 16},
         "train": {"local_steps": 1, "batch_size": 2, "eval_max_chunks": 2, "lr": 0.01},
         "federation": {"rounds": 1, "clients_per_round": 2, "min_clients": 1},
         "model": {"source": "tiny", "quantization": "none",
                   "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                            "num_attention_heads": 2, "num_key_value_heads": 2}},
         "adapter": {"rank": 2, "alpha": 4, "num_virtual_tokens": 2}}

IN_PROCESS = [p for p in cap.allowed_pairs() if "deployment" not in p]
# two tiers of different LoRA ranks (phone-low 4, laptop-8gb 8), a population larger than the data, daytime
FLEET = {"mixture": {"phone-low": 0.5, "laptop-8gb": 0.5}, "start_hour": 10.0, "simulated_params": 135_000_000,
         "population": 40, "over_selection": 1.0}


def _config(pair):
    raw = config_with(*pair)
    for section, values in SMOKE.items():
        raw[section] = {**values, **raw.get(section, {})} if section != "model" else dict(values)
    if "robust" in pair:
        raw["federation"]["aggregation"] = "median"
    if "fleet" in raw:
        raw["fleet"].update(FLEET)
        # robust rules need same-rank tiers (min(lora_rank, adapter.rank) = 4 on both); else ranks 4 and 8
        raw["adapter"]["rank"], raw["adapter"]["alpha"] = (4, 8) if "robust" in pair else (8, 16)
    return config_from_dict(raw)


@pytest.mark.parametrize("pair", IN_PROCESS, ids="×".join)
def test_allowed_pair_trains_and_is_labelled_by_what_ran(pair, tmp_path):
    cfg = _config(pair)
    base, _ = load_base_model(cfg.model)
    model = create_adapter(base, cfg.adapter, cfg.seed)
    clients = build_client_data(cfg.data, ByteEncoder(), cfg.seed)
    records = run_inprocess(cfg, model, clients, RunDir.create(tmp_path / "run"))
    meta = json.loads((tmp_path / "run" / "adapters" / "round-1" / "fedtune.json").read_text())
    assert_labelled_by_what_ran(records[-1], meta, pair, cfg)
    assert records[-1]["engine"] == "in-process"


def assert_labelled_by_what_ran(last: dict, meta: dict, features, cfg) -> None:
    """Round 1 trained, and its record and fedtune.json carry the label of the mechanisms that ran."""
    if cfg.fleet.enabled:  # some sampled devices may drop out; the ranks of those that count differ
        assert last["round"] == 1 and last["clients_succeeded"] >= 1 and last["clients_sampled"] >= 2
    else:
        assert last["round"] == 1 and last["clients_succeeded"] == last["clients_sampled"] == 2
    assert not last["round_skipped"]
    expected = "user" if "user-dp" in features else "sample" if "sample-dp" in features else "none"
    ran = last["aggregation"]
    if "secure-agg" in features:  # the pipeline got the masked sum, and the label says so
        assert ran.startswith("secure_aggregation+") and last["secure_aggregation"] is True
        assert meta["privacy"]["secure_aggregation"]["rounds"] == 1 and last["secagg_survivors"] == 2
        ran = ran.removeprefix("secure_aggregation+")
    assert (ran == "user_level_dp") == ("user-dp" in features)
    fleet = next((p.split("-")[1] for p in features if p.startswith("fleet-")), None)
    assert ran == ("user_level_dp" if "user-dp" in features else
                   "median" if "robust" in features else fleet or "fedavg")
    if fleet:
        assert last["sim_round_seconds"] > 0 and "tiers" in last
    assert last["privacy_level"] == expected
    assert meta["privacy"]["level"] == expected and meta["privacy"]["randomness"] == "simulated"
    if expected == "sample":
        assert meta["privacy"]["epsilon"] == last["epsilon"] > 0
    if expected == "user":
        assert last["user_epsilon"] == last["epsilon"] > 0
