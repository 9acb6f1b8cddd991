"""The personalization benchmark: one table of base / global / global+FT / split / local-only, per privacy setting.

For each setting (DP off, DP on with the config's noise), on the same users and the same base model:
  1. a FedAvg federation (``split=none``) gives the global adapter;
  2. a FedSA-LoRA federation (``split=fedsa``) gives the shared A and each device's private B;
  3. every user is evaluated on their own held-out data: base, global, global+FT and local-only from run 1,
     split from run 2 (``fedtune.personalization.evaluate``).
Both federations run in this process (``federate``), so the recipe also runs where Ray does not (the GPU
machine); the run directories it writes are ordinary runs that ``fedtune evaluate`` reads.

    out/
      dp-off/fedavg/  dp-off/fedsa/  dp-off/eval/ (per_user.csv, summary.md, plots)
      dp-on/...
      benchmark.md, benchmark.json
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from fedtune.adapters import get_adapter_state
from fedtune.config import ExperimentConfig
from fedtune.personalization.evaluate import evaluate_users
from fedtune.federation.inprocess import run_inprocess as federate
from fedtune.personalization.run_eval import load_model, sources_for
from fedtune.personalization.summary import best_personalized, format_table, write_outputs
from fedtune.types import ClientData
from fedtune.workspace import RunDir

log = logging.getLogger(__name__)


def _with(cfg: ExperimentConfig, dp: bool, split: str) -> ExperimentConfig:
    return cfg.model_copy(update={
        "privacy": cfg.privacy.model_copy(update={"enabled": dp}),
        "personalization": cfg.personalization.model_copy(update={"split": split}),
    })


def run_setting(cfg: ExperimentConfig, clients: list[ClientData], out: Path, dp: bool, device: str,
                progress=None, pack: int = 1) -> dict:
    model = load_model(cfg, device)
    initial = get_adapter_state(model)  # loaded fresh by load_model's cache: the seeded init
    t0 = time.perf_counter()
    runs = {}
    for split in ("none", "fedsa"):
        run = RunDir.create(out / ("fedavg" if split == "none" else "fedsa"))
        records = federate(_with(cfg, dp, split), model, clients, run, initial=initial, pack=pack,
                           progress=(lambda r, u, upd, s=split: progress(f"{s} round {r}: {u} loss "
                                                                          f"{upd.train_loss:.3f}")) if progress else None)
        runs[split] = (run, records)
    fed_seconds = time.perf_counter() - t0
    avg_cfg, sa_cfg = _with(cfg, dp, "none"), _with(cfg, dp, "fedsa")
    src_avg = sources_for(runs["none"][0], avg_cfg, initial)
    src_sa = sources_for(runs["fedsa"][0], sa_cfg, initial)
    methods = [m for m in cfg.personalization.methods if m != "split"]
    t1 = time.perf_counter()
    user_progress = (lambda d, n, u: progress(f"evaluated {u} ({d}/{n})")) if progress else None
    results = evaluate_users(model, clients, src_avg, avg_cfg, methods, progress=user_progress, pack=pack)
    if "split" in cfg.personalization.methods:
        results += evaluate_users(model, clients, src_sa, sa_cfg, ["split"])
    summaries = write_outputs(results, out / "eval", title=f"{cfg.name}, DP {'on' if dp else 'off'}")
    best = best_personalized(summaries)
    by = {s.method: s for s in summaries}
    return {
        "dp": dp,
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
                  settings: tuple[bool, ...] = (False, True), progress=None, pack: int = 1) -> dict:
    """Both privacy settings; writes ``out/benchmark.md`` and ``out/benchmark.json`` and returns the latter.
    ``pack`` > 1 trains devices that many at a time on the packed engine (same results, faster on a GPU)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"name": cfg.name, "users": len(clients), "device": device, "pack": pack, "settings": []}
    for dp in settings:
        report["settings"].append(run_setting(cfg, clients, out / ("dp-on" if dp else "dp-off"), dp, device,
                                              progress, pack))
    (out / "benchmark.json").write_text(json.dumps(report, indent=1))
    (out / "benchmark.md").write_text(format_report(report))
    return report


def format_report(report: dict) -> str:
    lines = [f"# Personalization benchmark: {report['name']} ({report['users']} users, {report['device']})", ""]
    for s in report["settings"]:
        eps = max((m["max_epsilon"] or 0) for m in s["methods"]) if s["dp"] else None
        head = (f"## DP-SGD on (noise multiplier {s['noise_multiplier']}, δ={s['delta']}, max device ε {eps:.2f})"
                if s["dp"] else "## DP off")
        verdict = (f"best personalized method: **{s['best_personalized']}**, better than the global adapter for "
                   f"{100 * (s['best_beats_global_share'] or 0):.0f}% of users; beats local-only on mean "
                   f"perplexity: {'yes' if s['best_beats_local_only_mean'] else 'no'}")
        lines += [head, "", s["table"], "", verdict,
                  f"(federations {s['federation_seconds']} s, evaluation {s['evaluation_seconds']} s; global "
                  f"perplexity by round {[round(x, 2) for x in s['global_perplexity_by_round']]})", ""]
    return "\n".join(lines)
