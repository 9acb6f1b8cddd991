"""The server's side of a heterogeneous fleet: who is online, what each device is asked to do, and
how long a round takes on the simulated clock.

Flower gives virtual nodes only a partition id and the server only node ids, so in a fleet
simulation the server owns the mapping: device i (0..population-1) runs on the i-th virtual node in
sorted order, and every message names its ``device-index``. A device's profile, availability,
plan, slowdown and dropout are deterministic functions of (i, seed, round, simulated time), so the
server can pick an online cohort and size each task without asking the devices; the devices report
the simulated seconds they actually took and the server drops the ones that miss the deadline.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass, field

from fedtune.config import ExperimentConfig
from fedtune.federation.fleet_device import catalog
from fedtune.federation.sampler import AvailabilitySampler
from fedtune.federation.seeds import Seeds
from fedtune.federation.task import TaskPlan, plan_task
from fedtune.fleet import SimClock, assign_profile, is_available, plan_device, validate_mixture


@dataclass
class FleetRoundStats:
    """Per-round fleet figures that go into metrics.jsonl."""

    sampled_by_tier: Counter = field(default_factory=Counter)
    succeeded_by_tier: Counter = field(default_factory=Counter)
    stragglers_by_tier: Counter = field(default_factory=Counter)
    dropouts_by_tier: Counter = field(default_factory=Counter)
    over_selected: int = 0
    sim_round_seconds: float = 0.0

    def record(self) -> dict:
        return {
            "stragglers": sum(self.stragglers_by_tier.values()),
            "dropouts": sum(self.dropouts_by_tier.values()),
            "over_selected_dropped": self.over_selected,
            "sim_round_seconds": round(self.sim_round_seconds, 3),
            "tiers": {t: {"sampled": self.sampled_by_tier[t], "succeeded": self.succeeded_by_tier[t],
                          "stragglers": self.stragglers_by_tier[t], "dropouts": self.dropouts_by_tier[t]}
                      for t in sorted(self.sampled_by_tier)},
        }


class FleetCoordinator:
    def __init__(self, cfg: ExperimentConfig, n_users: int, model_params: int, adapter_bytes_per_rank: int,
                 seeds: Seeds | None = None):
        fl = cfg.fleet
        self.sampler = AvailabilitySampler(seeds or Seeds.simulated(cfg.seed), cfg.federation.clients_per_round,
                                           fl.over_selection, self.online)
        self.cfg = cfg
        self.catalog = catalog(fl.catalog)
        validate_mixture(dict(fl.mixture), self.catalog)
        self.population = fl.population or n_users
        self.model_params = model_params
        self.adapter_bytes_per_rank = adapter_bytes_per_rank
        self.clock = SimClock(0.0)
        self.stats: dict[int, FleetRoundStats] = {}

    @functools.lru_cache(maxsize=65536)
    def tier(self, device: int) -> str:
        return assign_profile(device, self.cfg.seed, dict(self.cfg.fleet.mixture))

    @functools.lru_cache(maxsize=65536)
    def plan(self, device: int):
        cfg = self.cfg
        return plan_device(
            self.catalog[self.tier(device)], model_params=self.model_params,
            base_bytes_fp32=self.model_params * 4, seq_len=cfg.data.seq_len,
            max_local_steps=cfg.train.local_steps, deadline_s=cfg.fleet.deadline_s,
            adapter_bytes_per_rank=self.adapter_bytes_per_rank, global_rank=cfg.adapter.rank,
            lora_alpha=cfg.adapter.alpha,
        )

    def online(self, device: int) -> bool:
        if not self.plan(device).can_participate:
            return False
        return is_available(self.catalog[self.tier(device)], device, self.clock.seconds, self.cfg.seed,
                            self.cfg.fleet.start_hour)

    def cohort(self, server_round: int) -> list[int]:
        """Online devices for this round: the cohort plus the configured over-selection."""
        devices = self.sampler.sample(server_round, self.population)
        stats = self.stats.setdefault(server_round, FleetRoundStats())
        stats.sampled_by_tier.update(self.tier(d) for d in devices)
        return devices

    def task(self, device: int, server_round: int = 0) -> TaskPlan:
        """The device's task: what its profile allows (rank, alpha, quantization, steps, batch)."""
        return plan_task(self.cfg, server_round, self.plan(device), device=device)

    def settle(self, server_round: int, finished: dict[int, float], failed: list[int]) -> list[int]:
        """Decide which finished devices count, advance the clock; returns the accepted devices.

        ``finished`` maps device -> its simulated seconds. Devices past the deadline are stragglers;
        of the rest, the first ``clients_per_round`` to finish are kept (over-selection).
        """
        stats = self.stats.setdefault(server_round, FleetRoundStats())
        deadline = self.cfg.fleet.deadline_s or math.inf
        for d in failed:
            stats.dropouts_by_tier[self.tier(d)] += 1
        in_time = sorted((s, d) for d, s in finished.items() if s <= deadline)
        for d, s in finished.items():
            if s > deadline:
                stats.stragglers_by_tier[self.tier(d)] += 1
        keep = in_time[: self.cfg.federation.clients_per_round]
        stats.over_selected = len(in_time) - len(keep)
        for _, d in keep:
            stats.succeeded_by_tier[self.tier(d)] += 1
        # the round ends when the cohort is complete, or at the deadline when it never completes
        full = len(keep) == self.cfg.federation.clients_per_round
        if full or math.isinf(deadline):
            duration = keep[-1][0] if keep else 0.0
        else:
            duration = deadline
        stats.sim_round_seconds = duration
        self.clock.advance(duration)
        return [d for _, d in keep]

    def round_record(self, server_round: int) -> dict:
        """The round's fleet figures for metrics.jsonl (tiers, simulated round time, the clock)."""
        stats = self.stats.get(server_round)
        return dict(stats.record() if stats else {"sim_round_seconds": 0.0},
                    sim_clock_seconds=round(self.clock.seconds, 3))
