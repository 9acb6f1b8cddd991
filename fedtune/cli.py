"""fedtune's command line: one CLI over plain library functions. Only this module prints for people."""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from fedtune.cli_errors import new_app
from fedtune.cli_inprocess import print_round
from fedtune.config import dump_config, load_config, with_absolute_paths
from fedtune.errors import UserError

app = new_app(help="fedtune: federated DP fine-tuning of quantized language models through Flower.")
console = Console(highlight=False, width=None if os.isatty(1) else 120, soft_wrap=not os.isatty(1))
logging.getLogger("torchao").setLevel(logging.ERROR)

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0",
               "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)


def _load_or_exit(config: Path, overrides: list[str]):
    return load_config(config, overrides)  # a ConfigError reaches the top-level handler: exit 2


@app.command()
def validate(config: Path = typer.Argument(..., help="experiment YAML"),
             set_: list[str] = typer.Option([], "--set", help="override, e.g. federation.rounds=5")) -> None:
    """Check a config and report every error at once."""
    cfg = _load_or_exit(config, set_)
    console.print(f"{config}: OK ({cfg.model.source}:{cfg.model.name}, {cfg.model.quantization}, "
                  f"{cfg.adapter.method}, {cfg.data.source}, {cfg.federation.rounds} rounds)")


class _Progress:
    """Follows events.jsonl / metrics.jsonl that the ServerApp and ClientApps write."""

    def __init__(self, run, rounds: int):
        from fedtune.workspace import read_jsonl

        self.read, self.run, self.rounds = read_jsonl, run, rounds
        self.n_events = len(read_jsonl(run.events))  # a resumed run: only what happens from now on
        self.started = time.monotonic()
        self.round_clients: dict[int, int] = {}
        self.done: dict[int, int] = {}

    def __call__(self) -> None:
        events = self.read(self.run.events)
        metrics = {m["round"]: m for m in self.read(self.run.metrics)}
        for ev in events[self.n_events:]:
            t = f"[{time.monotonic() - self.started:6.0f}s]"
            kind = ev["event"]
            if kind == "waiting_for_nodes":
                console.print(f"{t} waiting for {ev['expected']} devices to join")
            elif kind == "round_start":
                self.round_clients[ev["round"]] = ev["clients"]
                self.done[ev["round"]] = 0
                console.print(f"{t} round {ev['round']}/{self.rounds}: training {ev['clients']} clients")
            elif kind == "client_done":
                r = ev["round"]
                self.done[r] = self.done.get(r, 0) + 1
                eps = f", ε={ev['epsilon']:.2f}" if ev.get("epsilon") is not None else ""
                console.print(f"{t}   client {ev['user']} done ({self.done[r]}/{self.round_clients.get(r, '?')}) "
                              f"loss={ev['train_loss']:.3f}{eps} in {ev['seconds']:.0f}s")
            elif kind == "resumed":
                console.print(f"{t} resumed after round {ev['round']} from the checkpoint")
            elif kind == "budget":
                console.print(f"{t} user-level budget ε={ev['budget']} allows {ev['rounds']} rounds "
                              f"(ε={ev['epsilon']:.3f} after them); the run stops there")
            elif kind == "published":
                console.print(f"{t} published v{ev['version']} (round {ev['round']}) to {ev['registry']}; "
                              "promote it with `fedtune registry promote`")
            elif kind == "round_done":
                if ev["round"] not in metrics:
                    break  # its record is not readable yet; take this event again next poll
                print_round(console, metrics[ev["round"]], self.rounds)
            self.n_events += 1


def _check_context(cfg, model_dir) -> None:
    """data.seq_len must fit the base model's context (the tiny model's is checked with the config)."""
    import json

    config = Path(model_dir) / "config.json"
    if cfg.model.source == "tiny" or not config.is_file():
        return
    limit = json.loads(config.read_text()).get("max_position_embeddings")
    if isinstance(limit, int) and cfg.data.seq_len > limit:
        raise UserError(f"data.seq_len: {cfg.data.seq_len} is longer than the model's context ({limit} tokens, "
                        f"{config}); lower data.seq_len")


@app.command()
def simulate(config: Path = typer.Argument(..., help="experiment YAML"),
             set_: list[str] = typer.Option([], "--set", help="override, e.g. federation.rounds=5"),
             out: Optional[Path] = typer.Option(None, "--out", help="run directory (default runs/<name>-<time>)"),
             ray_address: Optional[str] = typer.Option(None, "--ray-address",
                                                       help="run on an existing Ray cluster (e.g. auto)"),
             resume: bool = typer.Option(False, "--resume",
                                         help="continue the run in --out from its last checkpoint"),
             backend: str = typer.Option("flower", "--backend",
                                         help="flower: Flower's simulation engine on Ray; inprocess: the same "
                                              "engine in this process (no Ray; cuda when simulation."
                                              "num_gpus_per_client > 0)"),
             verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Run a federated simulation on Flower's simulation engine and write a run directory."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)
    if backend not in ("flower", "inprocess"):
        raise UserError(f"--backend: expected flower or inprocess, got {backend!r}")
    if backend == "inprocess" and (resume or ray_address):
        raise UserError(f"--backend inprocess: {'--resume' if resume else '--ray-address'} is for the Flower "
                        "backend; drop it or use --backend flower")
    cfg = _load_or_exit(config, set_ + ([f"simulation.ray_address={ray_address}"] if ray_address else []))
    import transformers

    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    from fedtune.data import prepare_client_data, save_client_data
    from fedtune.flower.simulation import SimulationFailed, run_simulation
    from fedtune.models import load_encoder, resolve_model_dir
    from fedtune.report import epsilon_warnings, write_fleet_plots, write_plots, write_report
    from fedtune.workspace import RunDir, check_run_root

    cfg = with_absolute_paths(cfg)
    if resume and out is None:
        raise UserError("--resume needs --out RUN_DIR (the run to continue)")
    root = out or Path("runs") / f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"
    check_run_root(root, resume)
    if resume and (root / "config.yaml").is_file():
        before = load_config(root / "config.yaml").to_dict()
        now = cfg.to_dict()
        before["federation"].pop("rounds")
        now["federation"].pop("rounds")  # a resumed run may go on for more rounds; nothing else may change
        if before != now:
            raise UserError(f"--resume: the config differs from the one {root} was started with "
                            f"({root / 'config.yaml'}) in more than federation.rounds; resume with the same config")
    t0 = time.monotonic()
    console.print(f"model: {cfg.model.source}:{cfg.model.name} ({cfg.model.quantization}) "
                  "- converting to the local cache if this is the first use")
    _check_context(cfg, resolve_model_dir(cfg.model))
    prepared = prepare_client_data(cfg.data, load_encoder(cfg.model), cfg.seed)
    clients = prepared.clients
    n_devices = (cfg.fleet.population or len(clients)) if cfg.fleet.enabled else len(clients)
    if cfg.federation.min_clients > n_devices:
        source = "fleet.population" if cfg.fleet.enabled and cfg.fleet.population else "users in the data"
        dropped = f"; {prepared.dropped_note()}" if prepared.dropped else ""
        raise UserError(f"federation.min_clients: {cfg.federation.min_clients} is more than the {n_devices} devices "
                        f"there are ({source}{dropped}); every round would be skipped: lower "
                        f"federation.min_clients to at most {n_devices}")
    plan = None
    if cfg.privacy.user_level.enabled:  # calibrate and check the budget before any training starts
        from fedtune.privacy.dp_fedavg import plan_user_level

        try:
            plan = plan_user_level(cfg.privacy.user_level, n_devices, cfg.federation.clients_per_round,
                                   cfg.federation.rounds)
        except ValueError as err:
            raise UserError(f"privacy.user_level: {err}") from None
    # every check passed: only now is anything written
    run = RunDir.create(root)
    dump_config(cfg, run.config)
    console.print(f"run directory: {run.root}" + (" (resuming)" if resume else ""))
    if prepared.dropped:
        console.print(f"[yellow]warning:[/yellow] {prepared.dropped_note()}")
    if not (resume and (run.data / "index.json").is_file()):
        save_client_data(clients, run.data)
        if prepared.dropped:  # recorded once, with the data it describes
            run.append_event({"event": "users_dropped", "users": list(prepared.dropped),
                              "seq_len": cfg.data.seq_len, "reason": "no full training chunk"})
    n_train = sum(c.num_train for c in clients)
    console.print(f"data: {cfg.data.source}, {len(clients)} users, {n_train} training chunks of "
                  f"{cfg.data.seq_len} tokens ({time.monotonic() - t0:.0f}s)")
    if plan is not None:
        console.print(f"user-level DP: noise multiplier {plan.noise_multiplier:.4g}, devices sampled with "
                      f"q={plan.sample_rate:.4g}, ε={plan.planned_epsilon:.3f} at δ={plan.delta:.3g} after "
                      f"{plan.rounds} rounds" + ("" if plan.rounds == cfg.federation.rounds else
                                                  f" (the budget stops the run before round {plan.rounds + 1})"))
    engine = "Flower simulation engine (Ray)" if backend == "flower" else "in-process engine"
    console.print(f"{engine}: {n_devices} virtual devices, "
                  f"{min(cfg.federation.clients_per_round, n_devices)} per round, "
                  f"{cfg.federation.rounds} rounds, DP-SGD {'on' if cfg.privacy.enabled else 'off'}")
    if backend == "inprocess":
        from fedtune.cli_inprocess import simulate_in_process

        simulate_in_process(console, cfg, run, clients)
        finished = "in process"
    else:
        try:
            handle = run_simulation(cfg, run, n_devices, on_poll=_Progress(run, cfg.federation.rounds))
        except SimulationFailed as err:
            console.print(f"[red]simulation failed:[/red] {err}")
            raise typer.Exit(1) from None
        finished = f"Flower run {handle.run_id}"
    records = run.read_metrics()
    write_plots(run, records)
    write_fleet_plots(run, records)
    report = write_report(run, cfg, records, time.monotonic() - t0)
    from fedtune.report import decline_notes
    from fedtune.workspace import read_jsonl

    for warning in epsilon_warnings(cfg, records) + decline_notes(read_jsonl(run.events)):
        console.print(f"[yellow]{warning}[/yellow]")
    first, last = records[0], records[-1]
    console.print(f"done in {time.monotonic() - t0:.0f}s ({finished}): held-out perplexity "
                  f"{first['eval_perplexity']:.3f} -> {last['eval_perplexity']:.3f}; report: {report}")
    if cfg.personalization.evaluate_at_end:
        from fedtune.cli_evaluate import run_evaluation

        run_evaluation(console, run.root)


from fedtune.cli_audit import audit_app  # noqa: E402
from fedtune.cli_evaluate import evaluate  # noqa: E402
from fedtune.cli_registry import device_app, export_app, registry_app  # noqa: E402

app.command()(evaluate)
app.add_typer(registry_app, name="registry")
app.add_typer(device_app, name="device")
app.add_typer(export_app, name="export")
app.add_typer(audit_app, name="audit")

from fedtune.cli_deploy import certs_app, device_join, server_app  # noqa: E402

device_app.command("join")(device_join)
app.add_typer(server_app, name="server")
app.add_typer(certs_app, name="certs")

from fedtune.cli_serve import serve_cmd  # noqa: E402

app.command("serve")(serve_cmd)


if __name__ == "__main__":
    app()
