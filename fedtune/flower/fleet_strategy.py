"""FedAvg for a heterogeneous fleet: per-device tasks and ranks, deadlines, exact rank aggregation.

Each round (numbers match the ServerApp's loop):
  4a. the FleetCoordinator picks online devices (cohort + over-selection) on the simulated clock;
  4b. each device gets the global adapter at its tier's rank (``send``) and a task sized by its plan;
  4c. replies are validated against the global adapter at that rank; failures count as dropouts,
      replies past the deadline as stragglers, extra finishers beyond the cohort are dropped;
  4d. the accepted updates are combined by the configured rank aggregator (FlexLoRA: exact weighted
      mean of B·A; zero-padding: the cheap baseline) and the clock advances by the round's duration.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedtune.aggregation import FlexLoRAState, create_hetero_aggregator, lora_rank, truncate_rank
from fedtune.aggregation.validate import UpdateRejected
from fedtune.flower.fleet import FleetCoordinator
from fedtune.flower.records import ARRAYS_KEY, CONFIG_KEY, arrays_to_state, state_to_arrays
from fedtune.flower.strategy import AdapterFedAvg, RoundStats
from fedtune.types import AdapterState

log = logging.getLogger(__name__)


def fill_dead_components(state: AdapterState, init: AdapterState) -> AdapterState:
    """Rows of A that are all zero (no signal yet) get the seeded initial A, so LoRA can train them.

    Their B columns are zero as well, so the adapter's product B·A is unchanged.
    """
    out = dict(state)
    for key, a in state.items():
        if "lora_A" not in key:
            continue
        dead = a.norm(dim=1) == 0  # [r]
        if dead.any():
            a = a.clone()
            a[dead] = init[key][: a.shape[0]][dead]
            out[key] = a
    return out


class FleetFedAvg(AdapterFedAvg):
    def __init__(self, *, reference: AdapterState, coordinator: FleetCoordinator, rank_aggregation: str,
                 scale: float, min_clients: int, seed: int, max_examples: int | None = None):
        super().__init__(reference=reference, clients_per_round=coordinator.cfg.federation.clients_per_round,
                         min_clients=min_clients, seed=seed, max_examples=max_examples)
        self.coord = coordinator
        self.r_max = lora_rank(reference)
        self.hetero = create_hetero_aggregator(rank_aggregation)
        self.global_state = (FlexLoRAState.from_adapter(reference, scale) if rank_aggregation == "flexlora"
                             else reference)
        self.sent: dict[int, dict[int, int]] = {}  # round -> node id -> device
        self._factored: tuple[object, AdapterState] | None = None  # (global state, its rank-r_max SVD)
        self.sent_by_rank: dict[int, AdapterState] = {}  # this round's adapter per rank (int8 deltas decode on it)

    def send(self, rank: int) -> AdapterState:
        """The global adapter at ``rank``. For FlexLoRA, the rank-r truncated SVD equals the first r
        components of the rank-r_max one, so one SVD per round serves every tier."""
        if isinstance(self.global_state, FlexLoRAState):
            state = truncate_rank(self.global_adapter(), rank)
        else:
            state = self.hetero.send(self.global_state, rank)
        return fill_dead_components(state, self.reference)

    def global_adapter(self) -> AdapterState:
        if isinstance(self.global_state, FlexLoRAState):
            if self._factored is None or self._factored[0] is not self.global_state:
                self._factored = (self.global_state, self.global_state.to_adapter(self.r_max))
            return self._factored[1]
        return self.global_state

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        nodes = sorted(grid.get_node_ids())
        if len(nodes) < self.coord.population:
            raise RuntimeError(f"{len(nodes)} virtual nodes for a population of {self.coord.population}")
        devices = self.coord.cohort(server_round)
        self.stats[server_round] = RoundStats(sampled=len(devices))
        by_rank: dict[int, ArrayRecord] = {}
        self.sent_by_rank = {}
        messages, sent = [], {}
        for d in devices:
            task = self.coord.task(d)
            rank = task["rank"]
            if rank not in by_rank:
                by_rank[rank] = state_to_arrays(self.send(rank))
                self.sent_by_rank[rank] = arrays_to_state(by_rank[rank])
            cfg = ConfigRecord({**dict(config), **task, "server-round": server_round})
            record = RecordDict({ARRAYS_KEY: by_rank[rank], CONFIG_KEY: cfg})
            messages += list(self._construct_messages(record, [nodes[d]], MessageType.TRAIN))
            sent[nodes[d]] = d
        self.sent[server_round] = sent
        log.info("round %d: %d devices online and sampled", server_round, len(devices))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        stats = self.stats.setdefault(server_round, RoundStats())
        sent = self.sent.get(server_round, {})
        finished: dict[int, float] = {}
        valid: dict[int, tuple[AdapterState, dict]] = {}
        failed = []
        for msg in replies:
            device = sent.get(msg.metadata.src_node_id)
            if msg.has_error():
                stats.failed += 1
                if device is not None:
                    failed.append(device)
                continue
            checked = self._validated(msg, stats, self._reference_for_rank)
            if checked is None:
                continue
            state, metrics = checked
            device = int(metrics["device"])
            finished[device] = float(metrics["sim-seconds"])
            valid[device] = (state, metrics)
        accepted = self.coord.settle(server_round, finished, failed)
        stats.succeeded = len(accepted)
        for d in accepted:
            self._count(stats, valid[d][1])
        if len(accepted) < self.min_clients:
            stats.skipped = True
            log.warning("round %d: %d accepted updates (< min_clients=%d); global adapter unchanged",
                        server_round, len(accepted), self.min_clients)
            return None, None
        updates = [valid[d][0] for d in accepted]
        weights = [float(valid[d][1]["num-examples"]) for d in accepted]
        ranks = [int(valid[d][1]["rank"]) for d in accepted]
        self.global_state = self.hetero.aggregate(self.global_state, updates, weights, ranks)
        losses = [float(valid[d][1]["train-loss"]) for d in accepted]
        stats.train_loss = sum(w * x for w, x in zip(weights, losses)) / sum(weights)
        return state_to_arrays(self.global_adapter()), MetricRecord({"train-loss": stats.train_loss})

    def sent_for(self, metrics: dict) -> AdapterState | None:
        """The adapter sent this round at the replying device's rank (the base of an int8 delta)."""
        return self.sent_by_rank.get(int(metrics.get("rank", 0)))

    def _reference_for_rank(self, metrics: dict) -> AdapterState:
        """A reply must match the global adapter at the rank its device was given."""
        rank = int(metrics.get("rank", 0))
        if not 0 < rank <= self.r_max:
            raise UpdateRejected("bad_rank", f"rank {rank} outside 1..{self.r_max}")
        return truncate_rank(self.reference, rank)
