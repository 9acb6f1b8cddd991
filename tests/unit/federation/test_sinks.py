"""TensorBoard and MLflow sinks on the recorder, read back with each library's own reader."""

import pytest

from fedtune.adapters import create_adapter
from fedtune.data import build_client_data
from fedtune.federation.inprocess import run_inprocess
from fedtune.models import load_base_model
from fedtune.models.tokenizer import ByteEncoder
from fedtune.workspace import RunDir
from tests.conftest import make_config


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    cfg = make_config(tracking={"tensorboard": True, "mlflow": True}, federation={"rounds": 2, "upload": "fp32"},
                      train={"local_steps": 1, "eval_max_chunks": 4})
    base, _ = load_base_model(cfg.model)
    model = create_adapter(base, cfg.adapter, cfg.seed)
    run = RunDir.create(tmp_path_factory.mktemp("tracked") / "run")
    records = run_inprocess(cfg, model, build_client_data(cfg.data, ByteEncoder(), cfg.seed), run)
    return run, records


def test_tensorboard_holds_every_rounds_scalars(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, records = tracked
    acc = EventAccumulator(str(run.root / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("eval_loss")
    assert [e.step for e in events] == [0, 1, 2]
    assert [e.value for e in events] == pytest.approx([r["eval_loss"] for r in records], rel=1e-6)
    assert "train_loss" in acc.Tags()["scalars"] and "privacy_level" not in acc.Tags()["scalars"]


def test_mlflow_file_store_holds_every_rounds_metrics(tracked):
    from mlflow.tracking import MlflowClient

    run, records = tracked
    client = MlflowClient(tracking_uri=(run.root / "mlruns").as_uri())
    exp = client.get_experiment_by_name("experiment")
    (mlrun,) = client.search_runs([exp.experiment_id])
    history = sorted(client.get_metric_history(mlrun.info.run_id, "eval_perplexity"), key=lambda m: m.step)
    assert [m.step for m in history] == [0, 1, 2]
    assert [m.value for m in history] == pytest.approx([r["eval_perplexity"] for r in records], rel=1e-6)


def test_sinks_are_off_by_default(tmp_path):
    from fedtune.federation.sinks import Sinks

    assert Sinks(make_config(), tmp_path).sinks == [] and not list(tmp_path.iterdir())
