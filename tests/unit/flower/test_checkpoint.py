"""The per-round checkpoint: atomic, complete, verified on resume; records past it are dropped."""

import json

import pytest
import torch
from safetensors.torch import save_file

from fedtune.flower.server_app import (
    load_checkpoint_adapter, read_checkpoint, strategy_state, truncate_metrics, write_checkpoint,
)
from fedtune.flower.strategy import AdapterFedAvg, RoundStats
from fedtune.workspace import RunDir

REF = {"l.lora_A.weight": torch.ones(2, 3)}


@pytest.fixture
def run(tmp_path):
    run = RunDir.create(tmp_path / "run")
    run.adapter(1).mkdir(parents=True)
    save_file(REF, str(run.adapter(1) / "adapter_model.safetensors"))
    return run


def test_checkpoint_holds_adapter_strategy_ledger_and_registry(run):
    s = AdapterFedAvg(reference=REF, clients_per_round=3, min_clients=2, seed=5)
    s.stats[1] = RoundStats(failed=1)
    s.stats[1].rejected["norm_bound"] += 2
    s.stats[1].declined["not_charging"] += 1
    s.prior_totals = {"failed": 1, "rejected": {"norm_bound": 1}, "declined": {}}  # from before a restart
    write_checkpoint(run, 1, s, {"registry": "/r", "version": 3, "round": 1})
    ck = read_checkpoint(run)
    assert ck["round"] == 1 and ck["adapter"] == "adapters/round-1" and len(ck["adapter_sha256"]) == 64
    assert ck["strategy"]["seed"] == 5 and ck["strategy"]["aggregator"] == "fedavg"
    assert ck["strategy"]["totals"] == {"failed": 2, "rejected": {"norm_bound": 3}, "declined": {"not_charging": 1}}
    assert ck["registry"]["version"] == 3 and ck["user_ledger"] is None
    assert not (run.root / "checkpoint.json.tmp").exists()
    assert torch.equal(load_checkpoint_adapter(run, 1, ck["adapter_sha256"])["l.lora_A.weight"], REF["l.lora_A.weight"])


def test_a_changed_adapter_is_refused_on_resume(run):
    s = AdapterFedAvg(reference=REF, clients_per_round=3, min_clients=2, seed=0)
    write_checkpoint(run, 1, s)
    save_file({"l.lora_A.weight": torch.zeros(2, 3)}, str(run.adapter(1) / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="does not match the checkpoint"):
        load_checkpoint_adapter(run, 1, read_checkpoint(run)["adapter_sha256"])


def test_records_past_the_checkpoint_are_dropped(run):
    for r in (0, 1, 2):  # round 2's record was written, then the server died before its checkpoint
        run.append_metrics({"round": r})
    assert truncate_metrics(run, 1) == 1
    assert [r["round"] for r in run.read_metrics()] == [0, 1]
    assert truncate_metrics(run, 1) == 0


def test_strategy_state_of_a_robust_strategy():
    from fedtune.aggregation import create_aggregator

    s = AdapterFedAvg(reference=REF, clients_per_round=3, min_clients=2, seed=0,
                      aggregator=create_aggregator("median"))
    assert strategy_state(s)["aggregator"] == "median"
    assert json.dumps(strategy_state(s))
