"""A heterogeneous fleet on the real Flower simulation engine: tiers, deadlines, dropouts, FlexLoRA."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fleet_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fleet")
    catalog = tmp / "devices"
    shutil.copytree(ROOT / "configs" / "devices", catalog)
    low = yaml.safe_load((catalog / "phone-low.yaml").read_text())
    low["dropout_probability"] = 1.0  # every low-end phone drops out mid-round
    low["availability"] = {"default_probability": 1.0, "windows": []}
    (catalog / "phone-low.yaml").write_text(yaml.safe_dump(low))
    out = tmp / "run"
    cmd = [sys.executable, "-m", "fedtune.cli", "simulate", str(ROOT / "configs/fleet-smoke.yaml"), "--out", str(out),
           "--set", f"fleet.catalog={catalog}", "--set", "federation.rounds=2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_rounds_survive_dropouts_and_record_the_fleet(fleet_run):
    out, records = fleet_run
    assert [r["round"] for r in records] == [0, 1, 2]
    dropped = sum(r["dropouts"] for r in records[1:])
    assert dropped > 0  # phone-low devices were sampled and dropped out...
    for r in records[1:]:
        assert r["clients_succeeded"] >= 2 and not r["round_skipped"]  # ...and the rounds went on
        assert r["clients_failed"] == r["dropouts"]
        assert r["sim_round_seconds"] > 0
        assert r["tiers"].get("phone-low", {}).get("succeeded", 0) == 0
        assert sum(t["sampled"] for t in r["tiers"].values()) == r["clients_sampled"]
        assert {c["rank"] for c in r["clients"]} <= {4, 8}
    assert records[2]["sim_clock_seconds"] == pytest.approx(
        records[1]["sim_round_seconds"] + records[2]["sim_round_seconds"], abs=1e-2)
    assert records[-1]["eval_perplexity"] < records[0]["eval_perplexity"]


def test_deadline_misses_are_stragglers_not_updates(fleet_run):
    out, records = fleet_run
    for r in records[1:]:
        assert all(c["sim-seconds"] <= 30.0 for c in r["clients"])  # fleet-smoke's deadline


def test_fleet_report_has_tier_plots(fleet_run):
    out, _ = fleet_run
    assert (out / "fleet.png").is_file()
    assert "| tier |" in (out / "report.md").read_text()
