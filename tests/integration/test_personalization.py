"""Split adapters through the real Flower simulation engine, then `fedtune evaluate` on the run."""

import csv
import json
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]


def test_fedsa_run_through_flower_then_per_user_evaluation(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedtune.cli", "simulate", str(ROOT / "configs/smoke.yaml"), "--out", str(out),
           "--set", "personalization.split=fedsa", "--set", "personalization.evaluate_at_end=true",
           "--set", "personalization.finetune_steps=2", "--set", "personalization.eval_max_chunks=2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    users = [e["user_id"] for e in json.loads((out / "data" / "index.json").read_text())]
    # every device trained (4 of 4 per round) and kept its own B; the server never saw one
    assert sorted(p.stem for p in (out / "state" / "private").glob("*.safetensors")) == sorted(users)
    saved = load_file(str(out / "adapters" / "round-2" / "adapter_model.safetensors"))
    assert all(not t.any() for k, t in saved.items() if ".lora_B." in k)  # the global model's B is its init
    a_keys = [k for k in saved if ".lora_A." in k]
    a_bytes = sum(saved[k].numel() * 2 for k in a_keys)  # fp16 uploads (federation.upload's default)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # each device uploads its A tensors, no B: one flat fp16 buffer and its layout (.npy headers, names, shapes)
    overhead = 2 * 128 + sum(len(k) + 40 for k in a_keys)
    for r in records[1:]:
        assert r["clients_succeeded"] == 4 and r["upload_bytes"] % 4 == 0
        assert 4 * a_bytes < r["upload_bytes"] <= 4 * (a_bytes + overhead)
        assert r["upload_bytes"] < 4 * r["adapter_bytes"]
    rows = list(csv.DictReader(open(out / "eval" / "per_user.csv")))
    assert {r["method"] for r in rows} == {"base", "global", "finetune", "personalized", "split", "local_only"}
    assert {r["user"] for r in rows} == set(users)
    assert "best personalized method" in proc.stdout
    assert (out / "eval" / "summary.md").is_file() and (out / "eval" / "per_user_distribution.png").is_file()
    # and the standalone command gives the same numbers for the deterministic methods
    again = subprocess.run([sys.executable, "-m", "fedtune.cli", "evaluate", str(out), "-m", "split", "-m", "base"],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    rows2 = {(r["user"], r["method"]): r for r in csv.DictReader(open(out / "eval" / "per_user.csv"))}
    for r in rows:
        if r["method"] in ("split", "base"):
            assert rows2[r["user"], r["method"]]["loss"] == r["loss"]


def test_evaluate_refuses_a_directory_that_is_not_a_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedtune.cli", "evaluate", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not a fedtune run directory" in proc.stderr  # user errors go to stderr
    assert "Traceback" not in proc.stdout + proc.stderr
