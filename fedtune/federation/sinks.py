"""Experiment-tracking sinks on the one recorder: every metrics.jsonl record also goes to TensorBoard and/or
MLflow (a local file store under the run directory; no server). Off by default (``tracking`` section).

Only numeric top-level fields are logged, as scalars named like the record's keys, at step = round.
TensorBoard writes ``<run>/tensorboard/``; MLflow ``<run>/mlruns/`` (experiment = the config's name).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol


class Sink(Protocol):
    def write(self, record: dict) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict) -> dict[str, float]:
    """The record's finite numbers (bools and nested fields left out)."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


class TensorBoardSink:
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, record: dict) -> None:
        step = int(record["round"])
        for name, value in scalars(record).items():
            if name != "round":
                self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflowSink:
    def __init__(self, store: Path, experiment: str, run_name: str):
        import os

        # MLflow 3 keeps its file store in maintenance mode behind this switch; a run directory needs no
        # database server (and the sqlite store would need SQLAlchemy + Alembic)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=Path(store).absolute().as_uri())
        found = self.client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found else self.client.create_experiment(experiment)
        runs = self.client.search_runs([exp_id], filter_string=f"tags.mlflow.runName = '{run_name}'")
        self.run_id = runs[0].info.run_id if runs else self.client.create_run(exp_id, run_name=run_name).info.run_id

    def write(self, record: dict) -> None:
        from mlflow.entities import Metric

        step, now = int(record["round"]), 0
        metrics = [Metric(k, v, now, step) for k, v in scalars(record).items() if k != "round"]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        pass


class Sinks:
    """The configured sinks of a run (none by default)."""

    def __init__(self, cfg, root: Path):
        self.sinks: list[Sink] = []
        tracking = cfg.tracking
        if tracking.tensorboard:
            self.sinks.append(TensorBoardSink(Path(root) / "tensorboard"))
        if tracking.mlflow:
            self.sinks.append(MLflowSink(Path(root) / "mlruns", cfg.name, Path(root).name))

    def write(self, record: dict) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
