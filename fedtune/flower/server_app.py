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

from fedtune.adapters import adapter_bytes, get_adapter_state, set_adapter_state
from fedtune.data.partition import read_index
from fedtune.flower.context import RunContext, run_context
from fedtune.flower.records import arrays_to_state, state_to_arrays
from fedtune.flower.fleet import FleetCoordinator
from fedtune.flower.fleet_strategy import FleetFedAvg
from fedtune.flower.strategy import AdapterFedAvg, RoundStats
from fedtune.recording import save_adapter
from fedtune.training import evaluate_chunks
from fedtune.types import RoundResult

log = logging.getLogger(__name__)


def ensure_data(ctx: RunContext) -> list[dict]:
    """The data index; tokenizes and partitions the data once if nobody has yet."""
    if not (ctx.run.data / "index.json").is_file():
        from fedtune.data import build_client_data, save_client_data
        from fedtune.models import load_encoder

        save_client_data(build_client_data(ctx.cfg.data, load_encoder(ctx.cfg.model), ctx.cfg.seed), ctx.run.data)
    return read_index(ctx.run.data)


def heldout_pool(ctx: RunContext, n_clients: int) -> torch.Tensor:
    """Round-robin over clients' held-out chunks, capped: a fixed, user-balanced eval set."""
    from fedtune.data.partition import load_client_data

    limit = ctx.cfg.train.eval_max_chunks
    per_client: list[torch.Tensor] = []
    for i in range(n_clients):  # only as many clients as the cap needs (10,000 users: a few files)
        per_client.append(load_client_data(ctx.run.data, i).heldout)
        if sum(h.shape[0] for h in per_client) >= limit and len(per_client) >= min(limit, n_clients):
            break
    chunks, depth = [], 0
    while len(chunks) < limit and any(depth < h.shape[0] for h in per_client):
        chunks += [h[depth] for h in per_client if depth < h.shape[0]]
        depth += 1
    return torch.stack(chunks[:limit])  # [M, T]


def wait_for_nodes(grid: Grid, expected: int, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while (n := len(list(grid.get_node_ids()))) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {n} of {expected} devices connected after {timeout:.0f}s; the data has {expected} "
                f"users, so the federation needs num-supernodes={expected}"
            )
        time.sleep(0.2)


class Recorder:
    """Evaluates the global adapter after each round and writes its record and checkpoint."""

    def __init__(self, ctx: RunContext, strategy: AdapterFedAvg, model, info: dict, heldout: torch.Tensor):
        self.ctx, self.strategy, self.model, self.info, self.heldout = ctx, strategy, model, info, heldout
        self.results: list[RoundResult] = []

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        cfg, run = self.ctx.cfg, self.ctx.run
        state = arrays_to_state(arrays)
        set_adapter_state(self.model, state)
        res = evaluate_chunks(self.model, self.heldout, cfg.train.eval_batch_size)
        stats = self.strategy.stats.get(server_round, RoundStats(started=self._t0))
        fleet_extra = {}
        coord = getattr(self.strategy, "coord", None)
        if coord is not None:
            fstats = coord.stats.get(server_round)
            fleet_extra = dict(fstats.record() if fstats else {"sim_round_seconds": 0.0},
                               sim_clock_seconds=round(coord.clock.seconds, 3))
        eps = [c["epsilon"] for c in stats.clients if c.get("epsilon", -1) >= 0]
        result = RoundResult(
            round=server_round,
            clients_sampled=stats.sampled,
            clients_succeeded=stats.succeeded,
            train_loss=stats.train_loss,
            eval_loss=res.loss,
            eval_perplexity=res.perplexity,
            upload_bytes=stats.upload_bytes,
            wall_seconds=round(time.perf_counter() - stats.started, 3),
            epsilon=max(eps) if eps else (0.0 if cfg.privacy.enabled else None),
            delta=cfg.privacy.delta if cfg.privacy.enabled else None,
            extra={
                "eval_accuracy": res.accuracy,
                "epsilon_mean": sum(eps) / len(eps) if eps else None,
                "privacy_level": "sample" if cfg.privacy.enabled else "none",
                "clients_failed": stats.failed,
                "clients_rejected": dict(stats.rejected),
                "round_skipped": stats.skipped,
                "adapter_bytes": adapter_bytes(state),
                "base_model_bytes_dense": self.info["base_bytes_dense"],
                "base_model_bytes": self.info["base_bytes"],
                "quantization": self.info["quantization"],
                "clients": stats.clients,
                **fleet_extra,
            },
        )
        save_adapter(self.model, run.adapter(server_round), result, cfg)
        run.append_metrics(result.to_record())
        self._maybe_publish(server_round)
        self.results.append(result)
        run.append_event({"event": "round_done", "round": server_round})
        if server_round < cfg.federation.rounds:
            cohort = min(cfg.federation.clients_per_round, self.n_clients)
            if cfg.fleet.enabled:  # over-selection: more start than will count
                cohort = min(self.n_clients, math.ceil(cohort * (1 + cfg.fleet.over_selection)))
            run.append_event({"event": "round_start", "round": server_round + 1, "clients": cohort})
        log.info("round %d: eval_loss %.4f perplexity %.2f", server_round, res.loss, res.perplexity)
        self._t0 = time.perf_counter()
        return MetricRecord({"eval-loss": res.loss, "eval-perplexity": min(res.perplexity, 1e30)})

    def _maybe_publish(self, server_round: int) -> None:
        pub, rounds = self.ctx.cfg.publish, self.ctx.cfg.federation.rounds
        due = (pub.at_end and server_round == rounds) or (
            pub.every_n_rounds is not None and server_round > 0 and server_round % pub.every_n_rounds == 0)
        if not pub.registry or not due:
            return
        from fedtune.registry import Registry, load_signing_key, publish_run

        signed = publish_run(self.ctx.run.root, Registry(Path(pub.registry)), load_signing_key(Path(pub.signing_key)),
                             round=server_round, name=pub.name)
        self.ctx.run.append_event({"event": "published", "round": server_round,
                                   "version": signed.manifest.version, "registry": pub.registry})

    _t0: float = 0.0
    n_clients: int = 0


def run_server(grid: Grid, context: Context) -> list[RoundResult]:
    ctx = run_context(context.run_config)
    cfg = ctx.cfg
    index = ensure_data(ctx)
    model, info = ctx.model()
    initial = get_adapter_state(model)
    max_examples = max(entry["train"] for entry in index)
    population = (cfg.fleet.population or len(index)) if cfg.fleet.enabled else len(index)
    if cfg.fleet.enabled:
        coord = FleetCoordinator(cfg, len(index), cfg.fleet.simulated_params or info["base_bytes_dense"] // 4,
                                 adapter_bytes(initial) // cfg.adapter.rank)
        strategy = FleetFedAvg(reference=initial, coordinator=coord, rank_aggregation=cfg.fleet.rank_aggregation,
                               scale=cfg.adapter.alpha / cfg.adapter.rank, min_clients=cfg.federation.min_clients,
                               seed=cfg.seed, max_examples=max_examples)
    else:
        strategy = AdapterFedAvg(reference=initial, clients_per_round=min(cfg.federation.clients_per_round, len(index)),
                                 min_clients=cfg.federation.min_clients, seed=cfg.seed, max_examples=max_examples)
    recorder = Recorder(ctx, strategy, model, info, heldout_pool(ctx, len(index)))
    recorder.n_clients = population
    recorder._t0 = time.perf_counter()
    ctx.run.append_event({"event": "waiting_for_nodes", "expected": population})
    wait_for_nodes(grid, population)
    train_config = ConfigRecord({"local-steps": cfg.train.local_steps, "batch-size": cfg.train.batch_size,
                                 "lr": cfg.train.lr})
    strategy.start(grid=grid, initial_arrays=state_to_arrays(initial), num_rounds=cfg.federation.rounds,
                   train_config=train_config, evaluate_fn=recorder)
    ctx.run.append_event({"event": "finished", "rounds": cfg.federation.rounds})
    if any(math.isnan(r.eval_loss) for r in recorder.results):
        raise RuntimeError("evaluation produced NaN; see metrics.jsonl")
    return recorder.results


def build_server_app() -> ServerApp:
    app = ServerApp()
    app.main()(run_server)
    return app
