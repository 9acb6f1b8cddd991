"""The server's own publishing: only the guarantee, plus the round metrics ``publish.metrics`` allows by name."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedtune.federation.publishing import PUBLISHABLE_METRICS, maybe_publish
from fedtune.registry import Registry, generate_keypair
from fedtune.workspace import RunDir
from tests.conftest import make_config
from tests.unit.registry.conftest import write_run

ROOT = Path(__file__).resolve().parents[3]


def _publish(tmp_path, metrics, train_loss=2.0):
    run = write_run(tmp_path / "run", rounds=(1,))
    if train_loss is None:  # a skipped round records no train loss
        rec = json.loads((run / "metrics.jsonl").read_text())
        (run / "metrics.jsonl").write_text(json.dumps(dict(rec, train_loss=None)) + "\n")
    generate_keypair(tmp_path / "k.key")
    cfg = make_config(publish={"registry": str(tmp_path / "reg"), "signing_key": str(tmp_path / "k.key"),
                               "metrics": metrics})
    state = maybe_publish(cfg, RunDir(run), 1, 1)
    return Registry(tmp_path / "reg").versions()[0].manifest, state, run


def test_the_server_publishes_no_round_metric_by_default_only_the_guarantee(tmp_path):
    m, state, run = _publish(tmp_path, [])
    assert state["version"] == m.version == 1
    assert m.metrics == {}
    assert m.privacy.level == "sample" and m.privacy.epsilon == 2.5 and m.privacy.delta == 1e-5
    event = json.loads((run / "events.jsonl").read_text().splitlines()[-1])
    assert event["event"] == "published" and event["version"] == 1 and event["metrics"] == []


def test_allowed_metrics_appear_in_the_signed_manifest_and_no_other_does(tmp_path):
    m, _, _ = _publish(tmp_path, ["eval_loss", "clients_succeeded"])
    assert m.metrics == {"eval_loss": 2.5, "clients_succeeded": 3.0}  # not train_loss, upload_bytes, wall_seconds


def test_an_allowed_metric_the_round_lacks_is_left_out_not_invented(tmp_path):
    m, _, _ = _publish(tmp_path, ["train_loss", "eval_loss"], train_loss=None)
    assert m.metrics == {"eval_loss": 2.5}


def test_every_publishable_name_is_a_field_a_round_record_can_carry():
    from fedtune.types import RoundResult

    core = set(RoundResult(round=1, clients_sampled=1, clients_succeeded=1, train_loss=1.0, eval_loss=1.0,
                           eval_perplexity=1.0, upload_bytes=1, wall_seconds=1.0).to_record())
    recorder = {"eval_accuracy", "clients_failed", "adapter_bytes", "sim_round_seconds"}  # Recorder / fleet extras
    assert set(PUBLISHABLE_METRICS) <= core | recorder
    assert "epsilon" not in PUBLISHABLE_METRICS and "delta" not in PUBLISHABLE_METRICS


@pytest.mark.parametrize("name", ["update_norm", "eval_los", "epsilon"])
def test_an_unknown_metric_is_refused_by_validate_with_one_line_and_exit_2(name):
    from fedtune.cli import app

    result = CliRunner().invoke(app, ["validate", str(ROOT / "configs/smoke.yaml"), "--set",
                                      f"publish.metrics=[eval_loss, {name}]"])
    assert result.exit_code == 2, result.output
    line = next(ln for ln in result.output.splitlines() if "publish.metrics" in ln)
    assert repr(name) in line and "eval_perplexity" in line and "eval_loss'" not in line
