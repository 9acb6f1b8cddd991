"""The Flower ServerApp: app wiring around the engine's server (``fedtune.federation.server``).

One run, as the server sees it:
  1. Read the experiment config and the run directory from the Flower run config; prepare the
     per-client data if the launcher has not (``flwr run .`` straight from a checkout).
  2. Load the base model (quantized) with its adapter once; its seeded initial adapter state is
     the round-0 global adapter. Only that state is ever sent.
  3. ``build_server`` sets up seeds, sampler, user-level plan, fleet coordinator, rule and reply limits
     (restored from a checkpoint when resuming); ``strategy_for`` wraps them in Flower's FedAvg loop.
  4. Wait until every device has connected (Flower's grid), then Flower drives the rounds: the strategy
     (``strategy.py`` / ``fleet_strategy.py``) translates tasks, adapters and replies to messages; under
     ``privacy.secure_aggregation`` its train messages run as a SecAgg+ round (``secagg_grid.py``).
  5. After each round (and for round 0) ``Recorder``, Flower's ``evaluate_fn``, hands the global adapter
     to the engine's recorder (evaluate, label, save, record, checkpoint) and publishing.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedtune.adapters import get_adapter_state
from fedtune.adapters.split import initial_private, shared_part
from fedtune.data.partition import prepare_run_data, read_index
from fedtune.federation.heldout import heldout_from_disk
from fedtune.federation.publishing import maybe_publish
from fedtune.federation.recorder import Recorder as EngineRecorder
from fedtune.federation.recorder import (  # noqa: F401 (the checkpoint API, re-exported for the launcher)
    RoundStats, load_checkpoint_adapter, new_trail, read_checkpoint, truncate_metrics,
)
from fedtune.federation.recorder import write_checkpoint as write_engine_checkpoint
from fedtune.federation.secure_round import SecureAggregation
from fedtune.federation.server import ServerSetup, budget_event, build_server, cohort_size, resume, totals
from fedtune.flower.context import RunContext, run_context, simulated_params
from fedtune.flower.fleet_strategy import FleetFedAvg
from fedtune.flower.packed_grid import PackedGrid
from fedtune.flower.records import arrays_to_state, state_to_arrays
from fedtune.flower.secagg_grid import SecAggGrid
from fedtune.flower.strategy import AdapterFedAvg
from fedtune.types import AdapterState, RoundResult

if TYPE_CHECKING:
    from torch import Tensor

log = logging.getLogger(__name__)


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

    def __init__(self, ctx: RunContext, strategy: AdapterFedAvg, model, info: dict, heldout: Tensor, *,
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
            stats.extra = coord.round_record(server_round)
        result = self.engine.record(server_round, arrays_to_state(arrays), stats)
        stats.mark("recorded")
        self.published = maybe_publish(cfg, run, server_round, self.final_round) or self.published
        self.engine.checkpoint(server_round)
        stats.mark("checkpointed")
        self.last_round = server_round
        self.results.append(result)
        run.append_event({"event": "round_done", "round": server_round, "server": dict(stats.marks)})
        if server_round < self.final_round:
            run.append_event({"event": "round_start", "round": server_round + 1,
                              "clients": cohort_size(cfg, self.n_clients)})
        log.info("round %d: eval_loss %.4f perplexity %.2f", server_round, result.eval_loss, result.eval_perplexity)
        self._t0 = time.perf_counter()
        return MetricRecord({"eval-loss": result.eval_loss, "eval-perplexity": min(result.eval_perplexity, 1e30)})


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
    rule = strategy.pipeline.rule.name if strategy.aggregator is None else strategy.aggregator.name
    return {"class": type(strategy).__name__, "seed": strategy.seed, "min_clients": strategy.min_clients,
            "aggregator": rule, "totals": totals(strategy.stats.values(), strategy.prior_totals)}


def strategy_for(cfg, setup: ServerSetup, initial: AdapterState) -> AdapterFedAvg:
    """Flower's FedAvg loop over the engine's setup (fleet: per-device tasks and ranks)."""
    fed = cfg.federation
    if setup.coord is not None:
        strategy = FleetFedAvg(reference=initial, coordinator=setup.coord, rank_aggregation=cfg.fleet.rank_aggregation,
                               scale=cfg.adapter.alpha / cfg.adapter.rank, min_clients=fed.min_clients, seed=cfg.seed,
                               max_examples=setup.limits.max_examples, seeds=setup.seeds, rule=setup.rule)
    else:
        lim = setup.limits
        strategy = AdapterFedAvg(reference=initial, clients_per_round=min(fed.clients_per_round, setup.population),
                                 min_clients=fed.min_clients, seed=cfg.seed, max_examples=lim.max_examples,
                                 user_dp=setup.user_dp, max_update_norm=lim.max_update_norm,
                                 max_train_loss=lim.max_train_loss, seeds=setup.seeds, rule=setup.rule,
                                 sampler=setup.sampler)
    strategy.round_offset = setup.offset
    return strategy


def secure_grid(cfg, setup: ServerSetup, grid: Grid, run_id: int) -> SecAggGrid:
    """Secure aggregation's grid: each device masks its own update; the strategy gets only the sum.
    Packing does not apply: each device trains in its own masked-input message (packed training is a
    simulation speed-up; the round is the same)."""
    if cfg.simulation.packed_group_size > 1:
        log.warning("secure aggregation: every device trains in its own masked-input message; "
                    "simulation.packed_group_size=%d is not used", cfg.simulation.packed_group_size)
    if cfg.privacy.secure_aggregation.simulated_dropout > 0:
        log.warning("secure aggregation: privacy.secure_aggregation.simulated_dropout applies to the in-process "
                    "backend only; on Flower a device drops out when it fails or does not answer")
    clip = cfg.privacy.user_level.clip_norm if setup.user_dp is not None else None
    secure = SecureAggregation(cfg.privacy.secure_aggregation, clip, float(setup.limits.max_examples), setup.seeds,
                               context=f"{cfg.name}/{run_id}".encode())
    return SecAggGrid(grid, secure)


def run_server(grid: Grid, context: Context) -> list[RoundResult]:
    ctx = run_context(context.run_config)
    cfg = ctx.cfg
    prepare_run_data(cfg, ctx.run.data)  # once, unless the launcher or CLI already did
    index = read_index(ctx.run.data)
    model, info = ctx.model()
    split = cfg.personalization.split
    full = get_adapter_state(model)
    initial = shared_part(full, split)  # only the shared part is ever sent or aggregated
    deployed = int(context.run_config.get("deployment-nodes", 0))  # `fedtune server start` sets it
    checkpoint = read_checkpoint(ctx.run)
    setup = build_server(cfg, initial, users=len(index), max_train=max(e["train"] for e in index),
                         params=simulated_params(cfg, info), checkpoint=checkpoint, deployed=deployed)
    strategy = strategy_for(cfg, setup, initial)
    start_state, done = initial, 0
    if checkpoint:
        start_state, done = resume(ctx.run, checkpoint, split)
        strategy.prior_totals = (checkpoint.get("strategy") or {}).get("totals")
    final = setup.rounds
    if (event := budget_event(cfg, setup)) is not None:
        ctx.run.append_event(event)
    heldout = heldout_from_disk(ctx.run.data, len(index), cfg.train.eval_max_chunks)
    recorder = Recorder(ctx, strategy, model, info, heldout,
                        n_clients=setup.population, final_round=final, last_round=done if checkpoint else -1,
                        private_init=initial_private(full, split))
    recorder.published = checkpoint.get("registry") if checkpoint else None
    if checkpoint:
        recorder.trail.restore(checkpoint.get("privacy_trail"))
    ctx.run.append_event({"event": "waiting_for_nodes", "expected": setup.population})
    wait_for_nodes(grid, setup.population, timeout=3600.0 if deployed else 300.0, deployed=bool(deployed))
    train_config = ConfigRecord({"local-steps": cfg.train.local_steps, "batch-size": cfg.train.batch_size,
                                 "lr": cfg.train.lr})
    if final > done:
        if checkpoint:  # the checkpoint's round is not evaluated again, so announce the next one here
            ctx.run.append_event({"event": "round_start", "round": done + 1,
                                  "clients": cohort_size(cfg, setup.population)})
        if cfg.privacy.secure_aggregation.enabled:  # the strategy's train messages become a SecAgg+ round
            grid = secure_grid(cfg, setup, grid, context.run_id)
            strategy.secure = grid
        elif cfg.simulation.packed_group_size > 1:  # one ClientApp call trains a group; replies per device
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
