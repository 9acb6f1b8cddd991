"""Selection hyperparameters chosen on TUNING users only, so the reported margin is not tuned on its own users.

The benchmark (``fedtune.personalization.benchmark``) calls ``tune_selection`` after the federation when
``personalization.tune_finetune_lrs`` or ``tune_finetune_grids`` is set:
  1. every combination (personal learning rate x step grid; an unset list keeps the config's value) runs
     the per-user selection (``fedtune.personalization.select``) on each tuning user, as a device would;
  2. each is scored by the median per-user perplexity change of the selected model against the global
     adapter on the tuning users' own held-out chunks (lower is better; ties go to the earlier combination);
     with ``tune_min_gain_zs`` each combination is also scored at every gain threshold ``min_gain_z``: the
     selection runs once at 0 and a user whose best candidate's gain (``UserResult.gain_z``) is below the
     threshold gets the global adapter's result, exactly what a device with that threshold keeps. The pick is
     the lowest median change among the (combination, threshold) pairs that keep at least
     ``AT_LEAST_AS_GOOD`` of the tuning users at least as good as global (failing that, the pair with the
     highest such share). Equal medians are common: a threshold moves only users whose gain is small, rarely
     the median user. Among them the pick keeps the most tuning users at least as good, then the most
     strictly better, then takes the higher threshold: tuning users that cannot tell two thresholds apart
     are no evidence for personalizing on the smaller gain (the cautious pick, as the one-standard-error rule
     takes the simplest model within noise of the best);
  3. the best combination is what the test users (``personalization.eval_users: test``, the only users the
     table reports) are evaluated with. The tuning users' split is fixed by id hash
     (``fedtune.personalization.users``), so the same users tune in every run.
Every tuning run continues a *copy* of each device's ledger and writes no device state.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, replace

from fedtune.config import ExperimentConfig
from fedtune.personalization.evaluate import UserResult
from fedtune.types import ClientData

AT_LEAST_AS_GOOD = 0.95  # the share of users the personalized model must not make worse than global


@dataclass(frozen=True)
class Tuned:
    chosen: dict  # the personalization fields picked: finetune_lr, finetune_grid (and min_gain_z)
    rows: list[dict]  # every combination tried: its fields, median change vs global, share better, users
    # every tuning user's global and personalized rows under each combination (thresholds at 0): the per-user
    # evidence behind ``rows``, so other thresholds can be studied on tuning users without a re-run
    per_user: list[dict] = dataclasses.field(default_factory=list)


def combinations(cfg: ExperimentConfig) -> list[dict]:
    per = cfg.personalization
    lrs = per.tune_finetune_lrs or [per.finetune_lr]
    grids = per.tune_finetune_grids or [per.finetune_grid]
    return [{"finetune_lr": lr, "finetune_grid": sorted(set(g))} for lr in lrs for g in grids]


def at_threshold(results: list[UserResult], z: float) -> list[UserResult]:
    """``results`` of a selection run at ``min_gain_z`` 0 as a run at ``z`` would have them: a personalized row
    whose best candidate's gain is below ``z`` standard errors becomes its user's global row (the device keeps
    the global adapter), with the steps and ε its search spent."""
    glob = {r.user: r for r in results if r.method == "global"}
    out = []
    for r in results:
        g = glob.get(r.user)
        if r.method == "personalized" and g is not None and (r.gain_z or 0.0) < z:
            r = replace(g, method=r.method, train_steps=r.train_steps, epsilon=r.epsilon, choice="global",
                        gain_z=r.gain_z, gain_chunk_z=r.gain_chunk_z)
        out.append(r)
    return out


def _score(results: list[UserResult], fields: dict, users: int) -> dict:
    from fedtune.personalization.summary import summarize

    pers = {s.method: s for s in summarize(results)}.get("personalized")
    return {**fields, "median_change_vs_global": pers.median_change_vs_global if pers is not None else None,
            "better_than_global": pers.improved_over_global if pers is not None else None,
            "at_least_as_good": pers.not_worse_than_global if pers is not None else None, "users": users}


def _best(rows: list[dict], thresholds: bool) -> dict:
    def median(r):
        return math.inf if r["median_change_vs_global"] is None else r["median_change_vs_global"]

    if not thresholds:
        return min(rows, key=median)
    def share(r, key):
        return r.get(key) or 0.0

    def ranked(r):  # the median, then among equal medians the more users kept safe, then the cautious threshold
        return median(r), -share(r, "at_least_as_good"), -share(r, "better_than_global"), -r["min_gain_z"]

    safe = [r for r in rows if share(r, "at_least_as_good") >= AT_LEAST_AS_GOOD]
    return min(safe, key=ranked) if safe else min(rows, key=lambda r: (-share(r, "at_least_as_good"), ranked(r)))


def with_personalization(cfg: ExperimentConfig, fields: dict) -> ExperimentConfig:
    return cfg.model_copy(update={"personalization": cfg.personalization.model_copy(update=fields)})


def tune_selection(model, tuning: list[ClientData], src, cfg: ExperimentConfig, pack: int = 1,
                   progress=None) -> Tuned:
    """Steps 1-2 of the module docstring; raises ValueError without tuning users."""
    from fedtune.personalization.evaluate import evaluate_users

    if not tuning:
        raise ValueError("no tuning users to choose hyperparameters on: raise personalization.tuning_fraction "
                         "(users are split by id hash; docs/personalization.md) or unset the tune_* lists")
    src = dataclasses.replace(src, choices=None)  # tuning writes no device's selection state
    zs = sorted(set(cfg.personalization.tune_min_gain_zs))
    rows, per_user = [], []
    for fields in combinations(cfg):
        run = with_personalization(cfg, {**fields, "min_gain_z": 0.0} if zs else fields)
        results = evaluate_users(model, tuning, src, run, ["global", "personalized"], pack=pack)
        per_user += [{"finetune_lr": fields["finetune_lr"], "finetune_grid": " ".join(map(str, fields["finetune_grid"])),
                      **r.row()} for r in results]
        for z in zs or [None]:
            row = _score(results if z is None else at_threshold(results, z),
                         fields if z is None else {**fields, "min_gain_z": z}, len(tuning))
            rows.append(row)
            if progress is not None:
                change, share = row["median_change_vs_global"], row["at_least_as_good"]
                progress(f"tuning on {len(tuning)} tuning users: {fields}{'' if z is None else f', min_gain_z {z:g}'}"
                         f" -> median change vs global "
                         f"{'n/a' if change is None else f'{100 * change:+.2f}%'}, at least as good "
                         f"{'n/a' if share is None else f'{100 * share:.0f}%'}")
    best = _best(rows, bool(zs))
    keys = ("finetune_lr", "finetune_grid") + (("min_gain_z",) if zs else ())
    return Tuned({k: best[k] for k in keys}, rows, per_user)
