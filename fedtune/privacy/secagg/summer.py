"""A masked-sum "summer" for the server's aggregation pipeline: clipped deltas in, their sum out, through a
full SecAgg+ round in process (``fedtune.federation.aggregate``'s ``Summer`` hook: a callable
``(clipped: list[AdapterState], template) -> AdapterState``).

In a simulation the clipped deltas exist in one process anyway; what this runs is the protocol itself
(every device's quantization, masks, shares and the server's unmasking), so the sum the pipeline noises is
exactly the one a deployed server would get, with its rounding, and each round's protocol cost is recorded.
A cohort too small for the threshold (fewer than 2 replies, or dropouts past it) contributes nothing:
the sum is zero and the round is reported as aborted; no individual update is revealed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from fedtune.privacy.secagg.driver import Dropouts, SecAggOutcome, make_setup, run_secure_aggregation
from fedtune.privacy.secagg.messages import SecAggAbort
from fedtune.privacy.secagg.payload import VectorLayout
from fedtune.types import AdapterState

log = logging.getLogger(__name__)


@dataclass
class SecureSummer:
    clip_norm: float  # the quantizer's range: a delta clipped to L2 norm C has every coordinate in [-C, C]
    bits: int = 8
    num_neighbours: int | None = None  # None: SecAgg (everyone); else SecAgg+ on a ring
    threshold: float = 0.5
    context: bytes = b"fedtune"
    rounds: int = field(default=0, init=False)
    last: SecAggOutcome | None = field(default=None, init=False)
    last_aborted: bool = field(default=False, init=False)

    def __call__(self, clipped: list[AdapterState], template: AdapterState,
                 dropouts: Dropouts = Dropouts()) -> AdapterState:
        self.rounds += 1
        layout = VectorLayout.of(template)
        zeros = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in template.items()}
        self.last, self.last_aborted = None, False
        if len(clipped) < 2:
            self.last_aborted = True
            log.warning("secure aggregation: %d replies, fewer than 2; the round's sum is zero", len(clipped))
            return zeros
        ids = list(range(1, len(clipped) + 1))
        setup = make_setup(ids, layout.length, self.clip_norm, bits=self.bits, num_neighbours=self.num_neighbours,
                           threshold=self.threshold, context=self.context + b"/%d" % self.rounds)
        try:
            self.last = run_secure_aggregation(setup, {i: layout.flatten(c) for i, c in zip(ids, clipped)},
                                               dropouts)
        except SecAggAbort as exc:
            self.last_aborted = True
            log.warning("%s; the round's sum is zero", exc)
            return zeros
        return layout.unflatten(self.last.total)

    def report(self) -> dict[str, float]:
        """This round's protocol figures, for the round's metrics."""
        if self.last is None:
            return {"secagg_aborted": float(self.last_aborted)}
        costs = self.last.costs.values()
        return {"secagg_aborted": 0.0, "secagg_survivors": float(len(self.last.survivors)),
                "secagg_uplink_bytes": float(sum(c.uplink_bytes for c in costs)),
                "secagg_downlink_bytes": float(sum(c.downlink_bytes for c in costs)),
                "secagg_server_seconds": sum(c.server_seconds for c in costs)}
