"""`fedtune audit ...`: privacy audits of a trained adapter, printing over fedtune.audit.

Mounted in fedtune/cli.py with ``app.add_typer(audit_app, name="audit")``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from fedtune.config import ConfigError, load_config

console = Console(highlight=False, width=None if os.isatty(1) else 140)
audit_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Privacy audits: does the released adapter remember one client's secrets?")

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)


@audit_app.callback()
def _audit() -> None:
    """Privacy audits: does the released adapter remember one client's secrets?"""


@audit_app.command()
def canary(
    config: Path = typer.Argument(..., help="experiment YAML (model, adapter, data, train, privacy, federation)"),
    set_: list[str] = typer.Option([], "--set", help="config override, e.g. train.lr=0.003"),
    dp: Optional[bool] = typer.Option(None, "--dp/--no-dp", help="DP-SGD on or off (default: privacy.enabled)"),
    user_level: Optional[bool] = typer.Option(None, "--user-level/--no-user-level",
                                              help="user-level DP-FedAvg on the server on or off "
                                                   "(default: privacy.user_level.enabled)"),
    inserted: int = typer.Option(8, "--inserted", help="canaries inserted into the canary client"),
    held_out: int = typer.Option(8, "--held-out", help="canaries of the same format never inserted"),
    repeats: int = typer.Option(4, "--repeats", help="copies of each inserted canary"),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="federated rounds (default: federation.rounds)"),
    candidates: int = typer.Option(2000, "--candidates", help="N: secrets each canary is ranked among"),
    digits: int = typer.Option(6, "--digits", help="random digits per secret"),
    client: int = typer.Option(0, "--client", help="index of the client that holds the canaries"),
    seed: Optional[int] = typer.Option(None, "--seed", help="audit seed (default: the config's seed)"),
    show_canaries: bool = typer.Option(False, "--show-canaries", help="also print every canary's rank"),
    out: Optional[Path] = typer.Option(None, "--out", help="write the full result as JSON here"),
) -> None:
    """Secret-sharer audit: insert canaries into one client, train federated, measure their exposure."""
    from fedtune.audit import CanaryAuditConfig, format_result, run_canary_audit

    logging.getLogger("torchao").setLevel(logging.ERROR)
    try:
        cfg = load_config(config, set_)
        audit = CanaryAuditConfig(n_digits=digits, n_inserted=inserted, n_held_out=held_out, repeats=repeats,
                                  canary_client=client, n_candidates=candidates, rounds=rounds, dp=dp, seed=seed,
                                  user_level=user_level)
    except (ConfigError, ValueError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    console.print(f"canary audit of {config}: DP {'on' if (cfg.privacy.enabled if dp is None else dp) else 'off'}, "
                  f"{audit.n_inserted} inserted x {audit.repeats} copies into client {audit.canary_client}, "
                  f"{audit.n_held_out} held out")
    try:
        result = run_canary_audit(cfg, audit)
    except ValueError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(1) from None
    console.print(format_result(result, per_canary=show_canaries), markup=False)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result.to_dict(), indent=1))
        console.print(f"wrote {out}")
