"""Selection hyperparameters are chosen on tuning users only, and the table reports the other users."""

import csv
import json

import pytest

from fedtune.config import ConfigError, config_from_dict
from fedtune.personalization.evaluate import UserResult
from fedtune.personalization.tuning import _best, at_threshold
from tests.unit.personalization.test_benchmark import _tiny_recipe_config, _write


def test_tuning_lists_must_be_reported_on_test_users():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"personalization": {"tune_finetune_lrs": [1e-3], "eval_users": "all"}})
    assert "personalization.eval_users" in str(err.value) and "set it to test" in str(err.value)
    with pytest.raises(ConfigError, match="tune_min_gain_zs"):
        config_from_dict({"personalization": {"tune_min_gain_zs": [-1.0], "eval_users": "test"}})
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
                   "--set", "personalization.tune_finetune_grids=[[1],[3]]",
                   "--set", "personalization.tune_min_gain_zs=[0,1000]"])
    (setting,) = report["settings"]
    assert setting["users_evaluated"] == ["writer-1", "writer-2"]  # the tuning user is not in the table
    tuning = json.loads((out / "dp-off" / "tuning.json").read_text())
    assert len(tuning["tried"]) == 4 and all(r["users"] == 1 for r in tuning["tried"])
    # a threshold no gain reaches keeps the tuning user on the global adapter: as good, no change
    assert all(r["at_least_as_good"] == 1.0 and r["median_change_vs_global"] == 0.0
               for r in tuning["tried"] if r["min_gain_z"] == 1000)
    safe = [r for r in tuning["tried"] if r["at_least_as_good"] >= 0.95]
    best = min(safe, key=lambda r: r["median_change_vs_global"])
    assert tuning["chosen"] == {k: best[k] for k in ("finetune_lr", "finetune_grid", "min_gain_z")}
    assert setting["tuning"]["chosen"] == tuning["chosen"]
    # the per-user evidence: the tuning user's global and personalized rows under each (lr, grid)
    with open(out / "dp-off" / "tuning_users.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["user"] for r in rows} == {"writer-0"} and len(rows) == 2 * 2
    assert {(r["finetune_grid"], r["method"]) for r in rows} == {(g, m) for g in ("1", "3")
                                                                   for m in ("global", "personalized")}
    assert all(r["gain_z"] for r in rows if r["method"] == "personalized")
    assert "tuning users (not in the table)" in (out / "benchmark.md").read_text()
    # the test users' selection ran with the chosen grid: their scores name only its step counts
    choices = [json.loads(p.read_text()) for p in (out / "dp-off" / "fedavg" / "state" / "selection").glob("*.json")]
    assert {c["user"] for c in choices} == {"writer-1", "writer-2"}
    steps = {int(k.split("@")[1]) for c in choices for k in c["scores"] if k.startswith("finetune@")}
    assert steps == set(tuning["chosen"]["finetune_grid"])


def _row(user, method, ppl, gain_z=None, steps=0):
    return UserResult(user, method, loss=0.0, perplexity=ppl, accuracy=0.5, tokens=100, train_steps=steps,
                      epsilon=3.0, choice="finetune@8" if method == "personalized" else "", gain_z=gain_z)


def test_a_threshold_turns_a_weak_gain_into_the_global_result_and_keeps_what_was_spent():
    rows = [_row("a", "global", 10.0), _row("a", "personalized", 11.0, gain_z=0.8, steps=8),
            _row("b", "global", 10.0), _row("b", "personalized", 9.0, gain_z=2.5, steps=8)]
    at1 = {(r.user, r.method): r for r in at_threshold(rows, 1.0)}
    assert at1["a", "personalized"].perplexity == 10.0 and at1["a", "personalized"].choice == "global"
    assert at1["a", "personalized"].train_steps == 8 and at1["a", "personalized"].gain_z == 0.8
    assert at1["b", "personalized"] == rows[3]  # a gain above the threshold is kept as it was
    assert at_threshold(rows, 0.0) == rows


def test_the_pick_is_the_best_median_among_thresholds_that_keep_users_at_least_as_good():
    rows = [{"min_gain_z": 0.0, "median_change_vs_global": -0.08, "at_least_as_good": 0.90},
            {"min_gain_z": 1.0, "median_change_vs_global": -0.05, "at_least_as_good": 0.96},
            {"min_gain_z": 2.0, "median_change_vs_global": -0.02, "at_least_as_good": 1.0}]
    assert _best(rows, thresholds=True)["min_gain_z"] == 1.0
    assert _best(rows, thresholds=False)["min_gain_z"] == 0.0  # without thresholds: the median alone
    unsafe = [dict(r, at_least_as_good=0.5 + r["min_gain_z"] / 10) for r in rows]
    assert _best(unsafe, thresholds=True)["min_gain_z"] == 2.0  # none safe: the safest


def test_among_equal_medians_the_pick_keeps_more_users_safe_then_takes_the_cautious_threshold():
    def row(z, share, better):
        return {"min_gain_z": z, "median_change_vs_global": -0.07, "at_least_as_good": share,
                "better_than_global": better}

    tied = [row(0.0, 0.96, 0.83), row(0.5, 0.96, 0.83), row(1.0, 0.96, 0.83), row(2.0, 0.96, 0.62)]
    assert _best(tied, thresholds=True)["min_gain_z"] == 1.0  # 0-1 indistinguishable; 2 loses better users
    safer = [row(0.5, 0.96, 0.79), row(1.0, 1.0, 0.71)]
    assert _best(safer, thresholds=True)["min_gain_z"] == 1.0  # more users at least as good wins the tie
    lower = [dict(row(0.0, 0.96, 0.83), median_change_vs_global=-0.08), row(1.0, 1.0, 0.83)]
    assert _best(lower, thresholds=True)["min_gain_z"] == 0.0  # a lower median still comes first
