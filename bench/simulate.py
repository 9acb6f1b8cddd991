"""Run one experiment on Flower's simulation engine the way ``fedtune simulate`` does (bench helper)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)


def simulate(raw: dict, out: Path, clientapp: str | None = None) -> dict:
    """Prepare data, run the simulation, return {records, seconds}; ``clientapp`` swaps the ClientApp."""
    from fedtune.config import config_from_dict, dump_config, with_absolute_paths
    from fedtune.data import build_client_data, save_client_data
    from fedtune.flower.simulation import CLIENT_APP, run_simulation
    from fedtune.models import load_encoder, resolve_model_dir
    from fedtune.workspace import RunDir

    # the Ray workers import the baseline ClientApp from bench/ and fedtune from this checkout
    os.environ["PYTHONPATH"] = os.pathsep.join([BENCH, ROOT, os.environ.get("PYTHONPATH", "")])
    cfg = with_absolute_paths(config_from_dict(raw))
    run = RunDir.create(out)
    dump_config(cfg, run.config)
    resolve_model_dir(cfg.model)
    clients = build_client_data(cfg.data, load_encoder(cfg.model), cfg.seed)
    save_client_data(clients, run.data)
    t0 = time.monotonic()
    run_simulation(cfg, run, len(clients), clientapp=clientapp or CLIENT_APP)
    return {"records": run.read_metrics(), "seconds": time.monotonic() - t0}
