"""The benchmark recipe on users' own data: the documented JSONL/CSV/Parquet layout, unchanged."""

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))


def _tiny_recipe_config(tmp_path) -> Path:
    raw = yaml.safe_load((ROOT / "configs" / "personalization-sotu.yaml").read_text())
    raw["model"] = {"source": "tiny", "quantization": "none"}
    raw["adapter"].update(rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    raw["data"].update(seq_len=32, max_train_chunks=8, max_heldout_chunks=4)
    raw["train"].update(lr=0.02, eval_max_chunks=8)
    raw["federation"].update(rounds=2, clients_per_round=2, min_clients=1)
    raw["personalization"].update(finetune_steps=2, eval_max_chunks=4, finetune_grid=[2, 4], alpha_grid=[0.5],
                                  eval_users="all", validation_max_chunks=2, tune_finetune_lrs=[],
                                  tune_finetune_grids=[], tune_min_gain_zs=[])
    raw["privacy"].update(max_noise_to_batch=10.0)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _write(tmp_path, suffix) -> Path:
    rows = [{"author": f"writer-{u}", "body": f"writer {u} says " + " ".join([f"w{u}{j % 7}" for j in range(90)])}
            for u in range(3) for _ in range(4)]
    path = tmp_path / f"users{suffix}"
    df = pd.DataFrame(rows)
    {".jsonl": lambda: df.to_json(path, orient="records", lines=True), ".csv": lambda: df.to_csv(path, index=False),
     ".parquet": lambda: df.to_parquet(path)}[suffix]()
    return path


def test_csv_and_parquet_give_the_same_users_and_chunks_as_jsonl(tmp_path):
    from fedtune.data import load_client_data
    from simulations.sotu_personalization import main

    chunks = {}
    for suffix in (".jsonl", ".csv", ".parquet"):
        out = tmp_path / suffix[1:]
        main(["--config", str(_tiny_recipe_config(tmp_path)), "--data", str(_write(tmp_path, suffix)),
              "--user-column", "author", "--text-column", "body", "--prepare-only", str(out)])
        chunks[suffix] = [load_client_data(out, i) for i in range(3)]
    for suffix in (".csv", ".parquet"):
        for a, b in zip(chunks[".jsonl"], chunks[suffix]):
            assert a.user_id == b.user_id and torch.equal(a.train, b.train) and torch.equal(a.heldout, b.heldout)


def test_recipe_runs_the_table_on_own_data(tmp_path):
    from simulations.sotu_personalization import main

    path = _write(tmp_path, ".jsonl")
    out = tmp_path / "out"
    report = main(["--config", str(_tiny_recipe_config(tmp_path)), "--data", str(path), "--user-column", "author",
                   "--text-column", "body", "--out", str(out), "--dp", "on", "--device", "cpu"])
    assert report["users"] == 3
    (setting,) = report["settings"]
    assert setting["dp"] is True
    methods = {m["method"]: m for m in setting["methods"]}
    assert set(methods) == {"base", "global", "finetune", "personalized", "local_only"}
    assert all(m["users"] == 3 for m in methods.values())
    # every device's epsilon stays within its budget, so the report carries no warning
    assert 0 < methods["personalized"]["max_epsilon"] <= 8.0 and setting["epsilon_warnings"] == []
    assert setting["personalized_targets"]["better_than_global"] is not None
    saved = json.loads((out / "benchmark.json").read_text())
    assert saved["settings"][0]["best_personalized"] in ("personalized", "finetune")
    md = (out / "benchmark.md").read_text()
    assert "| local_only | 3 |" in md and "DP-SGD on" in md and "personalized vs targets" in md
    choices = list((out / "dp-on" / "fedavg" / "state" / "selection").glob("*.json"))
    assert len(choices) == 3  # each device's choice stays in its own state
    assert (out / "dp-on" / "eval" / "per_user.csv").is_file()


def test_recipe_refuses_a_bad_dp_flag_and_a_missing_file(tmp_path, capsys):
    from simulations.sotu_personalization import main

    with pytest.raises(SystemExit) as e:
        main(["--config", str(_tiny_recipe_config(tmp_path)), "--dp", "maybe"])
    assert e.value.code == 2 and "expected off, on or off,on" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--config", str(_tiny_recipe_config(tmp_path)), "--data", str(tmp_path / "nope.jsonl")])
    assert e.value.code == 2 and "file not found" in capsys.readouterr().err


def test_the_report_heads_a_setting_with_the_privacy_level_its_federation_recorded():
    from fedtune.personalization.benchmark import format_report

    setting = {"dp": False, "privacy_level": "user", "federation_epsilon": 7.94, "federation_delta": 0.02,
               "target_epsilon": None, "noise_multiplier": None, "delta": None, "methods": [],
               "best_personalized": None, "best_beats_global_share": None, "best_beats_local_only_mean": None,
               "table": "", "federation_seconds": 1, "evaluation_seconds": 1, "global_perplexity_by_round": [1.0]}
    md = format_report({"name": "x", "users": 3, "device": "cpu", "settings": [setting]})
    assert "## User-level DP-FedAvg on the server (ε 7.94, δ=0.02); no DP-SGD on devices" in md
    assert "## DP off" not in md
    md = format_report({"name": "x", "users": 3, "device": "cpu", "settings": [dict(setting, privacy_level="none")]})
    assert "## DP off" in md
