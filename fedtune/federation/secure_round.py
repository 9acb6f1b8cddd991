"""Secure aggregation in the round (SecAgg+, ``fedtune.privacy.secagg``): each device masks its own update,
the server side receives masked vectors and, from the survivors' unmask replies, only their sum.

Device side (``device_payload``), on what the device would upload (its upload codec's rounding included):
  - under user-level DP: its delta against the adapter it was sent, clipped to L2 norm C (DP-FedAvg's clip,
    now on the device); the server adds the noise to the unmasked sum (``aggregate.UserLevelDP``);
  - otherwise: ``[w·delta, w·R]`` with w = min(n, n_max) / n_max (its example count over the server's
    published bound), each coordinate clipped to the range R; the sum then carries FedAvg's numerator and
    denominator, so the example counts are not needed in the clear.
Each device quantizes into the protocol's ring with one shared scale (``privacy.secure_aggregation.bits``);
that replaces the upload codec's bytes on the wire.

Server side: one stage driver for both backends (``SecureAggregation.drive`` ->
``privacy.secagg.driver.drive_secure_aggregation``) over a transport: ``run`` hands it the devices as objects
(in process), ``fedtune.flower.secagg_grid`` as Flower messages to the sampled nodes, whose ClientApp keeps
its keys, shares and masked input in its own state (``fedtune.flower.secagg_client``). ``SecAggServer`` sums
the masked inputs and unmasks the survivors' total. What the aggregation pipeline then gets is a ``CohortSum`` and the replies stripped of
their tensors (``metadata_only``): it never holds one device's update. A cohort of fewer than 2, or
dropouts past the threshold, abort the round's secure sum (``CohortSum.total`` is None): no partial sum
is revealed, and the pipeline records the abort.

Validation (keys, shapes, finite values, the norm bound) cannot look inside a masked vector; in a
simulation it still runs on the decoded upload before masking, as the device's own check. A deployed
server relies on the clip and the ring's range instead (a device can only shift the sum by R per value).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from fedtune.federation.aggregate import Reply
from fedtune.types import AdapterState

log = logging.getLogger(__name__)

PROTOCOL = "SecAgg+ (Bell et al. 2020): X25519 pairwise masks, Shamir-shared seeds, dropout threshold"


@dataclass(frozen=True)
class CohortSum:
    """What the server learns from one round of secure aggregation."""

    total: AdapterState | None  # the survivors' summed payloads (user DP) or weighted mean (FedAvg); None: aborted
    survivors: int
    cohort: int
    report: dict = field(default_factory=dict)

    @property
    def aborted(self) -> bool:
        return self.total is None


def metadata_only(replies: Sequence[Reply]) -> list[Reply]:
    """The replies as the server sees them under secure aggregation: counts and figures, no tensors."""
    return [dataclasses.replace(r, state={}) for r in replies]


@dataclass
class SecureAggregation:
    """One SecAgg+ round per server round over the replies of a same-layout cohort."""

    cfg: object  # SecureAggregationConfig
    clip_norm: float | None  # user-level DP's C (device-side L2 clip); None: plain FedAvg payloads
    max_examples: float  # the published example-count bound n_max (FedAvg weights)
    seeds: object  # the run's Seeds: the simulated dropouts and the devices' rounding
    context: bytes = b"fedtune"

    @property
    def value_range(self) -> float:
        return self.clip_norm if self.clip_norm is not None else self.cfg.value_range

    def device_payload(self, current: AdapterState, reply: Reply, layout):
        """What one device feeds into the protocol (float vector, before its own quantization)."""
        import numpy as np

        from fedtune.privacy.secagg.payload import clipped_delta_payload, weighted_payload

        if self.clip_norm is not None:
            return clipped_delta_payload(current, reply.state, self.clip_norm, layout)
        delta = {k: reply.state[k].float() - current[k].float() for k in current}
        weight = min(float(reply.num_examples), self.max_examples) / self.max_examples
        x = np.clip(layout.flatten(delta), -self.value_range, self.value_range)
        return weighted_payload(x, weight, self.value_range)

    def device_params(self) -> dict:
        """What a device needs to build its payload: public, sent with the round's setup."""
        if self.clip_norm is not None:
            return {"payload": "clipped-delta", "clip-norm": float(self.clip_norm)}
        return {"payload": "weighted", "value-range": float(self.value_range), "max-examples": self.max_examples}

    @classmethod
    def for_device(cls, cfg, params: dict) -> "SecureAggregation":
        """The device's copy, from ``device_params`` (no seeds: a device's rounding is its own)."""
        clip = float(params["clip-norm"]) if params.get("payload") == "clipped-delta" else None
        return cls(cfg, clip, float(params.get("max-examples", 1.0)), seeds=None)

    def run(self, current: AdapterState, replies: Sequence[Reply], server_round: int) -> CohortSum:
        """In process: every device's payload from its reply, the clients as objects (``LocalClients``), the
        simulated dropouts drawn from the run's seeds."""
        from fedtune.privacy.secagg.driver import Dropouts, LocalClients
        from fedtune.privacy.secagg.payload import VectorLayout

        layout = VectorLayout.of(current)
        payloads = {i: self.device_payload(current, r, layout) for i, r in enumerate(replies, start=1)}
        drop = self.seeds.rng("secagg_dropout", server_round)
        gone = frozenset(i for i in payloads if drop.random() < self.cfg.simulated_dropout)
        transport = LocalClients(payloads, Dropouts(before_masked_input=gone), _numpy_rng(self.seeds, server_round))
        return self.drive(current, len(replies), server_round, lambda _setup: transport,
                          {"simulated_dropouts": len(gone)})

    def drive(self, current: AdapterState, n: int, server_round: int, transport_for, extra: dict | None = None
              ) -> CohortSum:
        """One round of the stage driver (``drive_secure_aggregation``) over the transport ``transport_for(setup)``
        returns (in process: ``LocalClients``; Flower: messages to the devices), for a cohort of ``n``."""
        from fedtune.privacy.secagg import SecAggAbort, make_setup
        from fedtune.privacy.secagg.driver import drive_secure_aggregation
        from fedtune.privacy.secagg.payload import VectorLayout, weighted_mean_from_sum

        cfg = self.cfg
        base = {"protocol": "SecAgg+" if cfg.num_neighbours else "SecAgg", "bits": cfg.bits,
                "value_range": self.value_range, "cohort": n, **(extra or {})}
        if n < 2:
            log.warning("secure aggregation, round %d: %d replies, fewer than 2; nothing is summed", server_round, n)
            return CohortSum(None, 0, n, dict(base, aborted=True, reason="fewer than 2 replies"))
        layout = VectorLayout.of(current)
        length = layout.length + (0 if self.clip_norm is not None else 1)  # FedAvg: the weight column
        setup = make_setup(list(range(1, n + 1)), length, self.value_range, bits=cfg.bits,
                           num_neighbours=cfg.num_neighbours, threshold=cfg.threshold,
                           context=self.context + b"/round-%d" % server_round)
        base.update(threshold=setup.threshold, neighbours=setup.num_neighbours, ring_bits=setup.quantizer.ring_bits)
        try:
            out = drive_secure_aggregation(setup, transport_for(setup))
        except SecAggAbort as exc:
            log.warning("secure aggregation, round %d aborted: %s", server_round, exc)
            return CohortSum(None, 0, n, dict(base, aborted=True, reason=str(exc)))
        costs = out.costs.values()
        report = dict(base, aborted=False, survivors=len(out.survivors),
                      uplink_bytes=sum(c.uplink_bytes for c in costs),
                      downlink_bytes=sum(c.downlink_bytes for c in costs),
                      server_seconds=round(sum(c.server_seconds for c in costs), 4),
                      client_seconds=round(sum(c.client_seconds for c in costs), 4))
        total = out.total if self.clip_norm is not None else weighted_mean_from_sum(out.total, self.value_range)
        return CohortSum(layout.unflatten(total), len(out.survivors), n, report)


def _numpy_rng(seeds, server_round: int):
    import numpy as np

    return np.random.default_rng(seeds.derive("secagg_rounding", server_round))
