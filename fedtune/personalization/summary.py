"""Summaries, CSV and plots of a per-user evaluation.

Per method: mean and median held-out perplexity over users, the mean of the worst 10% of users, mean
next-token accuracy, and the share of users whose perplexity is lower than under the global adapter
and than under local-only training (a user counts as improved only if strictly better).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from fedtune.personalization.evaluate import METHODS, UserResult

PERSONALIZED = ("personalized", "finetune", "split")


@dataclass(frozen=True)
class MethodSummary:
    method: str
    users: int
    mean_perplexity: float
    median_perplexity: float
    worst10_perplexity: float  # mean over the worst ceil(10%) of users
    mean_accuracy: float
    improved_over_global: float | None  # share of users, None if there is no global result
    improved_over_local: float | None
    max_epsilon: float | None
    not_worse_than_global: float | None = None  # share of users with perplexity <= global's
    median_change_vs_global: float | None = None  # median over users of ppl / global ppl - 1 (negative: better)

    def row(self) -> dict:
        return dict(self.__dict__)


def _by(results: list[UserResult]) -> dict[str, dict[str, UserResult]]:
    out: dict[str, dict[str, UserResult]] = {}
    for r in results:
        out.setdefault(r.method, {})[r.user] = r
    return out


def _share_better(mine: dict[str, UserResult], other: dict[str, UserResult] | None) -> float | None:
    if not other:
        return None
    users = [u for u in mine if u in other]
    return sum(mine[u].perplexity < other[u].perplexity for u in users) / len(users) if users else None


def _share_not_worse(mine: dict[str, UserResult], other: dict[str, UserResult] | None) -> float | None:
    users = [u for u in mine if other and u in other]
    return sum(mine[u].perplexity <= other[u].perplexity for u in users) / len(users) if users else None


def _median_change(mine: dict[str, UserResult], other: dict[str, UserResult] | None) -> float | None:
    users = [u for u in mine if other and u in other]
    return statistics.median(mine[u].perplexity / other[u].perplexity - 1 for u in users) if users else None


def summarize(results: list[UserResult]) -> list[MethodSummary]:
    by = _by(results)
    out = []
    for method in [m for m in METHODS if m in by]:
        rows = by[method]
        ppl = sorted(r.perplexity for r in rows.values())
        worst = ppl[-max(1, math.ceil(0.1 * len(ppl))):]
        eps = [r.epsilon for r in rows.values() if r.epsilon is not None]
        out.append(MethodSummary(
            method=method, users=len(rows), mean_perplexity=statistics.fmean(ppl),
            median_perplexity=statistics.median(ppl), worst10_perplexity=statistics.fmean(worst),
            mean_accuracy=statistics.fmean(r.accuracy for r in rows.values()),
            improved_over_global=_share_better(rows, by.get("global")) if method != "global" else None,
            improved_over_local=_share_better(rows, by.get("local_only")) if method != "local_only" else None,
            max_epsilon=max(eps) if eps else None,
            not_worse_than_global=_share_not_worse(rows, by.get("global")) if method != "global" else None,
            median_change_vs_global=_median_change(rows, by.get("global")) if method != "global" else None,
        ))
    return out


def best_personalized(summaries: list[MethodSummary]) -> MethodSummary | None:
    """The personalized method (personalized, finetune or split) with the lowest mean perplexity."""
    cands = [s for s in summaries if s.method in PERSONALIZED]
    return min(cands, key=lambda s: s.mean_perplexity) if cands else None


def _fmt(x, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.0f}%" if pct else f"{x:.3f}" if abs(x) < 10 else f"{x:.2f}"


def format_table(summaries: list[MethodSummary]) -> str:
    head = ("| method | users | mean ppl | median ppl | worst 10% ppl | mean acc | better than global "
            "| at least as good as global | median change vs global | better than local-only | max ε |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for s in summaries:
        change = "-" if s.median_change_vs_global is None else f"{100 * s.median_change_vs_global:+.1f}%"
        lines.append(f"| {s.method} | {s.users} | {_fmt(s.mean_perplexity)} | {_fmt(s.median_perplexity)} | "
                     f"{_fmt(s.worst10_perplexity)} | {_fmt(s.mean_accuracy)} | {_fmt(s.improved_over_global, True)} "
                     f"| {_fmt(s.not_worse_than_global, True)} | {change} "
                     f"| {_fmt(s.improved_over_local, True)} | {_fmt(s.max_epsilon)} |")
    return "\n".join(lines)


def write_rows(path: Path, rows: list[dict], fields: list[str] | None = None) -> None:
    """``rows`` as a CSV file (columns: ``fields``, else the first row's keys)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields or (list(rows[0]) if rows else []))
        w.writeheader()
        w.writerows(rows)


def write_outputs(results: list[UserResult], out_dir: Path, title: str = "",
                  notes: list[str] | None = None) -> list[MethodSummary]:
    """eval/per_user.csv, summary.json, summary.md (``notes``: lines under the table) and the plots."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_rows(out_dir / "per_user.csv", [r.row() for r in results], list(UserResult.__dataclass_fields__))
    summaries = summarize(results)
    best = best_personalized(summaries)
    (out_dir / "summary.json").write_text(json.dumps(
        {"methods": [s.row() for s in summaries], "best_personalized": best.method if best else None}, indent=1))
    (out_dir / "summary.md").write_text(f"# Per-user evaluation{': ' + title if title else ''}\n\n"
                                        f"{format_table(summaries)}\n"
                                        + "".join(f"\n{n}\n" for n in notes or []))
    write_plots(results, out_dir, best.method if best else None)
    return summaries


def write_plots(results: list[UserResult], out_dir: Path, best: str | None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = _by(results)
    methods = [m for m in METHODS if m in by]
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.boxplot([[r.perplexity for r in by[m].values()] for m in methods], tick_labels=methods, showmeans=True)
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity per user (log)")
    ax.set_title("per-user perplexity by method")
    fig.tight_layout()
    fig.savefig(out_dir / "per_user_distribution.png", dpi=110)
    paths.append(out_dir / "per_user_distribution.png")
    plt.close(fig)
    if best and "global" in by:
        users = sorted(u for u in by[best] if u in by["global"])
        g = [by["global"][u].perplexity for u in users]
        p = [by[best][u].perplexity for u in users]
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(g, p, s=14)
        lo, hi = min(g + p), max(g + p)
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="no change")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("global adapter perplexity (before)")
        ax.set_ylabel(f"{best} perplexity (after)")
        ax.set_title(f"per user: global -> {best} ({sum(b < a for a, b in zip(g, p))}/{len(users)} improved)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "per_user_before_after.png", dpi=110)
        paths.append(out_dir / "per_user_before_after.png")
        plt.close(fig)
    return paths
