"""The two backends of one engine: for the same config and seed, `fedtune simulate` (Flower on Ray) and
`fedtune simulate --backend inprocess` give the same adapters, losses and ε (up to the order replies are summed
in)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = ["federation.rounds=2", "federation.clients_per_round=3", "train.local_steps=3"]


def _simulate(out: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "fedtune.cli", "simulate", str(ROOT / "configs/smoke.yaml"), "--out", str(out)]
    for s in SETTINGS:
        cmd += ["--set", s]
    proc = subprocess.run(cmd + list(extra), cwd=ROOT, env=dict(os.environ), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_flower_and_in_process_backends_agree(tmp_path):
    flower = tmp_path / "flower"
    _simulate(flower)
    _simulate(tmp_path / "local", "--backend", "inprocess")
    assert (tmp_path / "local" / "report.md").is_file()

    local = [json.loads(line) for line in (tmp_path / "local" / "metrics.jsonl").read_text().splitlines()]
    remote = [json.loads(line) for line in (flower / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in remote] == [r["round"] for r in local] == [0, 1, 2]
    for a, b in zip(remote, local):
        assert a["clients_sampled"] == b["clients_sampled"] and a["clients_succeeded"] == b["clients_succeeded"]
        assert a["privacy_level"] == b["privacy_level"] and a["randomness"] == b["randomness"] == "simulated"
        for key in ("eval_loss", "train_loss", "epsilon"):
            if a[key] is None:
                assert b[key] is None
            else:
                assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (key, a[key], b[key])
    for r in (1, 2):
        x = load_file(str(flower / "adapters" / f"round-{r}" / "adapter_model.safetensors"))
        y = load_file(str(tmp_path / "local" / "adapters" / f"round-{r}" / "adapter_model.safetensors"))
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(x[k], y[k], atol=1e-5, rtol=1e-4)
