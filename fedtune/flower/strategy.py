"""Flower's FedAvg over adapter tensors, with a seeded cohort sampler and update validation.

Composition, not a subclass chain: this class only adds (1) a reproducible cohort per round,
(2) validation of every reply before Flower aggregates it (keys, shapes, dtypes, finite values, example
count, reported metrics, the delta's norm bound), (3) per-round statistics that the ServerApp turns into
a metrics.jsonl record, counting failed, declined (ineligible device) and rejected (per reason) replies.
The weighted mean itself is Flower's FedAvg; a robust rule (``aggregator``: median, trimmed mean from
fedtune.aggregation.robust) replaces it when configured.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedtune.aggregation import UpdateRejected, validate_metrics, validate_norm, validate_update
from fedtune.flower.device import declined_reason
from fedtune.flower.records import (
    ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, arrays_to_state, decode_upload, payload_bytes, state_to_arrays,
)
from fedtune.types import AdapterState

log = logging.getLogger(__name__)


@dataclass
class RoundStats:
    sampled: int = 0
    succeeded: int = 0
    failed: int = 0
    rejected: Counter = field(default_factory=Counter)
    declined: Counter = field(default_factory=Counter)  # ineligible devices, by their reason
    upload_bytes: int = 0
    train_loss: float | None = None
    clients: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    skipped: bool = False
    dp: dict = field(default_factory=dict)  # user-level DP figures of the round


class AdapterFedAvg(FedAvg):
    """``user_dp`` (a ``DPFedAvg``) switches to Poisson-sampled cohorts and clipped, noised averaging.
    ``round_offset`` numbers rounds after a resumed checkpoint (Flower counts from 1 on every start)."""

    def __init__(self, *, reference: AdapterState, clients_per_round: int, min_clients: int,
                 seed: int, max_examples: int | None = None, user_dp=None, round_offset: int = 0,
                 max_update_norm: float | None = None, max_train_loss: float | None = None, aggregator=None):
        super().__init__(
            fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients_per_round,
            min_available_nodes=clients_per_round, weighted_by_key="num-examples",
            arrayrecord_key=ARRAYS_KEY, configrecord_key=CONFIG_KEY,
        )
        self.reference = reference
        self.clients_per_round = clients_per_round
        self.min_clients = min_clients
        self.seed = seed
        self.max_examples = max_examples
        self.stats: dict[int, RoundStats] = {}
        self.user_dp = user_dp
        self.round_offset = round_offset
        self.current: AdapterState | None = None  # the global adapter sent this round
        self.max_update_norm = max_update_norm
        self.max_train_loss = max_train_loss
        self.aggregator = aggregator  # None: Flower's example-weighted FedAvg
        self.prior_totals: dict | None = None  # failed/rejected/declined counts before a resume (checkpoint)

    def sample(self, server_round: int, node_ids: list[int]) -> list[int]:
        """A seeded cohort: the same seed and population give the same cohorts."""
        rng = random.Random(self.seed * 1_000_003 + server_round)
        k = min(self.clients_per_round, len(node_ids))
        return sorted(rng.sample(sorted(node_ids), k))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        if self.user_dp is not None:
            nodes = sorted(grid.get_node_ids())  # device i <-> i-th node; Poisson over devices
            node_ids = [nodes[i] for i in self.user_dp.sample(server_round) if i < len(nodes)]
        else:
            node_ids = self.sample(server_round, list(grid.get_node_ids()))
        self.current = arrays_to_state(arrays)
        self.stats[server_round] = RoundStats(sampled=len(node_ids))
        config["server-round"] = server_round
        record = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config})
        log.info("round %d: sampled %d clients", server_round, len(node_ids))
        return self._construct_messages(record, node_ids, MessageType.TRAIN)

    def _validated(self, msg: Message, stats: RoundStats, reference_for=None
                   ) -> tuple[AdapterState, dict] | None:
        """The reply's adapter state and metrics if it may be aggregated; else count why not.

        ``reference_for(metrics)`` gives the adapter the reply must match (default: the global one);
        the returned metrics carry the reply's wire size under ``_bytes``.
        """
        try:
            content = msg.content
            if ARRAYS_KEY not in content.array_records or METRICS_KEY not in content.metric_records:
                raise UpdateRejected("malformed", "reply lacks the adapter arrays or the metrics")
            arrays, metrics = content[ARRAYS_KEY], dict(content[METRICS_KEY])
            reference = self.reference if reference_for is None else reference_for(metrics)
            try:  # an int8 reply is a delta from what this device was sent
                state = decode_upload(arrays, self.sent_for(metrics))
            except ValueError as err:
                raise UpdateRejected("malformed", str(err)) from None
            validate_update(state, reference, float(metrics.get("num-examples", 0)), self.max_examples)
            validate_metrics(metrics, self.max_train_loss)
            if self.max_update_norm is not None:  # the delta against what this device was sent
                sent = self.current if reference_for is None and self.current is not None else reference
                validate_norm(state, sent, self.max_update_norm)
        except UpdateRejected as err:
            stats.rejected[err.reason] += 1
            log.warning("rejected update from node %s: %s", msg.metadata.src_node_id, err)
            return None
        metrics["_bytes"] = payload_bytes(arrays)
        return state, metrics

    def sent_for(self, metrics: dict) -> AdapterState | None:
        """The adapter the replying device was sent this round (the base of an int8 delta)."""
        return self.current

    @staticmethod
    def _count(stats: RoundStats, metrics: dict) -> None:
        stats.upload_bytes += metrics["_bytes"]
        stats.clients.append({k: v for k, v in metrics.items() if not k.startswith("_")})

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        stats = self.stats.setdefault(server_round, RoundStats())
        good, states = [], []
        for msg in replies:
            if msg.has_error():
                stats.failed += 1
                log.warning("client failed in round %d: %s", server_round, msg.error.reason)
            elif (reason := declined_reason(msg)) is not None:
                stats.declined[reason] += 1
                log.info("node %s declined round %d: %s", msg.metadata.src_node_id, server_round, reason)
            elif (checked := self._validated(msg, stats)) is not None:
                # Flower's FedAvg averages the message's arrays: give it the decoded fp32 adapter
                msg.content = RecordDict({ARRAYS_KEY: state_to_arrays(checked[0]),
                                          METRICS_KEY: msg.content[METRICS_KEY]})
                good.append(msg)
                states.append(checked[0])
                self._count(stats, checked[1])
        stats.succeeded = len(good)
        if len(good) < self.min_clients:
            stats.skipped = True
            log.warning("round %d: only %d valid updates (< min_clients=%d); global adapter unchanged",
                        server_round, len(good), self.min_clients)
            return None, None
        if self.user_dp is not None:
            return self._aggregate_private(server_round, good, states, stats)
        if self.aggregator is not None:
            return self._aggregate_robust(good, states, stats)
        arrays, metrics = super().aggregate_train(server_round, good)
        if metrics is not None and "train-loss" in metrics:
            stats.train_loss = float(metrics["train-loss"])
        return arrays, metrics

    def _aggregate_private(self, server_round: int, good: list[Message], updates: list[AdapterState],
                           stats: RoundStats) -> tuple[ArrayRecord, MetricRecord]:
        """User-level DP: clip each device's delta, noise the sum, fixed denominator (DPFedAvg)."""
        new, info = self.user_dp.aggregate(self.current, updates, server_round)
        stats.dp = info
        weights = [float(m.content[METRICS_KEY]["num-examples"]) for m in good]
        losses = [float(m.content[METRICS_KEY]["train-loss"]) for m in good]
        stats.train_loss = sum(w * x for w, x in zip(weights, losses)) / sum(weights) if weights else None
        return state_to_arrays(new), MetricRecord({"train-loss": stats.train_loss or 0.0})

    def _aggregate_robust(self, good: list[Message], updates: list[AdapterState], stats: RoundStats
                          ) -> tuple[ArrayRecord, MetricRecord]:
        """A configured rule (median, trimmed mean) over the valid updates; the loss is still example-weighted."""
        weights = [float(m.content[METRICS_KEY]["num-examples"]) for m in good]
        losses = [float(m.content[METRICS_KEY]["train-loss"]) for m in good]
        new = self.aggregator(updates, weights)
        stats.train_loss = sum(w * x for w, x in zip(weights, losses)) / sum(weights)
        return state_to_arrays(new), MetricRecord({"train-loss": stats.train_loss})
