"""The server's aggregation pipeline, composed from small wrappers (no subclass chain, no Flower).

    replies (decoded, validated: ``fedtune.federation.replies``)
      -> [UserLevelDP: clip each delta to C, sum through ``summer``, add N(0, (σC)²), divide by qN]
      -> rule: FedAvg (example-weighted) | median | trimmed mean | heterogeneous ranks (FlexLoRA / zero-pad)

``Pipeline.aggregate`` returns an ``Aggregated``: the new global adapter, what the round's figures are and
``applied``, the list of mechanisms that actually ran (each a ``Mechanism`` with its own report). The
privacy label of the round is computed from ``applied`` (``fedtune.federation.labels``), never from config.

Too few replies: without user-level DP a round with fewer than ``min_replies`` valid replies leaves the
global adapter unchanged (``skipped``). Under user-level DP there is no such skip: DP-FedAvg runs on
whatever arrived (a missing device contributes a zero delta; the fixed denominator qN already covers
that), so every round is noised and charged to the ledger whatever the number of replies, and no single
user can decide whether the adapter moves.

Secure aggregation (``privacy.secure_aggregation``): ``Pipeline.aggregate_secure`` takes replies without
tensors and the round's ``secure_round.CohortSum`` (what SecAgg+ unmasked), never an individual update;
user-level DP noises that sum (``DPFedAvg.aggregate``'s ``summer`` hook), plain FedAvg reads its weighted
mean from it. ``UserLevelDP.summer`` also takes any ``Summer`` (clipped deltas -> their sum) directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from fedtune.types import AdapterState


@dataclass(frozen=True)
class Reply:
    """One device's decoded and validated update."""

    device: int
    state: AdapterState
    num_examples: float
    train_loss: float | None  # None: withheld by the device (``reply_figures: minimal``)
    rank: int = 0
    epsilon: float | None = None  # the device's sample-level ε, as its own ledger reports it
    delta: float | None = None


@dataclass(frozen=True)
class Mechanism:
    """A mechanism that ran this round, as reported by the object that applied it."""

    name: str  # "fedavg", "median", "trimmed_mean", "flexlora", "zeropad", "user_level_dp"
    report: dict = field(default_factory=dict)


@dataclass
class Aggregated:
    state: AdapterState | None  # None: the global adapter is unchanged (a skipped round)
    applied: list[Mechanism]
    figures: dict = field(default_factory=dict)
    skipped: bool = False


class Rule(Protocol):
    """Combines replies into the new global adapter."""

    name: str

    def __call__(self, current: AdapterState, replies: Sequence[Reply]) -> AdapterState: ...


Summer = Callable[[list[AdapterState], AdapterState], AdapterState]


def plain_sum(clipped: list[AdapterState], template: AdapterState) -> AdapterState:
    """Σ clipped, key by key (fp32); zeros shaped like ``template`` when nothing arrived."""
    out = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in template.items()}
    for state in clipped:
        for k in out:
            out[k] += state[k].float()
    return out


@dataclass
class FedAvgRule:
    name: str = "fedavg"

    def __call__(self, current: AdapterState, replies: Sequence[Reply]) -> AdapterState:
        from fedtune.aggregation import weighted_average

        return weighted_average([r.state for r in replies], [r.num_examples for r in replies])


@dataclass
class RobustRule:
    """Median / trimmed mean (``fedtune.aggregation.robust``). In a fleet the replies must share one rank;
    their result is zero-padded back to the global rank (``same-rank tiers``)."""

    name: str
    trim_fraction: float = 0.1
    global_rank: int | None = None  # a fleet's r_max; None: no fleet
    impl: object | None = None  # an aggregator object (default: create_aggregator(name, trim_fraction))

    def __call__(self, current: AdapterState, replies: Sequence[Reply]) -> AdapterState:
        from fedtune.aggregation import create_aggregator, zero_pad_rank

        rule = self.impl or create_aggregator(self.name, trim_fraction=self.trim_fraction)
        if self.global_rank is None:
            return rule([r.state for r in replies], [r.num_examples for r in replies])
        ranks = sorted({r.rank for r in replies})
        if len(ranks) != 1:
            raise ValueError(f"federation.aggregation={self.name} in a fleet needs every tier at one LoRA rank; "
                             f"this round's replies have ranks {ranks}; give the tiers one rank or use fedavg")
        out = rule([r.state for r in replies], [r.num_examples for r in replies])
        if ranks[0] == self.global_rank:
            return out
        if not any("lora_B" in k for k in out):  # FedSA's shared A: pad its rows
            return zeropad_rows([out], [1.0], current)
        return zero_pad_rank(out, self.global_rank)


@dataclass
class HeteroRule:
    """A fleet's rank aggregation (FlexLoRA / zero-pad) over replies of different ranks; keeps its own
    global state (FlexLoRA keeps the B·A products)."""

    name: str
    global_state: object  # AdapterState (zeropad) or FlexLoRAState

    def __call__(self, current: AdapterState, replies: Sequence[Reply]) -> AdapterState:
        from fedtune.aggregation import FlexLoRAState, create_hetero_aggregator, lora_rank

        if self.name == "zeropad" and not any("lora_B" in k for k in current):  # FedSA: only A is shared
            self.global_state = zeropad_rows([r.state for r in replies], [r.num_examples for r in replies],
                                             current)
            return self.global_state
        hetero = create_hetero_aggregator(self.name)
        self.global_state = hetero.aggregate(self.global_state, [r.state for r in replies],
                                             [r.num_examples for r in replies], [r.rank for r in replies])
        if isinstance(self.global_state, FlexLoRAState):
            return self.global_state.to_adapter(lora_rank(current))  # the rank-r_max truncated SVD
        return self.global_state


def zeropad_rows(states: list[AdapterState], weights: list[float], template: AdapterState) -> AdapterState:
    """Zero-padding for FedSA's shared part in a fleet: each A [r_k, d_in] padded with zero rows to the
    global rank, then the example-weighted mean (the zero-pad baseline, on A alone)."""
    total = float(sum(weights))
    out = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in template.items()}
    for state, w in zip(states, weights):
        for k, a in state.items():
            out[k][: a.shape[0]] += a.float() * (w / total)
    return out


@dataclass
class UserLevelDP:
    """DP-FedAvg (``fedtune.privacy.dp_fedavg.DPFedAvg``) around a summer: clip, sum, noise, fixed denominator.

    It replaces the averaging rule (its output is already the noisy mean of the clipped deltas).
    """

    dp: object  # DPFedAvg: plan, ledger, secret or simulated seeds
    summer: Summer | None = None  # None: plain addition (``plain_sum``); a masked sum plugs in here
    sampler_kind: str = "poisson"

    def __call__(self, current: AdapterState, replies: Sequence[Reply], server_round: int
                 ) -> tuple[AdapterState, dict]:
        return self.dp.aggregate(current, [r.state for r in replies], server_round, summer=self.summer)

    def report(self) -> dict:
        plan, ledger, cfg = self.dp.plan, self.dp.ledger, self.dp.cfg
        return {"level": "user", "epsilon": ledger.epsilon(), "delta": plan.delta,
                "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate,
                "clip_norm": cfg.clip_norm, "accountant": cfg.accountant, "rounds_charged": len(ledger.history),
                "sampler": self.sampler_kind, "randomness": self.dp.seeds.mode,
                "noise_generator": getattr(self.dp, "noise_generator", None)}


@dataclass
class Pipeline:
    rule: Rule
    min_replies: int = 1
    user_dp: UserLevelDP | None = None

    def aggregate(self, current: AdapterState, replies: Sequence[Reply], server_round: int) -> Aggregated:
        figures = {"train_loss": _weighted_loss(replies)}
        if self.user_dp is not None:  # every round is noised and charged, whatever arrived
            new, info = self.user_dp(current, replies, server_round)
            figures.update(info)
            return Aggregated(new, [Mechanism("user_level_dp", self.user_dp.report())], figures)
        if len(replies) < self.min_replies:
            return Aggregated(None, [], figures, skipped=True)
        return Aggregated(self.rule(current, replies), [Mechanism(self.rule.name)], figures)


    def aggregate_secure(self, current: AdapterState, replies: Sequence[Reply], cohort_sum, server_round: int
                         ) -> Aggregated:
        """Secure aggregation: ``replies`` carry no tensors (``secure_round.metadata_only``), ``cohort_sum`` is
        all the server learned (a ``secure_round.CohortSum``). Under user-level DP the noise goes onto the
        unmasked sum (an aborted sum counts as zero: the round is still noised and charged); otherwise the
        sum already is FedAvg's weighted mean delta, and an aborted or too small round is skipped."""
        if any(r.state for r in replies):
            raise ValueError("secure aggregation: the server-side pipeline was handed an individual update; pass "
                             "the replies through secure_round.metadata_only")
        figures = {"train_loss": _weighted_loss(replies)}
        secure = Mechanism("secure_aggregation", dict(cohort_sum.report))
        if self.user_dp is not None:
            total = cohort_sum.total or {k: torch.zeros_like(v, dtype=torch.float32) for k, v in current.items()}
            new, info = self.user_dp.dp.aggregate(current, [], server_round, summer=lambda _clipped, _t: total)
            figures.update({k: v for k, v in info.items() if k not in ("update_norm_median", "clipped_fraction")})
            return Aggregated(new, [secure, Mechanism("user_level_dp", self.user_dp.report())], figures)
        if cohort_sum.aborted or cohort_sum.survivors < self.min_replies:
            return Aggregated(None, [secure], figures, skipped=True)
        new = {k: current[k].float() + cohort_sum.total[k] for k in current}
        return Aggregated(new, [secure, Mechanism("fedavg")], figures)


def _weighted_loss(replies: Sequence[Reply]) -> float | None:
    """The example-weighted train loss of the replies that report one (None if none does)."""
    reported = [r for r in replies if r.train_loss is not None]
    total = sum(r.num_examples for r in reported)
    return sum(r.num_examples * r.train_loss for r in reported) / total if total > 0 else None


def build_rule(cfg, reference: AdapterState) -> Rule:
    """The averaging rule a config asks for (fleet: heterogeneous ranks, robust rules on same-rank tiers)."""
    fed = cfg.federation
    if cfg.fleet.enabled:
        from fedtune.aggregation import FlexLoRAState

        if fed.aggregation != "fedavg":
            from fedtune.federation.fleet_server import rank_of

            return RobustRule(fed.aggregation, fed.trim_fraction, global_rank=rank_of(reference))
        ra = cfg.fleet.rank_aggregation
        scale = cfg.adapter.alpha / cfg.adapter.rank
        return HeteroRule(ra, FlexLoRAState.from_adapter(reference, scale) if ra == "flexlora" else reference)
    if fed.aggregation != "fedavg":
        return RobustRule(fed.aggregation, fed.trim_fraction)
    return FedAvgRule()
