"""A fleet's server side, Flower-free: the global adapter at each tier's rank and the settled replies.

Per round (``fedtune.federation`` steps 2-6 in a fleet):
  2. the ``FleetCoordinator`` picks online devices (cohort + over-selection) on the simulated clock;
  3. each device gets its tier's ``TaskPlan`` and the global adapter at its rank (``send``; one SVD per
     round serves every tier under FlexLoRA);
  5. a reply must match the initial adapter at its device's rank (``reference_for``) and decodes on what
     that rank was sent (``sent_for``); failures count as dropouts, late replies as stragglers, finishers
     beyond the cohort are dropped (``FleetCoordinator.settle``);
  6. the pipeline's rule combines the accepted replies: ``HeteroRule`` (FlexLoRA: the exact weighted mean
     of B·A; zero-padding: the baseline) or, on same-rank tiers, a robust rule (``RobustRule``).
"""

from __future__ import annotations

from fedtune.aggregation import FlexLoRAState, UpdateRejected, create_hetero_aggregator, lora_rank, truncate_rank
from fedtune.federation.aggregate import Aggregated, HeteroRule
from fedtune.types import AdapterState


def shares_only_a(state: AdapterState) -> bool:
    """A split adapter's shared part (FedSA: every lora_A, no lora_B)."""
    return any("lora_A" in k for k in state) and not any("lora_B" in k for k in state)


def rank_of(state: AdapterState) -> int:
    """The LoRA rank of a full adapter, or of a FedSA shared part (the rows of its A factors)."""
    if shares_only_a(state):
        ranks = {v.shape[0] for k, v in state.items() if "lora_A" in k}
        if len(ranks) != 1:
            raise ValueError(f"lora_A factors have different ranks {sorted(ranks)}")
        return ranks.pop()
    return lora_rank(state)


def truncate(state: AdapterState, rank: int) -> AdapterState:
    """``truncate_rank`` for full adapters; the first ``rank`` rows of every A for a FedSA shared part."""
    if shares_only_a(state):
        return {k: v[:rank].clone() for k, v in state.items()}
    return truncate_rank(state, rank)


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


class FleetServer:
    def __init__(self, reference: AdapterState, rule, rank_aggregation: str):
        self.reference = reference
        self.rule = rule
        self.r_max = rank_of(reference)
        self.hetero = create_hetero_aggregator(rank_aggregation)
        self._global = reference  # the r_max adapter (robust rules keep it here)
        self._factored: tuple[object, AdapterState] | None = None  # (global state, its rank-r_max SVD)
        self.sent_by_rank: dict[int, AdapterState] = {}  # this round's adapter per rank

    @property
    def global_state(self):
        return self.rule.global_state if isinstance(self.rule, HeteroRule) else self._global

    @global_state.setter
    def global_state(self, value) -> None:
        if isinstance(self.rule, HeteroRule):
            self.rule.global_state = value
        else:
            self._global = value

    def global_adapter(self) -> AdapterState:
        """The global adapter at rank r_max (what is evaluated and saved)."""
        if isinstance(self.global_state, FlexLoRAState):
            if self._factored is None or self._factored[0] is not self.global_state:
                self._factored = (self.global_state, self.global_state.to_adapter(self.r_max))
            return self._factored[1]
        return self.global_state

    def send(self, rank: int) -> AdapterState:
        """The global adapter at ``rank``. For FlexLoRA, the rank-r truncated SVD equals the first r
        components of the rank-r_max one, so one SVD per round serves every tier."""
        if isinstance(self.global_state, FlexLoRAState):
            state = truncate(self.global_adapter(), rank)
        elif not isinstance(self.rule, HeteroRule):
            state = truncate(self._global, rank)
        elif shares_only_a(self.global_state):
            state = truncate(self.global_state, rank)
        else:
            state = self.hetero.send(self.global_state, rank)
        return fill_dead_components(state, self.reference)

    def new_round(self) -> None:
        self.sent_by_rank = {}

    def sent_for(self, rank: int) -> AdapterState:
        """What a device of ``rank`` is sent this round (computed once per rank; int8 deltas decode on it)."""
        if rank not in self.sent_by_rank:
            self.sent_by_rank[rank] = self.send(rank)
        return self.sent_by_rank[rank]

    def reference_for(self, rank: int) -> AdapterState:
        """A reply must match the initial adapter at the rank its device was given."""
        if not 0 < rank <= self.r_max:
            raise UpdateRejected("bad_rank", f"rank {rank} outside 1..{self.r_max}")
        return truncate(self.reference, rank)

    def after(self, result: Aggregated) -> None:
        """Keep the pipeline's result as the new global adapter."""
        if result.skipped:
            return
        if not isinstance(self.rule, HeteroRule):
            self._global = result.state
        elif isinstance(self.global_state, FlexLoRAState):  # the rule's rank-r_max SVD serves every tier
            self._factored = (self.global_state, result.state)
