"""Per-process run context shared by the ClientApp and ServerApp: config, run dir, adapted model."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from fedtune.adapters import create_adapter
from fedtune.config import ExperimentConfig, load_config
from fedtune.models import get_base_model
from fedtune.workspace import RunDir


@dataclass(frozen=True)
class RunContext:
    cfg: ExperimentConfig
    run: RunDir
    device: str

    def model(self):
        """The worker's cached base model with its adapter attached (loaded once per process)."""
        cfg = self.cfg
        if cfg.train.torch_threads:
            torch.set_num_threads(cfg.train.torch_threads)
        return get_base_model(cfg.model, self.device,
                              build=lambda m: create_adapter(m, cfg.adapter, cfg.seed),
                              extra=cfg.adapter.model_dump_json())


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=8)
def _load(config_path: str, run_dir: str) -> RunContext:
    cfg = load_config(config_path)
    root = Path(run_dir) if run_dir else Path("runs") / cfg.name
    return RunContext(cfg=cfg, run=RunDir.create(root), device=default_device())


def run_context(run_config) -> RunContext:
    """From a Flower run config (``config-path``, ``run-dir``)."""
    try:
        path = str(run_config["config-path"])
    except KeyError:
        raise KeyError("run config has no 'config-path'; pass --run-config \"config-path='...'\"") from None
    return _load(str(Path(path).absolute()), str(run_config.get("run-dir", "") or ""))
