"""The run's human-facing outputs: a Markdown report and plots, written from metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from fedtune.workspace import RunDir

COLUMNS = ("round", "clients_succeeded", "train_loss", "eval_loss", "eval_perplexity", "epsilon",
           "upload_bytes", "wall_seconds")


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_plots(run: RunDir, records: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in records]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].plot(rounds, [r["eval_perplexity"] for r in records], marker="o")
    axes[0].set(xlabel="round", ylabel="held-out perplexity", title="Global adapter")
    eps = [r.get("epsilon") for r in records]
    if any(e is not None for e in eps):
        axes[1].plot(rounds, [e or 0.0 for e in eps], marker="o", color="tab:red")
        axes[1].set(xlabel="round", ylabel="max client ε (sample-level)", title="Privacy spent")
    else:
        axes[1].axis("off")
    fig.tight_layout()
    out = run.root / "perplexity.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return [out]


def write_report(run: RunDir, cfg, records: list[dict], seconds: float) -> Path:
    lines = [
        f"# fedtune run: {cfg.name}",
        "",
        f"- model: {cfg.model.source}:{cfg.model.name} ({cfg.model.quantization}), adapter: {cfg.adapter.method}",
        f"- data: {cfg.data.source}, rounds: {cfg.federation.rounds}, clients/round: {cfg.federation.clients_per_round}",
        f"- DP-SGD: {'on' if cfg.privacy.enabled else 'off'}"
        + (f" (δ={cfg.privacy.delta}, clip={cfg.privacy.max_grad_norm})" if cfg.privacy.enabled else ""),
        f"- wall time: {seconds:.0f} s",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in records:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in COLUMNS) + " |")
    if records:
        first, last = records[0], records[-1]
        lines += ["", f"Held-out perplexity {first['eval_perplexity']:.3f} -> {last['eval_perplexity']:.3f}.",
                  "", "![perplexity](perplexity.png)"]
    path = run.root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
