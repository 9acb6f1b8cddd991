"""The personalization benchmark: one table of base / global / global+FT / split / local-only, per privacy setting.

For each setting (DP off, per-device DP-SGD on, user-level DP-FedAvg on the server at the same ε and δ:
``fedtune.personalization.settings``), on the same users and the same base model:
  1. a FedAvg federation (``split=none``) gives the global adapter;
  2. a FedSA-LoRA federation (``split=fedsa``) gives the shared A and each device's private B;
  3. every TEST user (``personalization.eval_users``: users are split once, by id hash, into tuning users,
     on which hyperparameters are chosen, and test users, on which results are reported;
     ``fedtune.personalization.users``) is evaluated on their own held-out data: base, global, global+FT, the
     device's own selected model (personalized) and local-only from run 1, split from run 2
     (``fedtune.personalization.evaluate``); with ``personalization.tune_finetune_lrs`` / ``tune_finetune_grids``
     the personal learning rate and step grid are first chosen on the TUNING users only
     (``fedtune.personalization.tuning``; ``tuning.json``, and every tuning user's rows in ``tuning_users.csv``)
     and the test users evaluated with that choice.
Every device's DP-SGD noise is calibrated to ``privacy.target_epsilon`` from its own sampling rate; a device
too small to train within it sits out and is named; any ε above the target is flagged in the report.
Under user-level DP-FedAvg (``user``) no device runs DP-SGD: the server clips and noises, its ledger's ε
labels the setting, and the personal steps, which never leave the device, run without DP-SGD
(``fedtune.personalization.settings``); ``benchmark.md`` then compares it with per-device DP-SGD.
Both federations run in this process (``federate``), so the recipe also runs where Ray does not (the GPU
machine); the run directories it writes are ordinary runs that ``fedtune evaluate`` reads.

    out/
      dp-off/fedavg/  dp-off/fedsa/  dp-off/eval/ (per_user.csv, summary.md, plots)
      dp-on/...  dp-user/...
      benchmark.md, benchmark.json (with the DP-SGD vs user-level comparison when both ran)
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from fedtune.config import ExperimentConfig
from fedtune.personalization.evaluate import evaluate_users
from fedtune.federation.inprocess import run_inprocess as federate
from fedtune.personalization.tuning import tune_selection, with_personalization
from fedtune.personalization.users import select_users
from fedtune.privacy.device_budget import budget_warning, over_target, sit_out_reason
from fedtune.adapters.cached import seeded_initial
from fedtune.personalization.run_eval import load_model, sources_for
from fedtune.personalization.settings import (
    DIRS, FROM_GLOBAL, comparison, comparison_line, setting_name, user_level_config, user_level_refusal,
)
from fedtune.personalization.summary import best_personalized, format_table, write_outputs, write_rows
from fedtune.types import ClientData
from fedtune.workspace import RunDir

log = logging.getLogger(__name__)


def _with(cfg: ExperimentConfig, dp: bool, split: str) -> ExperimentConfig:
    return cfg.model_copy(update={
        "privacy": cfg.privacy.model_copy(update={"enabled": dp}),
        "personalization": cfg.personalization.model_copy(update={"split": split}),
    })


def sit_outs(cfg: ExperimentConfig, clients: list[ClientData]) -> dict[str, str]:
    """{user: why} for the devices too small to train within their per-device DP budget
    (``fedtune.privacy.device_budget``): they sit out of the federation and keep the global model."""
    p = cfg.privacy
    if not p.enabled:
        return {}
    planned = cfg.federation.rounds * cfg.train.local_steps
    out = {}
    for c in clients:
        why = sit_out_reason(c.num_train, cfg.train.batch_size, planned, p.target_epsilon, p.delta, p.accountant,
                             p.max_noise_to_batch)
        if why:
            log.warning("device %s sits out: %s", c.user_id, why)
            out[c.user_id] = why
    return out


def run_setting(cfg: ExperimentConfig, clients: list[ClientData], out: Path, dp: bool | str, device: str,
                progress=None, pack: int = 1, initial=None) -> dict:
    """One privacy setting (``dp``: off / on / user, or a bool for off / on). ``initial``: the seeded starting
    adapter (the cached model keeps whatever the previous setting left on it, so ``run_benchmark`` takes it
    once, before any training). A user-level configuration ``plan_user_level`` refuses is returned as
    ``refused`` (its reason), not run."""
    name = setting_name(dp)
    dp = name == "on"
    if name == "user":
        cfg = user_level_config(cfg)
        why = user_level_refusal(cfg, len(clients))
        if why is not None:
            log.warning("user-level setting not run: %s", why)
            if progress:
                progress(f"user-level setting not run: {why}")
            return {"setting": name, "dp": False, "refused": why}
    model = load_model(cfg, device)
    initial = initial if initial is not None else seeded_initial(model)
    t0 = time.perf_counter()
    sat_out = sit_outs(_with(cfg, dp, "none"), clients)
    trainable = [c for c in clients if c.user_id not in sat_out]
    runs = {}
    for split in ("none", "fedsa") if "split" in cfg.personalization.methods else ("none",):
        run = RunDir.create(out / ("fedavg" if split == "none" else "fedsa"))
        records = federate(_with(cfg, dp, split), model, trainable, run, initial=initial, pack=pack,
                           progress=(lambda r, u, upd, s=split: progress(f"{s} round {r}: {u} loss "
                                                                          f"{upd.train_loss:.3f}")) if progress else None)
        runs[split] = (run, records)
    fed_seconds = time.perf_counter() - t0
    avg_cfg, sa_cfg = _with(cfg, dp, "none"), _with(cfg, dp, "fedsa")
    src_avg = sources_for(runs["none"][0], avg_cfg, initial)
    src_sa = sources_for(runs["fedsa"][0], sa_cfg, initial) if "fedsa" in runs else None
    methods = [m for m in cfg.personalization.methods if m != "split"]
    per = cfg.personalization
    t1 = time.perf_counter()
    tuned = None
    if per.tune_finetune_lrs or per.tune_finetune_grids or per.tune_min_gain_zs:  # chosen on tuning users only
        tuning_ids = set(select_users([c.user_id for c in clients], "tuning", per.tuning_fraction))
        tuned = tune_selection(model, [c for c in clients if c.user_id in tuning_ids], src_avg, avg_cfg, pack,
                               progress)
        avg_cfg, sa_cfg = with_personalization(avg_cfg, tuned.chosen), with_personalization(sa_cfg, tuned.chosen)
        (out / "tuning.json").write_text(json.dumps({"chosen": tuned.chosen, "tried": tuned.rows}, indent=1))
        write_rows(out / "tuning_users.csv", tuned.per_user)
    wanted = set(select_users([c.user_id for c in clients], per.eval_users, per.tuning_fraction, per.eval_max_users))
    evaluated = [c for c in clients if c.user_id in wanted]
    user_progress = (lambda d, n, u: progress(f"evaluated {u} ({d}/{n})")) if progress else None
    results = evaluate_users(model, evaluated, src_avg, avg_cfg, methods, progress=user_progress, pack=pack)
    if "split" in cfg.personalization.methods:
        results += evaluate_users(model, evaluated, src_sa, sa_cfg, ["split"])
    target = (cfg.privacy.device_epsilon_budget or cfg.privacy.target_epsilon) if dp else None
    last = runs["none"][1][-1]
    if name == "user":  # the table's ε: the server ledger's user-level ε, as the federation recorded it
        target = cfg.privacy.user_level.target_epsilon
        eps_of = {"none": last.get("epsilon"),
                  "fedsa": runs["fedsa"][1][-1].get("epsilon") if "fedsa" in runs else None}
        results = [replace(r, epsilon=eps_of["fedsa" if r.method == "split" else "none"]
                           if r.method in FROM_GLOBAL else None) for r in results]
    warnings = [budget_warning(f"{r.user} ({r.method})", r.epsilon, target) for r in results
                if over_target(r.epsilon, target)]
    for w in warnings:
        log.warning(w)
        if progress:
            progress(w)
    (out / "sat_out.json").write_text(json.dumps(sat_out, indent=1))
    title = {"off": "DP off", "on": "DP on", "user": "user-level DP-FedAvg (ε: the server's user-level ledger)"}
    summaries = write_outputs(results, out / "eval", title=f"{cfg.name}, {title[name]}")
    best = best_personalized(summaries)
    by = {s.method: s for s in summaries}
    pers = by.get("personalized")
    eps_all = [s.max_epsilon for s in summaries if s.max_epsilon is not None]
    # the final global adapter's guarantee as the mechanisms that ran labelled it (fedtune.json)
    guarantee = json.loads((runs["none"][0].adapter(last["round"]) / "fedtune.json").read_text())["privacy"]
    return {
        "setting": name,
        "dp": dp,
        # what the federation's records say ran (never the config): "user" under server-side DP-FedAvg
        "privacy_level": last.get("privacy_level"),
        "federation_epsilon": last.get("epsilon"),
        "federation_delta": last.get("delta"),
        "max_epsilon": max(eps_all) if eps_all else None,
        "mechanism": guarantee.get("mechanism"),
        "server_noise_multiplier": guarantee.get("noise_multiplier") if guarantee.get("level") == "user" else None,
        "server_clip_norm": guarantee.get("clip_norm") if guarantee.get("level") == "user" else None,
        "target_epsilon": target,
        "epsilon_warnings": warnings,
        "sat_out": sat_out,
        "users_evaluated": [c.user_id for c in evaluated],
        "user_split": per.eval_users,
        "tuning": None if tuned is None else {"chosen": tuned.chosen, "tried": tuned.rows},
        "min_gain_z": avg_cfg.personalization.min_gain_z,
        # users whose best candidate's validation gain was below min_gain_z: they keep the global adapter
        "held_at_global": sorted(r.user for r in results if r.method == "personalized" and r.choice == "global"
                                 and (r.gain_z or 0) > 0),
        "personalized_targets": None if pers is None else {
            "at_least_as_good_as_global": pers.not_worse_than_global,
            "better_than_global": pers.improved_over_global,
            "median_change_vs_global": pers.median_change_vs_global,
            "better_than_local_only": pers.improved_over_local,
            "met": bool(pers.not_worse_than_global is not None and pers.not_worse_than_global >= 0.95
                        and (pers.improved_over_global or 0) >= 0.90 and (pers.median_change_vs_global or 0) <= -0.03
                        and (pers.improved_over_local is None or pers.improved_over_local >= 0.90)),
        },
        "noise_multiplier": cfg.privacy.noise_multiplier if dp else None,
        "delta": cfg.privacy.delta if dp else None,
        "methods": [s.row() for s in summaries],
        "best_personalized": best.method if best else None,
        "best_beats_global_share": best.improved_over_global if best else None,
        "best_beats_local_only_mean": (best.mean_perplexity < by["local_only"].mean_perplexity
                                       if best and "local_only" in by else None),
        "federation_seconds": round(fed_seconds, 1),
        "evaluation_seconds": round(time.perf_counter() - t1, 1),
        "global_perplexity_by_round": [r["eval_perplexity"] for r in runs["none"][1]],
        "table": format_table(summaries),
    }


def run_benchmark(cfg: ExperimentConfig, clients: list[ClientData], out: str | Path, device: str = "cpu",
                  settings: tuple[bool | str, ...] = ("off", "on"), progress=None, pack: int = 1,
                  workers: int | None = None) -> dict:
    """The privacy settings (off / on / user; bools mean off / on); writes ``out/benchmark.md`` and
    ``out/benchmark.json`` and returns the latter, with ``comparison`` (per-device DP-SGD vs user-level
    DP-FedAvg) when both ran. ``pack`` > 1 trains devices that many at a time on the packed engine (same
    results, faster on a GPU). ``workers``: settings side by side, one worker process each
    (``fedtune.personalization.parallel``; default: one per visible GPU on cuda, one after another on the CPU;
    1: one after another); every setting starts from the same seeded adapter either way."""
    from fedtune.personalization.parallel import plan_slots, run_parallel

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    slots = plan_slots(device, workers, len(settings))
    report = {"name": cfg.name, "users": len(clients), "device": device, "pack": pack, "settings": [],
              "workers": [s.label for s in slots] or [device]}
    initial = seeded_initial(load_model(cfg, device))  # the seeded init, whatever the cached model went through
    if slots:
        report["settings"] = run_parallel(cfg, clients, out, tuple(settings), slots, pack, initial, progress)
    for dp in settings if not slots else ():
        report["settings"].append(run_setting(cfg, clients, out / DIRS[setting_name(dp)], dp, device,
                                              progress, pack, initial))
    report["comparison"] = comparison(report["settings"])
    (out / "benchmark.json").write_text(json.dumps(report, indent=1))
    (out / "benchmark.md").write_text(format_report(report))
    return report


def format_report(report: dict) -> str:
    where = report["device"] if len(report.get("workers", [])) < 2 else (
        f"{report['device']}, settings side by side on {', '.join(report['workers'])}")
    lines = [f"# Personalization benchmark: {report['name']} ({report['users']} users, {where})", ""]
    for s in report["settings"]:
        if s.get("refused"):
            lines += ["## User-level DP-FedAvg on the server: not run", "",
                      f"**the user-level setting was not run: {s['refused']}**", ""]
            continue
        eps = max((m["max_epsilon"] or 0) for m in s["methods"]) if s["dp"] else None
        sigma = (f"per-device noise calibrated to a device budget of ε ≤ {s['target_epsilon']}"
                 if s.get("target_epsilon")
                 else f"noise multiplier {s['noise_multiplier']}")
        head = (f"## DP-SGD on ({sigma}, δ={s['delta']}, max device ε {eps:.2f})" if s["dp"] else "## DP off")
        if s.get("privacy_level") == "user":  # the label comes from the federation's records
            noise = (f", noise multiplier {s['server_noise_multiplier']:.3g}, clip {s['server_clip_norm']:.3g}"
                     if s.get("server_noise_multiplier") is not None else "")
            head = (f"## User-level DP-FedAvg on the server (ε {s['federation_epsilon']:.2f}, "
                    f"δ={s['federation_delta']:.3g}{noise}){'' if s['dp'] else '; no DP-SGD on devices'}")
        verdict = (f"best personalized method: **{s['best_personalized']}**, better than the global adapter for "
                   f"{100 * (s['best_beats_global_share'] or 0):.0f}% of users; beats local-only on mean "
                   f"perplexity: {'yes' if s['best_beats_local_only_mean'] else 'no'}")
        t = s.get("personalized_targets")
        targets = [] if not t else [
            "personalized vs targets: at least as good as global for "
            f"{100 * (t['at_least_as_good_as_global'] or 0):.0f}% "
            f"(target 95%), strictly better for {100 * (t['better_than_global'] or 0):.0f}% (90%), median perplexity "
            f"change {100 * (t['median_change_vs_global'] or 0):+.1f}% (≤ -3%), better than local-only for "
            f"{100 * (t['better_than_local_only'] or 0):.0f}% (90%): **{'met' if t['met'] else 'not met'}**"]
        extra = [f"users evaluated: {len(s.get('users_evaluated', []))} ({s.get('user_split', 'all')} users)"]
        if s.get("tuning"):
            tried = "; ".join(f"lr {r['finetune_lr']}, grid {r['finetune_grid']}"
                              + (f", z {r['min_gain_z']:g}" if r.get("min_gain_z") is not None else "") + ": "
                              + ("n/a" if r["median_change_vs_global"] is None
                                 else f"{100 * r['median_change_vs_global']:+.2f}%") for r in s["tuning"]["tried"])
            extra.append(f"chosen on {s['tuning']['tried'][0]['users']} tuning users (not in the table): "
                         f"{s['tuning']['chosen']} (median change vs global per combination: {tried})")
        if s.get("min_gain_z") is not None and "held_at_global" in s:
            extra.append(f"users kept on the global adapter because their best candidate's validation gain was "
                         f"below min_gain_z={s['min_gain_z']:g} standard errors: {len(s['held_at_global'])}")
        if s.get("sat_out"):
            extra.append(f"devices that sat out (too small for the budget): {len(s['sat_out'])}: "
                         + ", ".join(sorted(s["sat_out"])))
        extra += [f"**{w}**" for w in s.get("epsilon_warnings", [])]
        lines += [head, "", s["table"], "", verdict, *targets, *extra,
                  f"(federations {s['federation_seconds']} s, evaluation {s['evaluation_seconds']} s"
                  f"{' on ' + s['device'] if s.get('device') else ''}; global "
                  f"perplexity by round {[round(x, 2) for x in s['global_perplexity_by_round']]})", ""]
    line = comparison_line(report.get("comparison"))
    if line:
        lines += [line, ""]
    return "\n".join(lines)
