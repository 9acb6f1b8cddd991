"""Per-process run context shared by the ClientApp and ServerApp: config, run dir, adapted model."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from fedtune.adapters.cached import adapter_model
from fedtune.config import ExperimentConfig, load_config
from fedtune.workspace import RunDir


@dataclass(frozen=True)
class RunContext:
    cfg: ExperimentConfig
    run: RunDir
    device: str

    def model(self, quantization: str | None = None, rank: int | None = None, alpha: float | None = None):
        """The worker's cached base model with its adapter attached (loaded once per process).

        A device tier may override the quantization and the LoRA rank/alpha; each distinct
        (quantization, rank) is loaded once per worker and then reused.
        """
        cfg = self.cfg
        if cfg.train.torch_threads:
            torch.set_num_threads(cfg.train.torch_threads)
        model_cfg = cfg.model if quantization is None else cfg.model.model_copy(update={"quantization": quantization})
        adapter_cfg = cfg.adapter
        if rank is not None:
            adapter_cfg = adapter_cfg.model_copy(update={"rank": rank, "alpha": alpha or adapter_cfg.alpha})
        return adapter_model(model_cfg, adapter_cfg, cfg.seed, self.device)

    @functools.cached_property
    def data_index(self) -> list[dict]:
        from fedtune.data.partition import read_index

        return read_index(self.run.data)


def simulated_params(cfg: ExperimentConfig, info: dict) -> int:
    """The parameter count a fleet's simulated clock charges: ``fleet.simulated_params``, else the base
    model's own (its fp32 size ``base_bytes_dense`` / 4 bytes per parameter)."""
    return cfg.fleet.simulated_params or info["base_bytes_dense"] // 4


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=8)
def _load(config_path: str, run_dir: str) -> RunContext:
    cfg = load_config(config_path)
    root = Path(run_dir) if run_dir else Path("runs") / cfg.name
    return RunContext(cfg=cfg, run=RunDir.create(root), device=default_device())


@functools.lru_cache(maxsize=8)
def _load_shipped(text: str) -> RunContext:
    """A real device that cannot see the server's files: the config came inside the run (``config-yaml``,
    already validated by the server); the device's run directory is local (its progress events only)."""
    import hashlib
    import os

    import yaml

    home = Path(os.environ.get("FEDTUNE_DEVICE_HOME", "") or Path.home() / ".fedtune" / "device")
    root = home / "runs" / hashlib.sha256(text.encode()).hexdigest()[:16]
    cfg = ExperimentConfig.model_validate(yaml.safe_load(text))
    run = RunDir.create(root)
    run.config.write_text(text)
    return RunContext(cfg=cfg, run=run, device=default_device())


def run_context(run_config) -> RunContext:
    """From a Flower run config (``config-path``, ``run-dir``; ``config-yaml`` where the launcher ships the
    config itself, as ``fedtune server start`` does, for devices that cannot read ``config-path``)."""
    try:
        path = str(run_config["config-path"])
    except KeyError:
        raise KeyError("run config has no 'config-path'; pass --run-config \"config-path='...'\"") from None
    shipped = str(run_config.get("config-yaml", "") or "")
    if shipped and not Path(path).is_file():
        return _load_shipped(shipped)
    return _load(str(Path(path).absolute()), str(run_config.get("run-dir", "") or ""))
