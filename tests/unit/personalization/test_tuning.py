"""Selection hyperparameters are chosen on tuning users only, and the table reports the other users."""

import json

import pytest

from fedtune.config import ConfigError, config_from_dict
from tests.unit.personalization.test_benchmark import _tiny_recipe_config, _write


def test_tuning_lists_must_be_reported_on_test_users():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"personalization": {"tune_finetune_lrs": [1e-3], "eval_users": "all"}})
    assert "personalization.eval_users" in str(err.value) and "set it to test" in str(err.value)
    with pytest.raises(ConfigError, match="tune_finetune_grids"):
        config_from_dict({"personalization": {"tune_finetune_grids": [[]], "eval_users": "test"}})


def test_the_recipe_tunes_on_tuning_users_and_reports_test_users(tmp_path):
    from simulations.sotu_personalization import main

    out = tmp_path / "out"
    # 3 users split by id hash at 0.3: writer-0 tunes, writer-1 and writer-2 are tested
    report = main(["--config", str(_tiny_recipe_config(tmp_path)), "--data", str(_write(tmp_path, ".jsonl")),
                   "--user-column", "author", "--text-column", "body", "--out", str(out), "--dp", "off",
                   "--device", "cpu", "--set", "personalization.eval_users=test",
                   "--set", "personalization.tuning_fraction=0.3",
                   "--set", "personalization.methods=[global,personalized]",
                   "--set", "personalization.tune_finetune_lrs=[0.05]",
                   "--set", "personalization.tune_finetune_grids=[[1],[3]]"])
    (setting,) = report["settings"]
    assert setting["users_evaluated"] == ["writer-1", "writer-2"]  # the tuning user is not in the table
    tuning = json.loads((out / "dp-off" / "tuning.json").read_text())
    assert len(tuning["tried"]) == 2 and all(r["users"] == 1 for r in tuning["tried"])
    best = min(tuning["tried"], key=lambda r: r["median_change_vs_global"])
    assert tuning["chosen"] == {"finetune_lr": best["finetune_lr"], "finetune_grid": best["finetune_grid"]}
    assert setting["tuning"]["chosen"] == tuning["chosen"]
    assert "tuning users (not in the table)" in (out / "benchmark.md").read_text()
    # the test users' selection ran with the chosen grid: their scores name only its step counts
    choices = [json.loads(p.read_text()) for p in (out / "dp-off" / "fedavg" / "state" / "selection").glob("*.json")]
    assert {c["user"] for c in choices} == {"writer-1", "writer-2"}
    steps = {int(k.split("@")[1]) for c in choices for k in c["scores"] if k.startswith("finetune@")}
    assert steps == set(tuning["chosen"]["finetune_grid"])
