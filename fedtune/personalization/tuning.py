"""Selection hyperparameters chosen on TUNING users only, so the reported margin is not tuned on its own users.

The benchmark (``fedtune.personalization.benchmark``) calls ``tune_selection`` after the federation when
``personalization.tune_finetune_lrs`` or ``tune_finetune_grids`` is set:
  1. every combination (personal learning rate x step grid; an unset list keeps the config's value) runs
     the per-user selection (``fedtune.personalization.select``) on each tuning user, as a device would;
  2. each is scored by the median per-user perplexity change of the selected model against the global
     adapter on the tuning users' own held-out chunks (lower is better; ties go to the earlier combination);
  3. the best combination is what the test users (``personalization.eval_users: test``, the only users the
     table reports) are evaluated with. The tuning users' split is fixed by id hash
     (``fedtune.personalization.users``), so the same users tune in every run.
Every tuning run continues a *copy* of each device's ledger and writes no device state.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from fedtune.config import ExperimentConfig
from fedtune.types import ClientData


@dataclass(frozen=True)
class Tuned:
    chosen: dict  # the personalization fields picked: finetune_lr, finetune_grid
    rows: list[dict]  # every combination tried: its fields, median change vs global, share better, users


def combinations(cfg: ExperimentConfig) -> list[dict]:
    per = cfg.personalization
    lrs = per.tune_finetune_lrs or [per.finetune_lr]
    grids = per.tune_finetune_grids or [per.finetune_grid]
    return [{"finetune_lr": lr, "finetune_grid": sorted(set(g))} for lr in lrs for g in grids]


def with_personalization(cfg: ExperimentConfig, fields: dict) -> ExperimentConfig:
    return cfg.model_copy(update={"personalization": cfg.personalization.model_copy(update=fields)})


def tune_selection(model, tuning: list[ClientData], src, cfg: ExperimentConfig, pack: int = 1,
                   progress=None) -> Tuned:
    """Steps 1-2 of the module docstring; raises ValueError without tuning users."""
    from fedtune.personalization.evaluate import evaluate_users
    from fedtune.personalization.summary import summarize

    if not tuning:
        raise ValueError("no tuning users to choose hyperparameters on: raise personalization.tuning_fraction "
                         "(users are split by id hash; docs/personalization.md) or unset the tune_* lists")
    src = dataclasses.replace(src, choices=None)  # tuning writes no device's selection state
    rows = []
    for fields in combinations(cfg):
        results = evaluate_users(model, tuning, src, with_personalization(cfg, fields), ["global", "personalized"],
                                 pack=pack)
        pers = {s.method: s for s in summarize(results)}.get("personalized")
        change = pers.median_change_vs_global if pers is not None else None
        rows.append({**fields, "median_change_vs_global": change,
                     "better_than_global": pers.improved_over_global if pers is not None else None,
                     "users": len(tuning)})
        if progress is not None:
            progress(f"tuning on {len(tuning)} tuning users: {fields} -> median change vs global "
                     f"{'n/a' if change is None else f'{100 * change:+.2f}%'}")
    best = min(rows, key=lambda r: math.inf if r["median_change_vs_global"] is None else r["median_change_vs_global"])
    return Tuned({k: best[k] for k in ("finetune_lr", "finetune_grid")}, rows)
