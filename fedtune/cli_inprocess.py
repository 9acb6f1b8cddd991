"""``fedtune simulate --backend inprocess``: the engine's in-process backend behind the simulate command.

The same round as the Flower simulation (sampler, device round, pipeline, recorder:
``fedtune.federation.inprocess``) in this process, for machines where Ray does not fit or is not wanted
(a GPU box without Ray, a quick look). Devices train side by side in threads on one shared frozen base
(``simulation.concurrent_devices``; by default as many as torch has threads on CPU, one at a time on a GPU) or, with
``simulation.packed_group_size`` > 1, in packed groups on one device. It writes the same run directory (metrics.jsonl, checkpoints, ledgers),
so the report, the plots and ``fedtune evaluate`` read it like any other run.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from fedtune.report import COLUMNS, fmt


def compute_device(cfg) -> str:
    """cuda when the config asks for GPUs (``simulation.num_gpus_per_client`` > 0) and one is there; else cpu."""
    import torch

    return "cuda" if cfg.simulation.num_gpus_per_client > 0 and torch.cuda.is_available() else "cpu"


def print_round(console: Console, rec: dict, rounds: int) -> None:
    """A round's record as the one-row table both backends print when the round ends."""
    table = Table(title=f"round {rec['round']}/{rounds}", title_justify="left")
    for c in COLUMNS:
        table.add_column(c, justify="right")
    table.add_row(*(fmt(rec.get(c)) for c in COLUMNS))
    console.print(table)


def simulate_in_process(console: Console, cfg, run, clients) -> None:
    """Run ``cfg.federation.rounds`` rounds in this process, printing each round's table as it ends."""
    from fedtune.cli_quiet import quiet_libraries

    with quiet_libraries():
        _simulate(console, cfg, run, clients)


def _simulate(console: Console, cfg, run, clients) -> None:
    from fedtune.adapters.cached import adapter_model
    from fedtune.federation.inprocess import concurrent_workers, run_inprocess

    device = compute_device(cfg)
    model, _ = adapter_model(cfg.model, cfg.adapter, cfg.seed, device)
    pack = cfg.simulation.packed_group_size
    workers = concurrent_workers(cfg, model, pack)
    how = (f"in packed groups of up to {pack}" if pack > 1 else
           f"{workers} at a time (threads, one shared base)" if workers > 1 else "one at a time")
    console.print(f"in-process backend on {device}: devices train {how}")
    started, shown, trained = time.monotonic(), 0, {}

    def show_finished(upto: int) -> None:
        nonlocal shown
        for rec in run.read_metrics():
            if shown < rec["round"] <= upto:
                print_round(console, rec, cfg.federation.rounds)
                shown = rec["round"]

    def progress(server_round: int, user_id: str, update) -> None:
        show_finished(server_round - 1)
        trained[server_round] = trained.get(server_round, 0) + 1
        if trained[server_round] == 1:
            console.print(f"[{time.monotonic() - started:6.0f}s] round {server_round}/{cfg.federation.rounds}: "
                          "training")

    run_inprocess(cfg, model, clients, run, progress=progress, pack=pack, concurrent=workers)
    show_finished(cfg.federation.rounds)
