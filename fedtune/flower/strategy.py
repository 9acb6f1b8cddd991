"""Flower's FedAvg loop over the federation engine: message translation around sampler and pipeline.

Flower's ``FedAvg.start`` drives the rounds; this class only (1) asks the engine's sampler
(``fedtune.federation.sampler``) for the round's cohort and sends each device the global adapter and its
typed task (``TaskPlan`` as a ConfigRecord), (2) turns each reply into a decoded, validated ``Reply``
(``fedtune.federation.replies``), counting failed, declined (ineligible device) and rejected (per reason)
replies, and (3) hands the valid ones to the aggregation pipeline (``fedtune.federation.aggregate``:
user-level DP-FedAvg | FedAvg | median | trimmed mean), whose ``applied`` mechanisms label the round.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedtune.aggregation import UpdateRejected
from fedtune.federation.aggregate import FedAvgRule, Pipeline, Reply, RobustRule, UserLevelDP
from fedtune.federation.recorder import RoundStats  # noqa: F401 (re-exported)
from fedtune.federation.replies import ReplyLimits, accept_reply
from fedtune.federation.sampler import PoissonSampler, UniformSampler
from fedtune.federation.seeds import Seeds
from fedtune.flower.device import declined_reason
from fedtune.flower.records import (
    ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, arrays_to_state, arrays_to_tensors, payload_bytes, state_to_arrays,
)
from fedtune.types import AdapterState

log = logging.getLogger(__name__)


class AdapterFedAvg(FedAvg):
    """Built from the engine's ``ServerSetup`` by ``fedtune.flower.server_app.strategy_for`` (or directly, in
    tests): ``user_dp`` (a ``DPFedAvg``) wraps the pipeline in user-level DP-FedAvg over Poisson-sampled
    cohorts; ``rule`` (or ``aggregator``, a robust rule) replaces FedAvg; ``sampler`` the default sampler. ``round_offset`` numbers rounds after a resumed
    checkpoint (Flower counts from 1 on every start). ``seeds``: the run's seeds (secret when deployed)."""

    def __init__(self, *, reference: AdapterState, clients_per_round: int, min_clients: int,
                 seed: int, max_examples: int | None = None, user_dp=None, round_offset: int = 0,
                 max_update_norm: float | None = None, max_train_loss: float | None = None, aggregator=None,
                 seeds: Seeds | None = None, rule=None, sampler=None):
        super().__init__(
            fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients_per_round,
            min_available_nodes=clients_per_round, weighted_by_key="num-examples",
            arrayrecord_key=ARRAYS_KEY, configrecord_key=CONFIG_KEY,
        )
        self.reference = reference
        self.clients_per_round = clients_per_round
        self.min_clients = min_clients
        self.seed = seed
        self.seeds = seeds or Seeds.simulated(seed)
        self.limits = ReplyLimits(max_examples, max_update_norm, max_train_loss)
        self.stats: dict[int, RoundStats] = {}
        self.user_dp = user_dp
        self.round_offset = round_offset
        self.current: AdapterState | None = None  # the global adapter sent this round
        self.aggregator = aggregator
        if rule is None:
            rule = FedAvgRule() if aggregator is None else RobustRule(aggregator.name, impl=aggregator)
        wrapper = UserLevelDP(user_dp) if user_dp is not None else None
        self.pipeline = Pipeline(rule=rule, min_replies=min_clients, user_dp=wrapper)
        if sampler is None:
            sampler = (PoissonSampler(user_dp.seeds, user_dp.plan.sample_rate) if user_dp is not None
                       else UniformSampler(self.seeds, clients_per_round))
        self.sampler = sampler
        self.prior_totals: dict | None = None  # failed/rejected/declined counts before a resume (checkpoint)
        self.secure = None  # a ``SecAggGrid``: replies carry metrics only, the round's sum comes from it

    def sample(self, server_round: int, node_ids: list[int]) -> list[int]:
        """The engine's cohort, as node ids (device i <-> the i-th node in sorted order)."""
        nodes = sorted(node_ids)
        return [nodes[i] for i in self.sampler.sample(server_round, len(nodes))]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        nodes = sorted(grid.get_node_ids())
        devices = self.sampler.sample(server_round, len(nodes))
        self.current = arrays_to_state(arrays)
        self.stats[server_round] = RoundStats(sampled=len(devices))
        config["server-round"] = server_round
        log.info("round %d: sampled %d clients", server_round, len(devices))
        messages = []
        for d in devices:  # a simulated node trains device i = its index (a real device ignores it)
            record = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: ConfigRecord({**dict(config), "device-index": d})})
            messages += list(self._construct_messages(record, [nodes[d]], MessageType.TRAIN))
        self.stats[server_round].mark("sent")
        return messages

    def _validated(self, msg: Message, stats: RoundStats, reference_for=None) -> Reply | None:
        """The reply, decoded and validated, if it may be aggregated; else count why not (``stats.rejected``).

        ``reference_for(metrics)`` gives the adapter the reply must match (default: the global one).
        A valid reply is not counted here: ``_count`` does that once the caller keeps it.
        """
        try:
            content = msg.content
            if ARRAYS_KEY not in content.array_records or METRICS_KEY not in content.metric_records:
                raise UpdateRejected("malformed", "reply lacks the adapter arrays or the metrics")
            arrays, metrics = content[ARRAYS_KEY], dict(content[METRICS_KEY])
            reference = self.reference if reference_for is None else reference_for(metrics)
            sent = self.sent_for(metrics)
            if reference_for is not None and sent is None:
                sent = reference
            try:
                payload = arrays_to_tensors(arrays)
            except ValueError as err:  # a flat record whose layout does not add up, a corrupt .npy header
                raise UpdateRejected("malformed", str(err)) from None
            return accept_reply(payload, metrics, sent=sent, reference=reference,
                                limits=self.limits, device=msg.metadata.src_node_id)
        except UpdateRejected as err:
            stats.rejected[err.reason] += 1
            log.warning("rejected update from node %s: %s", msg.metadata.src_node_id, err)
            return None

    @staticmethod
    def _count(stats: RoundStats, msg: Message) -> None:
        """Count a reply that is aggregated: its upload bytes and its per-client metrics."""
        stats.upload_bytes += payload_bytes(msg.content[ARRAYS_KEY])
        stats.clients.append(dict(msg.content[METRICS_KEY]))

    def sent_for(self, metrics: dict) -> AdapterState | None:
        """The adapter the replying device was sent this round (the base of an int8 delta)."""
        return self.current

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        stats = self.stats.setdefault(server_round, RoundStats())
        stats.mark("replies_in")
        # one reply at a time: checked on threads, the per-tensor ops convoyed on the GIL (3x slower; benchmarks.md)
        good: list[Reply] = []
        for msg in replies:
            if msg.has_error():
                stats.failed += 1
                log.warning("client failed in round %d: %s", server_round, msg.error.reason)
            elif (reason := declined_reason(msg)) is not None:
                stats.declined[reason] += 1
                log.info("node %s declined round %d: %s", msg.metadata.src_node_id, server_round, reason)
            elif self.secure is not None:
                good.append(self._metadata(msg, stats))
            elif (reply := self._validated(msg, stats)) is not None:
                self._count(stats, msg)
                good.append(reply)
        stats.mark("checked")
        if self.secure is not None:
            return self._aggregate_secure(server_round, stats, good)
        return self._aggregate(server_round, stats, good)

    def _metadata(self, msg: Message, stats: RoundStats) -> Reply:
        """Under secure aggregation: a summed device's figures, no tensors (there are none to read)."""
        metrics = dict(msg.content[METRICS_KEY])
        stats.clients.append(metrics)
        loss = float(metrics.get("train-loss", -1.0))
        return Reply(device=int(metrics.get("device", msg.metadata.src_node_id)), state={},
                     num_examples=float(metrics.get("num-examples", 0)), train_loss=loss if loss >= 0 else None)

    def _aggregate_secure(self, server_round: int, stats: RoundStats, good: list[Reply]
                          ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        current = self.current if self.current is not None else self.reference
        cohort_sum = self.secure.sum_for(server_round)
        stats.upload_bytes += int(cohort_sum.report.get("uplink_bytes", 0))
        stats.extra = {f"secagg_{k}": v for k, v in cohort_sum.report.items()
                       if isinstance(v, (int, float, bool, str))}
        result = self.pipeline.aggregate_secure(current, good, cohort_sum, server_round)
        stats.absorb(result, good)
        if result.skipped:
            log.warning("round %d: secure aggregation summed %d devices (aborted: %s); global adapter unchanged",
                        server_round, cohort_sum.survivors, cohort_sum.aborted)
            return None, None
        return state_to_arrays(result.state), MetricRecord({"train-loss": stats.train_loss or 0.0})

    def _aggregate(self, server_round: int, stats: RoundStats, good: list[Reply]
                   ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        current = self.current if self.current is not None else self.reference
        result = self.pipeline.aggregate(current, good, server_round)
        stats.absorb(result, good)
        stats.mark("aggregated")
        if result.skipped:
            log.warning("round %d: only %d valid updates (< min_clients=%d); global adapter unchanged",
                        server_round, len(good), self.min_clients)
            return None, None
        return state_to_arrays(result.state), MetricRecord({"train-loss": stats.train_loss or 0.0})
