"""The run's human-facing outputs: a Markdown report and plots, written from metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from fedtune.workspace import RunDir, read_jsonl

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


def tier_totals(records: list[dict]) -> dict[str, dict[str, int]]:
    """Per-tier sums over the rounds of a fleet run."""
    totals: dict[str, dict[str, int]] = {}
    for r in records:
        for tier, counts in (r.get("tiers") or {}).items():
            t = totals.setdefault(tier, {"sampled": 0, "succeeded": 0, "stragglers": 0, "dropouts": 0})
            for k in t:
                t[k] += counts.get(k, 0)
    return totals


def write_fleet_plots(run: RunDir, records: list[dict]) -> Path | None:
    totals = tier_totals(records)
    if not totals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiers = sorted(totals)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    bottom = [0] * len(tiers)
    for key, color in (("succeeded", "tab:green"), ("stragglers", "tab:orange"), ("dropouts", "tab:red")):
        vals = [totals[t][key] for t in tiers]
        axes[0].bar(tiers, vals, bottom=bottom, label=key, color=color)
        bottom = [b + v for b, v in zip(bottom, vals)]
    other = [totals[t]["sampled"] - b for t, b in zip(tiers, bottom)]
    axes[0].bar(tiers, other, bottom=bottom, label="over-selected, not needed", color="tab:gray")
    axes[0].set(ylabel="devices (all rounds)", title="Participation by tier")
    axes[0].tick_params(axis="x", rotation=20)
    axes[0].legend(fontsize=8)
    rounds = [r["round"] for r in records if r["round"] > 0]
    axes[1].bar(rounds, [r.get("sim_round_seconds", 0) / 60 for r in records if r["round"] > 0])
    axes[1].set(xlabel="round", ylabel="simulated minutes", title="Simulated round time")
    fig.tight_layout()
    out = run.root / "fleet.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def privacy_lines(records: list[dict]) -> list[str]:
    """What the run's last record says ran: the privacy label and the randomness of the seeds that ran
    (``simulated``: reproducible from ``seed``; ``secret``: OS randomness), never the config's plan."""
    if not records or "randomness" not in records[-1]:
        return []
    last = records[-1]
    level, eps = last.get("privacy_level", "none"), last.get("epsilon")
    label = level if eps is None else f"{level}-level, ε={eps:.3g}, δ={last.get('delta')}"
    return [f"- privacy: {label}; randomness: {last['randomness']}"]


def epsilon_warnings(cfg, records: list[dict]) -> list[str]:
    """One line per round whose reported device ε exceeds the per-device target (privacy.target_epsilon,
    else device_epsilon_budget); the CLI prints them and the report carries them."""
    from fedtune.privacy.device_budget import over_target

    p = cfg.privacy
    target = p.device_epsilon_budget or p.target_epsilon
    return [f"WARNING: round {r['round']}: a device reports epsilon {r['epsilon']:.2f}, above the per-device target "
            f"{target:g}" for r in records if p.enabled and over_target(r.get("epsilon"), target)]


def declined_users(events: list[dict], reason: str = "too_small") -> list[str]:
    """The users whose devices declined a round for ``reason`` (a simulation's ``client_declined`` events)."""
    return sorted({str(ev["user"]) for ev in events if ev.get("event") == "client_declined"
                   and ev.get("reason") == reason})


# what each decline reason means for a run's reader (report.md, `fedtune evaluate`'s summary)
DECLINE_NOTES = {
    "too_small": "Devices that sat out, too small to train within their DP budget ({n}; they keep the global "
                 "model): {users}.",
    "budget_spent": "Devices that stopped training once their own DP budget (privacy.device_epsilon_budget) was "
                    "spent ({n}; from then on they declined every round): {users}.",
}


def decline_notes(events: list[dict]) -> list[str]:
    """One line per decline reason of ``DECLINE_NOTES`` that occurred in the run, naming the users."""
    lines = []
    for reason, text in DECLINE_NOTES.items():
        users = declined_users(events, reason)
        if users:
            lines.append(text.format(n=len(users), users=", ".join(users)))
    return lines


def write_report(run: RunDir, cfg, records: list[dict], seconds: float) -> Path:
    lines = [
        f"# fedtune run: {cfg.name}",
        "",
        f"- model: {cfg.model.source}:{cfg.model.name} ({cfg.model.quantization}), adapter: {cfg.adapter.method}",
        f"- data: {cfg.data.source}, rounds: {cfg.federation.rounds}, clients/round: {cfg.federation.clients_per_round}",
        f"- DP-SGD: {'on' if cfg.privacy.enabled else 'off'}"
        + (f" (δ={cfg.privacy.delta}, clip={cfg.privacy.max_grad_norm}"
           + (f", each device's noise calibrated to ε ≤ {cfg.privacy.target_epsilon} from its own sampling rate"
              if cfg.privacy.target_epsilon else f", noise multiplier {cfg.privacy.noise_multiplier}") + ")"
           if cfg.privacy.enabled else ""),
        f"- wall time: {seconds:.0f} s",
        *privacy_lines(records),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in records:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in COLUMNS) + " |")
    events = read_jsonl(run.events)
    for ev in events:
        if ev.get("event") == "users_dropped":
            lines += ["", f"Users left out ({len(ev['users'])}; their text gives no full chunk of {ev['seq_len']} "
                          f"tokens): {', '.join(ev['users'])}."]
    for note in decline_notes(events):
        lines += ["", note]
    warnings = epsilon_warnings(cfg, records)
    if warnings:
        lines += [""] + [f"**{w}**" for w in warnings]
    totals = tier_totals(records)
    if totals:
        clock = records[-1].get("sim_clock_seconds", 0.0)
        lines += ["", f"Fleet: population {cfg.fleet.population}, simulated time {clock / 3600:.2f} h.", "",
                  "| tier | sampled | succeeded | stragglers | dropouts |", "|---|---|---|---|---|"]
        for tier in sorted(totals):
            t = totals[tier]
            lines.append(f"| {tier} | {t['sampled']} | {t['succeeded']} | {t['stragglers']} | {t['dropouts']} |")
        lines += ["", "![fleet](fleet.png)"]
    if records:
        first, last = records[0], records[-1]
        lines += ["", f"Held-out perplexity {first['eval_perplexity']:.3f} -> {last['eval_perplexity']:.3f}.",
                  "", "![perplexity](perplexity.png)"]
    path = run.root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
