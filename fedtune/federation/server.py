"""The server's side of a run, Flower-free: what both backends build before round 1 and keep across rounds.

``build_server`` turns a config (and a resumed checkpoint) into a ``ServerSetup``:
  1. the run's ``Seeds`` (simulated from ``seed``; secret on a deployed server);
  2. the population (one device per data user, a fleet's ``population``, or the deployed devices);
  3. the user-level plan and DP-FedAvg (its ledger restored from the checkpoint), which may cut the rounds;
  4. a fleet's coordinator (its clock restored), the cohort sampler and the averaging rule;
  5. the reply limits (a simulated device never has more examples than the largest partition).

The backends only carry messages: ``fedtune.flower`` wraps a setup in Flower's strategy, the in-process
backend loops over it. ``resume`` restores the global adapter of a checkpoint; ``totals`` is the cumulative
failure / rejection / decline count a checkpoint carries.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

from fedtune.federation.aggregate import Pipeline, Rule, UserLevelDP, build_rule
from fedtune.federation.replies import ReplyLimits
from fedtune.federation.sampler import CohortSampler, create_sampler
from fedtune.federation.seeds import Seeds
from fedtune.types import AdapterState

log = logging.getLogger(__name__)


@dataclass
class ServerSetup:
    seeds: Seeds
    population: int  # devices that may be sampled
    sampler: CohortSampler
    rule: Rule  # the averaging rule (user-level DP replaces it in the pipeline)
    limits: ReplyLimits
    rounds: int  # the last round this run trains (a user-level budget may cut it)
    user_dp: object | None = None  # fedtune.privacy.dp_fedavg.DPFedAvg
    plan: object | None = None  # its UserLevelPlan
    coord: object | None = None  # a fleet's FleetCoordinator
    offset: int = 0  # rounds already done (a resumed checkpoint's)

    def pipeline(self, min_clients: int) -> Pipeline:
        wrapper = UserLevelDP(self.user_dp, sampler_kind=self.sampler.kind) if self.user_dp is not None else None
        return Pipeline(self.rule, min_clients, wrapper)


def build_server(cfg, shared: AdapterState, *, users: int, max_train: int | None, params: int,
                 checkpoint: dict | None = None, deployed: int = 0) -> ServerSetup:
    """``users``: data users (one virtual device each); ``max_train``: the largest partition's training
    examples (None when deployed: a real device is only bounded by ``validation.max_examples``);
    ``params``: the base model's parameter count (a fleet's simulated compute); ``deployed``: the number of
    real devices, 0 in a simulation."""
    from fedtune.adapters import adapter_bytes

    seeds = Seeds.for_run(cfg.seed, deployed=bool(deployed))  # a deployed server's cohorts and noise are secret
    coord = None
    if cfg.fleet.enabled:
        from fedtune.federation.fleet import FleetCoordinator
        from fedtune.fleet import SimClock

        coord = FleetCoordinator(cfg, users, cfg.fleet.simulated_params or params,
                                 adapter_bytes(shared) // cfg.adapter.rank, seeds=seeds)
        if checkpoint and checkpoint.get("clock"):
            coord.clock = SimClock.from_dict(checkpoint["clock"])
        population, sampler = coord.population, coord.sampler
    else:
        population = deployed or users
        sampler = create_sampler(cfg, seeds, population)
    user_dp = plan = None
    if cfg.privacy.user_level.enabled:
        from fedtune.privacy.dp_fedavg import DPFedAvg, plan_user_level
        from fedtune.privacy.user_level import UserLevelLedger

        plan = plan_user_level(cfg.privacy.user_level, population, cfg.federation.clients_per_round,
                               cfg.federation.rounds)
        ledger = None
        if checkpoint and checkpoint.get("user_ledger"):
            ledger = UserLevelLedger.from_dict(checkpoint["user_ledger"])
        user_dp = DPFedAvg(cfg.privacy.user_level, plan, population, seeds, ledger)
    max_examples = cfg.validation.max_examples
    if max_train is not None and not deployed:
        max_examples = min(max_examples, max_train)
    limits = ReplyLimits(max_examples, cfg.validation.max_update_norm, cfg.validation.max_train_loss)
    return ServerSetup(seeds=seeds, population=population, sampler=sampler, rule=build_rule(cfg, shared),
                       limits=limits, rounds=plan.rounds if plan is not None else cfg.federation.rounds,
                       user_dp=user_dp, plan=plan, coord=coord,
                       offset=int(checkpoint["round"]) if checkpoint else 0)


def budget_event(cfg, setup: ServerSetup) -> dict | None:
    """The progress event when the user-level budget cuts the run short (None when it does not)."""
    plan = setup.plan
    if plan is None or plan.rounds >= cfg.federation.rounds:
        return None
    log.warning("user-level budget epsilon=%s allows %d of %d rounds; stopping there",
                plan.budget, plan.rounds, cfg.federation.rounds)
    return {"event": "budget", "rounds": plan.rounds, "epsilon": plan.planned_epsilon, "budget": plan.budget}


def cohort_size(cfg, population: int) -> int:
    """How many devices a round starts (a fleet over-selects: more start than will count)."""
    cohort = min(cfg.federation.clients_per_round, population)
    if cfg.fleet.enabled:
        cohort = min(population, math.ceil(cohort * (1 + cfg.fleet.over_selection)))
    return cohort


def resume(run, checkpoint: dict, split: str) -> tuple[AdapterState, int]:
    """The checkpoint's shared global adapter and round; metrics records past it are dropped."""
    from fedtune.adapters.split import shared_part
    from fedtune.federation.recorder import load_checkpoint_adapter, truncate_metrics

    done = int(checkpoint["round"])
    state = shared_part(load_checkpoint_adapter(run, done, checkpoint.get("adapter_sha256")), split)
    dropped = truncate_metrics(run, done)
    run.append_event({"event": "resumed", "round": done, "dropped_records": dropped})
    return state, done


def totals(stats: Iterable, prior: dict | None = None) -> dict:
    """Cumulative failed / rejected / declined counts over rounds' ``RoundStats`` plus a resumed run's."""
    out = {"failed": 0, "rejected": {}, "declined": {}}
    for s in stats:
        out["failed"] += s.failed
        for kind in ("rejected", "declined"):
            for reason, n in getattr(s, kind).items():
                out[kind][reason] = out[kind].get(reason, 0) + n
    prior = prior or {}
    out["failed"] += prior.get("failed", 0)
    for kind in ("rejected", "declined"):
        for reason, n in prior.get(kind, {}).items():
            out[kind][reason] = out[kind].get(reason, 0) + n
    return out
