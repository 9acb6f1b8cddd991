"""Server side of secure aggregation on Flower: a Grid wrapper that turns the strategy's train messages into
one SecAgg+ round over the sampled nodes, and hands the strategy only what the protocol lets it learn.

    strategy.configure_train -> one train message per sampled device (unchanged strategy)
      SecAggGrid.send_and_receive:
        1. the cohort is those devices, ids 1..n in message order; ``SecureAggregation.drive`` (the stage
           driver the in-process backend runs too) sends each stage's requests through ``FlowerStages``:
           ``query.secagg`` messages for keys, shares and unmasking, ``train.secagg`` (the device's train
           content plus its sealed shares) for the masked input (``fedtune.flower.secagg_client``);
        2. the round's ``CohortSum`` (the unmasked sum, or an abort and its reason) is kept for the strategy;
        3. the strategy gets one reply per device: its metrics only (no tensors) if its masked input was
           summed, else its error or decline.
    strategy.aggregate_train <- tensor-free replies + ``sum_for(round)`` -> ``Pipeline.aggregate_secure``

Non-train messages pass through unchanged. Every message a device sends back is kept in ``received`` only
when ``keep_received`` is set (tests inspect it: masked vectors, never an update).
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, RecordDict

from fedtune.federation.secure_round import CohortSum, SecureAggregation
from fedtune.flower import secagg_records as rec
from fedtune.flower.device import declined_reason
from fedtune.flower.records import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, arrays_to_state, pass_through_non_train
from fedtune.flower.secagg_client import PARAMS_KEY, SECAGG_QUERY, SECAGG_TRAIN
from fedtune.privacy.secagg.driver import STAGES


class FlowerStages:
    """The stage transport over a Flower grid for one round's cohort (``train``: the strategy's messages)."""

    def __init__(self, grid, train: list[Message], params: dict, timeout: float | None, received: list | None):
        self.grid, self.params, self.timeout, self.received = grid, params, timeout, received
        self.train = dict(enumerate(train, start=1))  # cohort id -> the strategy's train message
        self.cid_of = {m.metadata.dst_node_id: c for c, m in self.train.items()}
        if len(self.cid_of) != len(train):
            raise ValueError("secure aggregation on Flower needs one sampled device per node; a node got "
                             f"{len(train) - len(self.cid_of) + 1} train messages")
        self.outcome: dict[int, Message] = {}  # cohort id -> what the strategy gets

    def _message(self, stage: str, cid: int, request) -> Message:
        content = rec.to_record(request)
        if stage == STAGES[0]:
            content[PARAMS_KEY] = ConfigRecord({**self.params, "cid": cid})
        if stage == STAGES[2]:  # the device trains now: the adapter and its task travel with its shares
            content[ARRAYS_KEY] = self.train[cid].content[ARRAYS_KEY]
            content[CONFIG_KEY] = self.train[cid].content[CONFIG_KEY]
        kind = SECAGG_TRAIN if stage == STAGES[2] else SECAGG_QUERY
        return Message(content=content, dst_node_id=self.train[cid].metadata.dst_node_id, message_type=kind)

    def __call__(self, stage: str, requests: dict[int, object]) -> dict[int, object]:
        messages = [self._message(stage, c, r) for c, r in requests.items()]
        out = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            cid = self.cid_of.get(reply.metadata.src_node_id)
            if cid is None or cid not in requests:
                continue
            if self.received is not None:
                self.received.append(reply)
            sent = self.train[cid]
            if reply.has_error() or declined_reason(reply) is not None or rec.CONFIG_KEY not in reply.content:
                if cid not in self.outcome:  # it dropped out here; the strategy counts its error or decline
                    self.outcome[cid] = (Message(reply.error, reply_to=sent) if reply.has_error()
                                         else Message(reply.content, reply_to=sent))
                continue
            out[cid] = rec.from_record(reply.content)
            if stage == STAGES[2]:  # summed from here on: the strategy gets its metrics, never its vector
                self.outcome[cid] = Message(RecordDict({METRICS_KEY: reply.content[METRICS_KEY]}), reply_to=sent)
        return out


class SecAggGrid:
    """Wraps a Flower Grid (composition): train messages become a SecAgg+ round, the rest pass through."""

    def __init__(self, grid, secure: SecureAggregation, keep_received: bool = False):
        self.grid, self.secure = grid, secure
        self.sums: dict[int, CohortSum] = {}
        self.received: list[Message] | None = [] if keep_received else None

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def sum_for(self, server_round: int) -> CohortSum:
        if server_round not in self.sums:
            raise RuntimeError(f"secure aggregation: no cohort sum for round {server_round}; the strategy's train "
                               "messages must go through SecAggGrid.send_and_receive")
        return self.sums.pop(server_round)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        train, replies = pass_through_non_train(self.grid, messages, timeout)
        if not train:
            return replies
        current = arrays_to_state(train[0].content[ARRAYS_KEY])
        server_round = int(train[0].content[CONFIG_KEY]["server-round"])
        stages = FlowerStages(self.grid, train, self.secure.device_params(), timeout, self.received)
        self.sums[server_round] = self.secure.drive(current, len(train), server_round, lambda _setup: stages)
        return replies + [stages.outcome[c] for c in sorted(stages.outcome)]
