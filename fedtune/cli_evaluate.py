"""`fedtune evaluate RUN_DIR`: per-user evaluation of a finished run (base / global / fine-tuned / split /
local-only), written to RUN_DIR/eval/."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from fedtune.errors import UserError


def run_evaluation(console: Console, run_dir: Path, methods: list[str] | None = None,
                   overrides: dict | None = None) -> None:
    """Evaluate, print the summary table and where the files are; exit 2 on a directory that is not a run."""
    from fedtune.personalization.run_eval import RunNotEvaluable, evaluate_run
    from fedtune.personalization.summary import best_personalized, format_table

    t0 = time.monotonic()

    def progress(done: int, total: int, user: str) -> None:
        console.print(f"[{time.monotonic() - t0:6.0f}s] evaluated user {user} ({done}/{total})")

    from fedtune.cli_quiet import quiet_libraries

    try:
        with quiet_libraries():
            _, summaries = evaluate_run(run_dir, methods=methods, progress=progress, overrides=overrides)
    except (RunNotEvaluable, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    console.print(format_table(summaries))
    best = best_personalized(summaries)
    if best is not None:
        console.print(f"best personalized method: {best.method} (mean perplexity {best.mean_perplexity:.3f})")
    console.print(f"per-user results: {Path(run_dir) / 'eval' / 'per_user.csv'} (+ summary.md, plots) "
                  f"in {time.monotonic() - t0:.0f}s")


def evaluate(run_dir: Path = typer.Argument(..., help="a run directory written by `fedtune simulate`"),
             method: list[str] = typer.Option([], "--method", "-m",
                                              help="base, global, finetune, personalized, split, local_only "
                                                   "(default: config)"),
             finetune_steps: Optional[int] = typer.Option(None, "--finetune-steps", min=1),
             local_only_steps: Optional[int] = typer.Option(None, "--local-only-steps", min=1)) -> None:
    """Evaluate every user of a run on their own held-out data; writes eval/per_user.csv, a summary and plots."""
    from fedtune.cli import console
    from fedtune.personalization.evaluate import METHODS

    unknown = [m for m in method if m not in METHODS]
    if unknown:
        raise UserError(f"--method: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir}: is a file; pass the --out directory of `fedtune simulate`")
    overrides = {k: v for k, v in {"finetune_steps": finetune_steps, "local_only_steps": local_only_steps}.items()
                 if v is not None}
    run_evaluation(console, run_dir, methods=method or None, overrides=overrides)
