"""The Flower ServerApp: the federated loop, end to end.

One run, as the server sees it:
  1. Read the experiment config and the run directory from the Flower run config; prepare the
     per-client data if the launcher has not (``flwr run .`` straight from a checkout).
  2. Load the base model (quantized) with its adapter once; its seeded initial adapter state is
     the round-0 global adapter. Only that state is ever sent.
  3. Wait until every virtual device (one per data partition) has connected.
  4. For each round, Flower's FedAvg (``AdapterFedAvg``) samples a seeded cohort, sends each
     device the global adapter and its task, validates every reply and averages the valid ones
     weighted by example count.
  5. After each round (and for round 0) ``evaluate`` measures held-out perplexity centrally,
     saves the global adapter in PEFT format and appends one record to metrics.jsonl.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedtune.adapters import adapter_bytes, get_adapter_state
from fedtune.adapters.split import initial_private, shared_part
from fedtune.aggregation import create_aggregator
from fedtune.data.partition import read_index
from fedtune.flower.context import RunContext, run_context
from fedtune.flower.packed_grid import PackedGrid
from fedtune.flower.records import arrays_to_state, state_to_arrays
from fedtune.fleet import SimClock
from fedtune.federation.fleet import FleetCoordinator
from fedtune.flower.fleet_strategy import FleetFedAvg
from fedtune.federation.recorder import Recorder as EngineRecorder
from fedtune.federation.recorder import (  # noqa: F401 (the checkpoint API, re-exported for the launcher)
    RoundStats, load_checkpoint_adapter, new_trail, read_checkpoint, truncate_metrics,
)
from fedtune.federation.recorder import write_checkpoint as write_engine_checkpoint
from fedtune.federation.seeds import Seeds
from fedtune.flower.strategy import AdapterFedAvg
from fedtune.types import AdapterState, RoundResult

log = logging.getLogger(__name__)


def ensure_data(ctx: RunContext) -> list[dict]:
    """The data index; tokenizes and partitions the data once if nobody has yet."""
    if not (ctx.run.data / "index.json").is_file():
        from fedtune.data import build_client_data, save_client_data
        from fedtune.models import load_encoder

        save_client_data(build_client_data(ctx.cfg.data, load_encoder(ctx.cfg.model), ctx.cfg.seed), ctx.run.data)
    return read_index(ctx.run.data)


def heldout_pool(ctx: RunContext, n_clients: int) -> torch.Tensor:
    """The engine's pooled held-out set (``federation.inprocess.pooled_heldout``) over only as many users'
    files as the cap needs (10,000 users: a few files)."""
    from fedtune.data.partition import load_client_data
    from fedtune.federation.inprocess import pooled_heldout

    limit = ctx.cfg.train.eval_max_chunks
    clients = []
    for i in range(n_clients):
        clients.append(load_client_data(ctx.run.data, i))
        if sum(c.heldout.shape[0] for c in clients) >= limit and len(clients) >= min(limit, n_clients):
            break
    return pooled_heldout(clients, limit)  # [M, T]


def wait_for_nodes(grid: Grid, expected: int, timeout: float = 300.0, deployed: bool = False) -> None:
    deadline = time.monotonic() + timeout
    while (n := len(list(grid.get_node_ids()))) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {n} of {expected} devices joined after {timeout:.0f}s; start more with `fedtune device "
                "join` or lower --min-nodes" if deployed else
                f"only {n} of {expected} devices connected after {timeout:.0f}s; the data has {expected} "
                f"users, so the federation needs num-supernodes={expected}"
            )
        time.sleep(0.2)


class Recorder:
    """Flower's ``evaluate_fn``: the engine's recorder (``fedtune.federation.recorder``) plus publishing and
    progress events, after each round."""

    def __init__(self, ctx: RunContext, strategy: AdapterFedAvg, model, info: dict, heldout: torch.Tensor, *,
                 n_clients: int, final_round: int, last_round: int = -1, private_init: AdapterState | None = None):
        self.ctx, self.strategy = ctx, strategy
        self.n_clients = n_clients  # the population (for announcing the next cohort)
        self.final_round = final_round  # the last round this run will train (the budget may cut it)
        self.last_round = last_round  # the last round already recorded (a resumed checkpoint's)
        self.results: list[RoundResult] = []
        self.trail = new_trail(ctx.cfg, strategy.seeds.mode, strategy.pipeline.user_dp)
        self.engine = EngineRecorder(ctx.cfg, ctx.run, model, heldout, self.trail, private_init, info=info,
                                     engine="flower", checkpoint_state=self._state)
        self.published: dict | None = None  # the registry state the checkpoint carries
        self._t0 = time.perf_counter()

    def _state(self) -> dict:
        return checkpoint_state(self.strategy, self.published)

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        cfg, run = self.ctx.cfg, self.ctx.run
        server_round += self.strategy.round_offset
        if server_round <= self.last_round:  # a resumed run re-evaluates its checkpoint: record it once
            return MetricRecord({"eval-loss": 0.0})
        stats = self.strategy.stats.get(server_round, RoundStats(started=self._t0))
        coord = getattr(self.strategy, "coord", None)
        if coord is not None:
            fstats = coord.stats.get(server_round)
            stats.extra = dict(fstats.record() if fstats else {"sim_round_seconds": 0.0},
                               sim_clock_seconds=round(coord.clock.seconds, 3))
        result = self.engine.record(server_round, arrays_to_state(arrays), stats)
        self.published = self._maybe_publish(server_round) or self.published
        self.engine.checkpoint(server_round)
        self.last_round = server_round
        self.results.append(result)
        run.append_event({"event": "round_done", "round": server_round})
        if server_round < self.final_round:
            cohort = min(cfg.federation.clients_per_round, self.n_clients)
            if cfg.fleet.enabled:  # over-selection: more start than will count
                cohort = min(self.n_clients, math.ceil(cohort * (1 + cfg.fleet.over_selection)))
            run.append_event({"event": "round_start", "round": server_round + 1, "clients": cohort})
        log.info("round %d: eval_loss %.4f perplexity %.2f", server_round, result.eval_loss, result.eval_perplexity)
        self._t0 = time.perf_counter()
        return MetricRecord({"eval-loss": result.eval_loss, "eval-perplexity": min(result.eval_perplexity, 1e30)})

    def _maybe_publish(self, server_round: int) -> None:
        pub = self.ctx.cfg.publish
        due = (pub.at_end and server_round == self.final_round) or (
            pub.every_n_rounds is not None and server_round > 0 and server_round % pub.every_n_rounds == 0)
        if not pub.registry or not due:
            return None
        from fedtune.registry import Registry, load_signing_key, publish_run

        signed = publish_run(self.ctx.run.root, Registry(Path(pub.registry)), load_signing_key(Path(pub.signing_key)),
                             round=server_round, name=pub.name)
        self.ctx.run.append_event({"event": "published", "round": server_round,
                                   "version": signed.manifest.version, "registry": pub.registry})
        return {"registry": pub.registry, "version": signed.manifest.version, "round": server_round}



def checkpoint_state(strategy, published: dict | None = None) -> dict:
    """What the Flower backend adds to a round's checkpoint: the strategy's settings and cumulative
    rejection/decline counts (cohorts are a pure function of the seeds and round), the server's user-level
    ledger, the fleet clock and the registry state (the last version published)."""
    user_dp = getattr(strategy, "user_dp", None)
    coord = getattr(strategy, "coord", None)
    return {"strategy": strategy_state(strategy),
            "user_ledger": user_dp.ledger.to_dict() if user_dp is not None else None,
            "clock": coord.clock.to_dict() if coord is not None else None,
            "registry": published}


def write_checkpoint(run, server_round: int, strategy, published: dict | None = None, trail=None) -> None:
    """The engine's checkpoint (``fedtune.federation.recorder.write_checkpoint``) with the strategy's state."""
    write_engine_checkpoint(run, server_round, {**checkpoint_state(strategy, published),
                                                "privacy_trail": trail.to_dict() if trail is not None else None})


def strategy_state(strategy) -> dict:
    totals = {"failed": 0, "rejected": {}, "declined": {}}
    for stats in strategy.stats.values():
        totals["failed"] += stats.failed
        for kind in ("rejected", "declined"):
            for reason, n in getattr(stats, kind).items():
                totals[kind][reason] = totals[kind].get(reason, 0) + n
    prior = getattr(strategy, "prior_totals", None) or {}
    totals["failed"] += prior.get("failed", 0)
    for kind in ("rejected", "declined"):
        for reason, n in prior.get(kind, {}).items():
            totals[kind][reason] = totals[kind].get(reason, 0) + n
    return {"class": type(strategy).__name__, "seed": strategy.seed, "min_clients": strategy.min_clients,
            "aggregator": getattr(getattr(strategy, "aggregator", None), "name", "fedavg"), "totals": totals}


def build_strategy(ctx: RunContext, index: list[dict], initial: AdapterState, info: dict, checkpoint: dict | None,
                   deployed: int = 0):
    """``deployed``: the number of real devices (SuperNodes) of a deployment; 0 in a simulation, where
    the population is one virtual device per data user."""
    cfg = ctx.cfg
    population = deployed or len(index)
    # a simulated device never has more examples than the largest partition; a real device is only bounded
    max_examples = cfg.validation.max_examples
    if not deployed:
        max_examples = min(max_examples, max(entry["train"] for entry in index))
    offset = checkpoint["round"] if checkpoint else 0
    seeds = Seeds.for_run(cfg.seed, deployed=bool(deployed))  # a deployed server's cohorts and noise are secret
    if cfg.fleet.enabled:
        coord = FleetCoordinator(cfg, len(index), cfg.fleet.simulated_params or info["base_bytes_dense"] // 4,
                                 adapter_bytes(initial) // cfg.adapter.rank, seeds=seeds)
        if checkpoint and checkpoint.get("clock"):
            coord.clock = SimClock.from_dict(checkpoint["clock"])
        strategy = FleetFedAvg(reference=initial, coordinator=coord, rank_aggregation=cfg.fleet.rank_aggregation,
                               scale=cfg.adapter.alpha / cfg.adapter.rank, min_clients=cfg.federation.min_clients,
                               seed=cfg.seed, max_examples=max_examples, aggregation=cfg.federation.aggregation,
                               trim_fraction=cfg.federation.trim_fraction, seeds=seeds)
        strategy.round_offset = offset
        return strategy, None
    user_dp, plan = None, None
    if cfg.privacy.user_level.enabled:
        from fedtune.privacy.dp_fedavg import DPFedAvg, plan_user_level
        from fedtune.privacy.user_level import UserLevelLedger

        plan = plan_user_level(cfg.privacy.user_level, population, cfg.federation.clients_per_round,
                               cfg.federation.rounds)
        ledger = None
        if checkpoint and checkpoint.get("user_ledger"):
            ledger = UserLevelLedger.from_dict(checkpoint["user_ledger"])
        user_dp = DPFedAvg(cfg.privacy.user_level, plan, population, seeds, ledger)
    fed, val = cfg.federation, cfg.validation
    aggregator = None if fed.aggregation == "fedavg" else create_aggregator(fed.aggregation,
                                                                            trim_fraction=fed.trim_fraction)
    strategy = AdapterFedAvg(reference=initial, clients_per_round=min(fed.clients_per_round, population),
                             min_clients=fed.min_clients, seed=cfg.seed, max_examples=max_examples,
                             user_dp=user_dp, round_offset=offset, max_update_norm=val.max_update_norm,
                             max_train_loss=val.max_train_loss, aggregator=aggregator, seeds=seeds)
    return strategy, plan


def run_server(grid: Grid, context: Context) -> list[RoundResult]:
    ctx = run_context(context.run_config)
    cfg = ctx.cfg
    index = ensure_data(ctx)
    model, info = ctx.model()
    split = cfg.personalization.split
    full = get_adapter_state(model)
    initial = shared_part(full, split)  # only the shared part is ever sent or aggregated
    deployed = int(context.run_config.get("deployment-nodes", 0))  # `fedtune server start` sets it
    population = deployed or ((cfg.fleet.population or len(index)) if cfg.fleet.enabled else len(index))
    checkpoint = read_checkpoint(ctx.run)
    strategy, plan = build_strategy(ctx, index, initial, info, checkpoint, deployed)
    start_state, done = initial, 0
    if checkpoint:
        done = int(checkpoint["round"])
        start_state = shared_part(load_checkpoint_adapter(ctx.run, done, checkpoint.get("adapter_sha256")), split)
        dropped = truncate_metrics(ctx.run, done)
        strategy.prior_totals = (checkpoint.get("strategy") or {}).get("totals")
        ctx.run.append_event({"event": "resumed", "round": done, "dropped_records": dropped})
    final = cfg.federation.rounds if plan is None else plan.rounds
    if plan is not None and plan.rounds < cfg.federation.rounds:
        ctx.run.append_event({"event": "budget", "rounds": plan.rounds, "epsilon": plan.planned_epsilon,
                              "budget": plan.budget})
        log.warning("user-level budget epsilon=%s allows %d of %d rounds; stopping there",
                    plan.budget, plan.rounds, cfg.federation.rounds)
    recorder = Recorder(ctx, strategy, model, info, heldout_pool(ctx, len(index)), n_clients=population,
                        final_round=final, last_round=done if checkpoint else -1,
                        private_init=initial_private(full, split))
    recorder.published = checkpoint.get("registry") if checkpoint else None
    if checkpoint:
        recorder.trail.restore(checkpoint.get("privacy_trail"))
    ctx.run.append_event({"event": "waiting_for_nodes", "expected": population})
    wait_for_nodes(grid, population, timeout=3600.0 if deployed else 300.0, deployed=bool(deployed))
    train_config = ConfigRecord({"local-steps": cfg.train.local_steps, "batch-size": cfg.train.batch_size,
                                 "lr": cfg.train.lr})
    if final > done:
        if checkpoint:  # the checkpoint's round is not evaluated again, so announce the next one here
            ctx.run.append_event({"event": "round_start", "round": done + 1,
                                  "clients": min(cfg.federation.clients_per_round, population)})
        if cfg.simulation.packed_group_size > 1:  # one ClientApp call trains a group; replies per device
            grid = PackedGrid(grid, cfg.simulation.packed_group_size)
        strategy.start(grid=grid, initial_arrays=state_to_arrays(start_state), num_rounds=final - done,
                       train_config=train_config, evaluate_fn=recorder, timeout=cfg.federation.round_timeout_s)
    ctx.run.append_event({"event": "finished", "rounds": final})
    if any(math.isnan(r.eval_loss) for r in recorder.results):
        raise RuntimeError("evaluation produced NaN; see metrics.jsonl")
    return recorder.results


def build_server_app() -> ServerApp:
    app = ServerApp()
    app.main()(run_server)
    return app
