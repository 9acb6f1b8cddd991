"""A heterogeneous fleet over Flower: message translation around ``fedtune.federation.fleet_server``.

Out: each sampled device's typed task and the global adapter at its tier's rank, one message per device
(virtual node i is device i). In: replies validated at their rank, settled by the coordinator (deadline,
over-selection), aggregated by the pipeline; the fleet server keeps the global state.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedtune.aggregation import FlexLoRAState
from fedtune.federation.aggregate import HeteroRule, Reply, RobustRule
from fedtune.federation.fleet import FleetCoordinator
from fedtune.federation.fleet_server import FleetServer, fill_dead_components, rank_of  # noqa: F401
from fedtune.flower.device import declined_reason
from fedtune.flower.records import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, state_to_arrays
from fedtune.flower.strategy import AdapterFedAvg, RoundStats
from fedtune.types import AdapterState

log = logging.getLogger(__name__)


class FleetFedAvg(AdapterFedAvg):
    """The fleet's message translation: per-device typed tasks and ranks out, replies settled by the
    coordinator (deadline, over-selection), then the pipeline's rank rule (``HeteroRule``) or, on
    same-rank tiers, a robust rule."""

    def __init__(self, *, reference: AdapterState, coordinator: FleetCoordinator, rank_aggregation: str,
                 scale: float, min_clients: int, seed: int, max_examples: int | None = None,
                 aggregation: str = "fedavg", trim_fraction: float = 0.1, seeds=None, rule=None):
        self.r_max = rank_of(reference)
        if rule is not None:  # the engine's (``federation.aggregate.build_rule``)
            pass
        elif aggregation == "fedavg":
            rule = HeteroRule(rank_aggregation, FlexLoRAState.from_adapter(reference, scale)
                              if rank_aggregation == "flexlora" else reference)
        else:
            rule = RobustRule(aggregation, trim_fraction, global_rank=self.r_max)
        super().__init__(reference=reference, clients_per_round=coordinator.cfg.federation.clients_per_round,
                         min_clients=min_clients, seed=seed, max_examples=max_examples, rule=rule, seeds=seeds)
        self.coord = coordinator
        self.fleet = FleetServer(reference, rule, rank_aggregation)
        self.r_max = self.fleet.r_max
        self.sent: dict[int, dict[int, int]] = {}  # round -> node id -> device

    # the fleet server holds the global state; these keep the strategy's old surface
    @property
    def global_state(self):
        return self.fleet.global_state

    @global_state.setter
    def global_state(self, value) -> None:
        self.fleet.global_state = value

    def send(self, rank: int) -> AdapterState:
        return self.fleet.send(rank)

    def global_adapter(self) -> AdapterState:
        return self.fleet.global_adapter()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        nodes = sorted(grid.get_node_ids())
        if len(nodes) < self.coord.population:
            raise RuntimeError(f"{len(nodes)} virtual nodes for a population of {self.coord.population}")
        devices = self.coord.cohort(server_round)
        self.stats[server_round] = RoundStats(sampled=len(devices))
        self.current = self.global_adapter()
        by_rank: dict[int, ArrayRecord] = {}
        self.fleet.new_round()
        messages, sent = [], {}
        for d in devices:
            task = self.coord.task(d, server_round)
            if task.rank not in by_rank:
                by_rank[task.rank] = state_to_arrays(self.fleet.sent_for(task.rank))
            cfg = ConfigRecord({**dict(config), **task.to_wire()})
            record = RecordDict({ARRAYS_KEY: by_rank[task.rank], CONFIG_KEY: cfg})
            messages += list(self._construct_messages(record, [nodes[d]], MessageType.TRAIN))
            sent[nodes[d]] = d
        self.sent[server_round] = sent
        log.info("round %d: %d devices online and sampled", server_round, len(devices))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        stats = self.stats.setdefault(server_round, RoundStats())
        stats.mark("replies_in")
        sent = self.sent.get(server_round, {})
        # 1. decode and validate every reply (errors and rejections are counted here)
        finished: dict[int, float] = {}
        valid: dict[int, tuple[Reply, Message]] = {}
        failed = []
        for msg in replies:
            device = sent.get(msg.metadata.src_node_id)
            if msg.has_error():
                stats.failed += 1
                if device is not None:
                    failed.append(device)
                continue
            if (reason := declined_reason(msg)) is not None:  # e.g. too small for its DP budget: sits out
                stats.declined[reason] += 1
                continue
            reply = self._validated(msg, stats, self._reference_for_rank)
            if reply is not None:
                finished[reply.device] = float(msg.content[METRICS_KEY]["sim-seconds"])
                valid[reply.device] = (reply, msg)
        # 2. the fleet coordinator settles the round on the simulated clock (deadline, over-selection)
        accepted = self.coord.settle(server_round, finished, failed)
        # 3. only the replies it accepted are counted and aggregated
        for d in accepted:
            self._count(stats, valid[d][1])
        arrays, metrics = self._aggregate(server_round, stats, [valid[d][0] for d in accepted])
        if arrays is None:
            return None, None
        self.fleet.after(stats.result)
        return state_to_arrays(self.global_adapter()), metrics

    def sent_for(self, metrics: dict) -> AdapterState | None:
        """The adapter sent this round at the replying device's rank (the base of an int8 delta)."""
        return self.fleet.sent_by_rank.get(int(metrics.get("rank", 0)))

    def _reference_for_rank(self, metrics: dict) -> AdapterState:
        return self.fleet.reference_for(int(metrics.get("rank", 0)))
