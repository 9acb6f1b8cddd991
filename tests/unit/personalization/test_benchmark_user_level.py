"""The benchmark's user-level setting (--dp user): DP-FedAvg noise on the server at the DP-on setting's ε, the
table labelled from what ran, a refusal reported, and the DP-SGD vs user-level line computed from the results."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tests.unit.personalization.test_benchmark import _tiny_recipe_config, _write


def _main(tmp_path, dp, *extra):
    from simulations.sotu_personalization import main

    out = tmp_path / "out"
    report = main(["--config", str(_tiny_recipe_config(tmp_path)), "--data", str(_write(tmp_path, ".jsonl")),
                   "--user-column", "author", "--text-column", "body", "--out", str(out), "--dp", dp,
                   "--device", "cpu", *extra])
    return report, out


def _adapter(run, r):
    return {k: v.float() for k, v in load_file(str(run / "adapters" / f"round-{r}" / "adapter_model.safetensors"))
            .items()}


def test_the_user_setting_adds_server_noise_of_the_dp_fedavg_law_and_labels_the_table_from_its_ledger(tmp_path):
    from fedtune.federation.labels import USER_MECHANISM

    report, out = _main(tmp_path, "user")
    (s,) = report["settings"]
    run = out / "dp-user" / "fedavg"
    final = json.loads((run / "adapters" / "round-2" / "fedtune.json").read_text())["privacy"]
    assert s["setting"] == "user" and s["dp"] is False and s["privacy_level"] == "user" == final["level"]
    assert s["mechanism"] == final["mechanism"] == USER_MECHANISM
    # ε and δ from the server's ledger: the DP-on setting's device budget (8) and δ (1e-5), met, not exceeded
    assert s["federation_epsilon"] == final["epsilon"] and 7.0 < final["epsilon"] <= 8.0
    assert s["federation_delta"] == final["delta"] == 1e-5 and s["epsilon_warnings"] == []
    # the noise: a round's change of the global adapter is Gaussian with std σ·C / (q·N) per coordinate
    # (q·N = the cohort, 2); the clipped updates alone move it by at most C·n / (q·N) in L2 norm
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    r = next(x["round"] for x in records[1:] if not x["round_skipped"])
    before, after = _adapter(run, r - 1), _adapter(run, r)
    change = torch.cat([(after[k] - before[k]).flatten() for k in before])
    sigma, clip = final["noise_multiplier"], final["clip_norm"]
    assert clip == 0.1 and sigma > 0.3
    assert change.norm() > 10 * clip * 3 / 2  # far beyond what 3 clipped updates could move it
    assert change.std().item() == pytest.approx(sigma * clip / 2, rel=0.1)
    # the table's ε column: the user-level ε for the models built on the global adapter, none for the others
    eps = {m["method"]: m["max_epsilon"] for m in s["methods"]}
    assert eps["global"] == eps["finetune"] == eps["personalized"] == final["epsilon"]
    assert eps["base"] is None and eps["local_only"] is None
    md = (out / "benchmark.md").read_text()
    assert (f"## User-level DP-FedAvg on the server (ε {final['epsilon']:.2f}, δ=1e-05, noise multiplier "
            f"{sigma:.3g}, clip 0.1); no DP-SGD on devices") in md
    assert "Per-device DP-SGD vs user-level" not in md and report["comparison"] is None  # only one ran


def test_a_user_level_configuration_that_cannot_be_planned_is_a_line_in_the_report_not_a_crash(tmp_path):
    report, out = _main(tmp_path, "user", "--set", "federation.clients_per_round=5")
    (s,) = report["settings"]
    assert "cohort 5 exceeds the population 3" in s["refused"]
    assert "the user-level setting was not run: privacy.user_level: cohort 5 exceeds the population 3" in (
        out / "benchmark.md").read_text()
    assert not (out / "dp-user").exists()


def test_the_comparison_line_is_computed_from_both_settings_results(tmp_path, monkeypatch):
    from fedtune.personalization import benchmark
    from fedtune.personalization.benchmark import run_benchmark

    numbers = {"on": (-0.05, 30.0), "user": (-0.02, 33.0)}

    def fake(cfg, clients, out, dp, device, progress=None, pack=1, initial=None):
        median, mean = numbers[dp]
        row = {"method": "personalized", "median_change_vs_global": median, "mean_perplexity": mean,
               "max_epsilon": 7.5}
        return {"setting": dp, "dp": dp == "on", "privacy_level": "user" if dp == "user" else "sample",
                "federation_epsilon": 7.9, "federation_delta": 1e-5, "max_epsilon": 7.5, "target_epsilon": 8.0,
                "noise_multiplier": 1.0, "delta": 1e-5, "methods": [row], "best_personalized": "personalized",
                "best_beats_global_share": 1.0, "best_beats_local_only_mean": True, "table": "",
                "federation_seconds": 0, "evaluation_seconds": 0, "global_perplexity_by_round": [1.0]}

    monkeypatch.setattr(benchmark, "run_setting", fake)
    monkeypatch.setattr(benchmark, "load_model", lambda cfg, device: torch.nn.Linear(1, 1))
    monkeypatch.setattr(benchmark, "seeded_initial", lambda model: {})
    report = run_benchmark(SimpleNamespace(name="x"), [], tmp_path / "a", settings=("on", "user"))
    md = (tmp_path / "a" / "benchmark.md").read_text()
    assert "median change vs global -5.0% vs -2.0%, better: **per-device DP-SGD**" in md
    assert "mean perplexity 30.00 vs 33.00, better: **per-device DP-SGD**" in md
    assert json.loads((tmp_path / "a" / "benchmark.json").read_text())["comparison"] == report["comparison"]
    numbers.update(on=(-0.01, 34.0))
    run_benchmark(SimpleNamespace(name="x"), [], tmp_path / "b", settings=("on", "user"))
    md = (tmp_path / "b" / "benchmark.md").read_text()
    assert "better: **user-level DP-FedAvg**; mean perplexity 34.00 vs 33.00, better: **user-level DP-FedAvg**" in md
    run_benchmark(SimpleNamespace(name="x"), [], tmp_path / "c", settings=("user",))
    assert "Per-device DP-SGD vs user-level" not in (tmp_path / "c" / "benchmark.md").read_text()


def test_the_recipe_refuses_an_unknown_setting_and_a_user_setting_without_an_epsilon(tmp_path, capsys):
    from simulations.sotu_personalization import main

    cfg = str(_tiny_recipe_config(tmp_path))
    with pytest.raises(SystemExit) as e:
        main(["--config", cfg, "--dp", "off,on,usr"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "(or user, e.g. off,on,user; 'usr' is none of them)" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        main(["--config", cfg, "--dp", "user", "--set", "privacy.target_epsilon=null",
              "--set", "privacy.device_epsilon_budget=null", "--out", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "set privacy.target_epsilon" in err and err.count("\n") == 1
    assert not (tmp_path / "never").exists()
