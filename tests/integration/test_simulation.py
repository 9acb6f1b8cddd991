"""The real Flower simulation engine (Ray backend) on the tiny model: configs/smoke.yaml end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
FIELDS = ("round", "clients_sampled", "clients_succeeded", "train_loss", "eval_loss", "eval_perplexity",
          "upload_bytes", "wall_seconds", "epsilon", "delta")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smoke")
    out = tmp / "run"
    env = dict(os.environ)
    from fedtune.registry import generate_keypair

    generate_keypair(tmp / "signing.key")
    cmd = [sys.executable, "-m", "fedtune.cli", "simulate", str(ROOT / "configs/smoke.yaml"), "--out", str(out),
           "--set", f"publish.registry={tmp / 'registry'}", "--set", f"publish.signing_key={tmp / 'signing.key'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, proc.stdout


def test_smoke_run_writes_metrics_for_every_round(smoke_run):
    out, stdout = smoke_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records:
        assert all(f in r for f in FIELDS), r
    assert records[0]["clients_sampled"] == 0 and records[0]["upload_bytes"] == 0
    for r in records[1:]:
        assert r["clients_sampled"] == 4 and r["clients_succeeded"] == 4
        # 4 clients x (LoRA r=4 on q,v of the 2-layer tiny model: 8 tensors in one flat fp16 buffer, plus the
        # buffer's .npy header and the layout's: names and shapes)
        values = r["adapter_bytes"] // 2  # federation.upload=fp16
        assert r["upload_bytes"] % 4 == 0 and 4 * values < r["upload_bytes"] <= 4 * (values + 2 * 128 + 8 * 120)
        assert r["privacy_level"] == "sample" and r["delta"] == 1e-5
    assert 0 < records[1]["epsilon"] < records[2]["epsilon"]
    assert records[2]["eval_perplexity"] < records[0]["eval_perplexity"]
    assert records[0]["base_model_bytes"] < records[0]["base_model_bytes_dense"]
    users = {c["partition"] for c in records[1]["clients"]}
    assert users == {0, 1, 2, 3}


def test_smoke_run_saves_peft_adapters_each_round(smoke_run):
    from peft import PeftModel

    from fedtune.config import load_config
    from fedtune.models import load_base_model

    out, _ = smoke_run
    for r in (0, 1, 2):
        assert (out / "adapters" / f"round-{r}" / "adapter_model.safetensors").is_file()
    cfg = load_config(out / "config.yaml")
    base, _ = load_base_model(cfg.model)
    model = PeftModel.from_pretrained(base, str(out / "adapters" / "round-2"))
    with torch.no_grad():
        logits = model(input_ids=torch.randint(0, 256, (1, 8))).logits
    assert torch.isfinite(logits).all()
    meta = json.loads((out / "adapters" / "round-2" / "fedtune.json").read_text())
    assert meta["privacy"]["epsilon"] > 0


def test_smoke_run_reports_progress_and_leaves_no_superlink(smoke_run):
    out, stdout = smoke_run
    assert "round 1/2: training 4 clients" in stdout
    assert "held-out perplexity" in stdout
    assert (out / "report.md").is_file() and (out / "perplexity.png").is_file()
    # the report names the label and the randomness of the seeds that ran (Seeds.simulated: no deployment)
    assert "; randomness: simulated" in (out / "report.md").read_text()
    assert (out / "config.yaml").is_file()
    import psutil

    home = str(out / "flower" / "home")
    leftovers = [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"])
                 if p.info["cmdline"] and any(home in part for part in p.info["cmdline"])]
    assert leftovers == []


def test_each_worker_loads_the_base_once(smoke_run):
    out, _ = smoke_run
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    done = [e for e in events if e["event"] == "client_done"]
    assert len(done) == 8  # 4 clients x 2 rounds
    workers = {e["pid"] for e in done}
    assert len(workers) <= 2  # simulation.max_concurrent_clients
    assert len(done) > len(workers)  # workers were reused across clients and rounds
    assert all(e["model_loads"] == 1 for e in done)  # ...without reloading the base


def test_the_server_publishes_the_final_adapter_signed_with_its_guarantee(smoke_run):
    from fedtune.registry import Registry, load_verify_key, verify_manifest

    out, stdout = smoke_run
    registry = Registry(out.parent / "registry")
    versions = registry.versions()
    assert [v.manifest.version for v in versions] == [1]
    manifest = verify_manifest(versions[0], load_verify_key(out.parent / "signing.pub"))
    assert manifest.source.round == 2
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert manifest.privacy.epsilon == pytest.approx(final["epsilon"]) and manifest.privacy.level == "sample"
    assert "published v1" in stdout


def test_a_resumed_run_continues_every_ledger_where_it_stopped(smoke_run, tmp_path):
    """Stop after round 1, restart the same command for 2 rounds: same result as never stopping."""
    out = tmp_path / "run"
    base = [sys.executable, "-m", "fedtune.cli", "simulate", str(ROOT / "configs/smoke.yaml"), "--out", str(out)]
    first = subprocess.run(base + ["--set", "federation.rounds=1"], cwd=ROOT, capture_output=True, text=True,
                           timeout=900)
    assert first.returncode == 0, first.stdout[-3000:]
    assert json.loads((out / "checkpoint.json").read_text())["round"] == 1
    again = subprocess.run(base + ["--set", "federation.rounds=1"], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr  # never overwrites a run by accident
    second = subprocess.run(base + ["--set", "federation.rounds=2", "--resume"], cwd=ROOT, capture_output=True,
                            text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:]
    assert "resumed after round 1" in second.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]  # nothing counted twice
    straight = [json.loads(line) for line in (smoke_run[0] / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(records, straight):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-4)
        assert a["epsilon"] == pytest.approx(b["epsilon"], rel=1e-9)
    for user in ("user-000", "user-001", "user-002", "user-003"):
        resumed = json.loads((out / "state" / "ledgers" / f"{user}.json").read_text())
        straight_ledger = json.loads((smoke_run[0] / "state" / "ledgers" / f"{user}.json").read_text())
        assert resumed == straight_ledger and resumed["rounds"] == [1, 2]


def test_flower_app_section_in_pyproject():
    import tomllib

    flwr = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert flwr["components"] == {"serverapp": "server.app:app", "clientapp": "clients.app:app"}
    assert {"config-path", "run-dir"} <= set(flwr["config"])


def test_user_level_dp_stops_cleanly_at_its_budget(tmp_path):
    """A config asking for more rounds than the user-level budget allows stops at the budget."""
    from fedtune.privacy.user_level import user_level_epsilon

    eps2, eps3 = (user_level_epsilon(2.0, 1.0, r, 1e-5) for r in (2, 3))
    budget = (eps2 + eps3) / 2
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedtune.cli", "simulate", str(ROOT / "configs/smoke.yaml"), "--out", str(out),
           "--set", "federation.rounds=4", "--set", "privacy.user_level.enabled=true",
           "--set", "privacy.user_level.noise_multiplier=2.0", "--set", "privacy.user_level.delta=1e-5",
           "--set", f"privacy.user_level.epsilon_budget={budget}", "--set", "privacy.user_level.clip_norm=0.05"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "stops the run before round 3" in proc.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    assert records[-1]["privacy_level"] == "user"
    assert records[-1]["epsilon"] == pytest.approx(eps2, rel=1e-6) and records[-1]["epsilon"] <= budget
    assert 0 < records[1]["epsilon"] < records[2]["epsilon"]
    assert records[-1]["sample_epsilon"] > 0  # the devices' own DP-SGD is reported beside it
    meta = json.loads((out / "adapters" / "round-2" / "fedtune.json").read_text())
    assert meta["privacy"]["level"] == "user" and meta["privacy"]["rounds"] == 2
    assert meta["privacy"]["sample_level"]["level"] == "sample"


def test_an_impossible_user_level_target_is_refused_before_any_work(tmp_path):
    cmd = [sys.executable, "-m", "fedtune.cli", "simulate", str(ROOT / "configs/smoke.yaml"), "--out",
           str(tmp_path / "run"), "--set", "privacy.user_level.enabled=true",
           "--set", "privacy.user_level.target_epsilon=0.001", "--set", "privacy.user_level.delta=1e-5"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "error" in proc.stderr and "target" in proc.stderr.lower()  # user errors go to stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
