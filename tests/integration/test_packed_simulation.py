"""The real Flower simulation engine with packed training: one ClientApp call trains two devices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_packed_groups_run_every_round_with_per_device_replies(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedtune.cli", "simulate", str(ROOT / "configs/smoke.yaml"), "--out", str(out),
           "--set", "simulation.packed_group_size=2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in records[1:]:
        assert r["clients_sampled"] == 4 and r["clients_succeeded"] == 4
        assert sorted(c["partition"] for c in r["clients"]) == [0, 1, 2, 3]
    assert 0 < records[1]["epsilon"] < records[2]["epsilon"]
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    done = [e for e in events if e["event"] == "client_done"]
    assert len(done) == 8 and all(e["packed_group"] == 2 for e in done)
    # each round_done says when the server finished each step, in order, after the devices' replies were done
    steps = ["sent", "replies_in", "checked", "aggregated", "recorded", "checkpointed"]
    for e in (e for e in events if e["event"] == "round_done" and e["round"] >= 1):  # round 0: the initial eval
        marks = [e["server"][s] for s in steps]
        assert marks == sorted(marks), e
        last_reply = max(d["time"] for d in done if d["round"] == e["round"])
        assert marks[0] <= last_reply <= marks[1] <= e["time"]
