"""Settings side by side (``fedtune.personalization.parallel``): the slot plan, one clear error from a failed
worker, and the same per-setting results and report as one after another."""

import json

import pytest

from fedtune.personalization.parallel import SettingFailed, Slot, plan_slots, run_parallel
from tests.unit.personalization.test_benchmark import _tiny_recipe_config, _write


def test_one_worker_per_gpu_capped_by_the_settings_and_sequential_by_default_on_the_cpu():
    two = ["0", "1"]
    assert plan_slots("cuda", None, 3, two) == [Slot("cuda:0", "cuda", "0"), Slot("cuda:1", "cuda", "1")]
    assert plan_slots("cuda", None, 2, ["GPU-a", "GPU-b", "GPU-c"])[1] == Slot("cuda:1", "cuda", "GPU-b")
    assert plan_slots("cuda", None, 3, ["0"]) == []  # one GPU: one after another
    assert plan_slots("cuda", None, 1, two) == []  # one setting
    assert plan_slots("cuda", 1, 3, two) == []  # asked for sequential
    assert plan_slots("cpu", None, 3) == []
    cpu = plan_slots("cpu", 2, 3)
    assert [s.device for s in cpu] == ["cpu", "cpu"] and all(s.visible is None and s.threads >= 1 for s in cpu)
    with pytest.raises(ValueError, match="2 GPU"):
        plan_slots("cuda", 4, 3, two)
    with pytest.raises(ValueError, match="positive"):
        plan_slots("cpu", 0, 3)


def test_a_failing_worker_ends_the_run_with_one_error_naming_the_setting(tmp_path):
    # an unknown setting fails inside the worker, before any model loads: the parent raises, nothing hangs
    with pytest.raises(SettingFailed, match="failed in its worker: ValueError: privacy setting 'bogus'"):
        run_parallel(None, [], tmp_path, ("bogus",), [Slot("cpu", "cpu", None, 1)], 1, {})


def _run(tmp_path, name, *extra):
    from simulations.sotu_personalization import main

    out = tmp_path / name
    report = main(["--config", str(_tiny_recipe_config(tmp_path)), "--data", str(_write(tmp_path, ".jsonl")),
                   "--user-column", "author", "--text-column", "body", "--out", str(out), "--dp", "on,user",
                   "--device", "cpu", *extra])
    return report, out


@pytest.mark.slow
def test_two_cpu_workers_give_the_sequential_results_and_the_comparison_line(tmp_path):
    seq, _ = _run(tmp_path, "seq")
    par, out = _run(tmp_path, "par", "--workers", "2")
    assert par["workers"] == ["cpu", "cpu"] and seq["workers"] == ["cpu"]
    assert [s["setting"] for s in par["settings"]] == ["on", "user"]
    for a, b in zip(seq["settings"], par["settings"]):
        assert a["sat_out"] == b["sat_out"] and a["users_evaluated"] == b["users_evaluated"]
        assert a["global_perplexity_by_round"] == pytest.approx(b["global_perplexity_by_round"], rel=1e-4)
        rows_a, rows_b = ({m["method"]: m for m in s["methods"]} for s in (a, b))
        assert rows_a.keys() == rows_b.keys()
        for m in rows_a:
            assert rows_a[m]["mean_perplexity"] == pytest.approx(rows_b[m]["mean_perplexity"], rel=1e-4)
            eps_a, eps_b = rows_a[m]["max_epsilon"], rows_b[m]["max_epsilon"]
            assert (eps_a is None) == (eps_b is None) and (eps_a is None or eps_a == pytest.approx(eps_b, rel=1e-6))
    assert par["comparison"] is not None
    assert par["comparison"]["better_mean_perplexity"] == seq["comparison"]["better_mean_perplexity"]
    md = (out / "benchmark.md").read_text()
    assert "settings side by side on cpu, cpu" in md and "**Per-device DP-SGD vs user-level DP-FedAvg**" in md
    assert json.loads((out / "benchmark.json").read_text())["comparison"] == par["comparison"]
    assert (out / "dp-on" / "eval" / "per_user.csv").is_file() and (out / "dp-user" / "eval" / "per_user.csv").is_file()
