"""Heterogeneous-rank LoRA aggregation: devices of different tiers train LoRA adapters of ranks r_k <= r_max.

Tensors in, tensors out; no Flower, no models. Keys are peft's (``get_peft_model_state_dict``):
``<prefix>.lora_A.weight`` of shape [r, d_in] and ``<prefix>.lora_B.weight`` of shape [d_out, r]; the module's
update is ΔW = scale · B @ A ([d_out, d_in]) with scale = alpha / r.

Two schemes, both behind the small ``HeteroAggregator`` registry (``create_hetero_aggregator(name)``):

1. "zeropad" (HetLoRA-style baseline, Cho et al. 2024). The global state is an r_max AdapterState. A rank-r
   device receives its first r rows of A and first r columns of B (``truncate_rank``); the server zero-pads
   every reply to r_max (``zero_pad_rank``) and averages A and B separately (``aggregate_zeropad``). Cheap,
   but mean(B) @ mean(A) != mean(B @ A): the average of the products is not what the global adapter applies.
2. "flexlora" (FlexLoRA, Bai et al. 2024). The global state is the full per-module ΔW (``FlexLoRAState``).
   The server averages the clients' products exactly (``aggregate_products``) and a rank-r device receives
   the best rank-r factorization of ΔW (``factorize``: truncated SVD, optimal by Eckart–Young).
   ``factorization_error`` reports how much of ΔW a rank-r device loses. Costs d_out x d_in fp32 per module
   on the server and one SVD per module per distinct rank sent.

Scaling convention (both schemes): every tier uses alpha_k = alpha · r_k / r_max, so that the LoRA scale
alpha_k / r_k = alpha / r_max is one constant for all ranks. Then truncating or padding the rank keeps the
meaning of each rank-one component, and the products of different tiers are directly comparable. The
functions still take ``scale`` as an explicit argument (pass alpha / r_max); nothing here reads a config.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable, Protocol, TypeVar

import torch

from fedtune.types import AdapterState

_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"

Deltas = dict[str, torch.Tensor]  # module prefix -> ΔW [d_out, d_in] fp32


# ---------------------------------------------------------------------------------------------------------
# key structure and rank


def lora_modules(state: AdapterState) -> dict[str, tuple[str, str]]:
    """Module prefix -> (A key, B key), sorted by prefix. Refuse unpaired factors and non-LoRA tensors."""
    a_keys: dict[str, str] = {}
    b_keys: dict[str, str] = {}
    for key in state:
        if key.endswith(_A_SUFFIX):
            a_keys[key[: -len(_A_SUFFIX)]] = key
        elif key.endswith(_B_SUFFIX):
            b_keys[key[: -len(_B_SUFFIX)]] = key
        else:
            raise ValueError(
                f"adapter tensor {key!r} is not a LoRA factor (expected keys ending in {_A_SUFFIX!r} or "
                f"{_B_SUFFIX!r}); heterogeneous ranks apply to LoRA only (no prompt tuning, embedding LoRA, "
                "DoRA magnitudes or trained biases): use FedAvg for other adapters"
            )
    for prefix, key in sorted(a_keys.items()):
        if prefix not in b_keys:
            raise ValueError(f"LoRA factor {key!r} has no matching {prefix + _B_SUFFIX!r}")
    for prefix, key in sorted(b_keys.items()):
        if prefix not in a_keys:
            raise ValueError(f"LoRA factor {key!r} has no matching {prefix + _A_SUFFIX!r}")
    if not a_keys:
        raise ValueError("adapter state holds no LoRA factors (empty state)")
    return {p: (a_keys[p], b_keys[p]) for p in sorted(a_keys)}


def _factors(state: AdapterState, prefix: str, keys: tuple[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = state[keys[0]], state[keys[1]]  # A [r, d_in], B [d_out, r]
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise ValueError(
            f"LoRA module {prefix!r}: expected A [r, d_in] and B [d_out, r] with the same r, "
            f"got A {tuple(a.shape)} and B {tuple(b.shape)}"
        )
    return a, b


def lora_rank(state: AdapterState) -> int:
    """The rank shared by every module of ``state``; ValueError if modules disagree."""
    ranks = {p: _factors(state, p, k)[0].shape[0] for p, k in lora_modules(state).items()}
    if len(set(ranks.values())) != 1:
        raise ValueError(f"LoRA modules have different ranks {sorted(set(ranks.values()))}: {ranks}")
    return next(iter(ranks.values()))


def _check_rank(rank: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")


def truncate_rank(state: AdapterState, rank: int) -> AdapterState:
    """Keep the first ``rank`` rows of every A and columns of every B (what a rank-r device gets)."""
    _check_rank(rank)
    out: AdapterState = {}
    for prefix, (ka, kb) in lora_modules(state).items():
        a, b = _factors(state, prefix, (ka, kb))  # [r, d_in], [d_out, r]
        if rank > a.shape[0]:
            raise ValueError(f"cannot truncate {prefix!r} of rank {a.shape[0]} to the larger rank {rank}; "
                             "use zero_pad_rank")
        out[ka] = a[:rank].clone()  # [rank, d_in]
        out[kb] = b[:, :rank].clone()  # [d_out, rank]
    return out


def zero_pad_rank(state: AdapterState, rank: int) -> AdapterState:
    """Pad every A with zero rows and every B with zero columns up to ``rank``."""
    _check_rank(rank)
    out: AdapterState = {}
    for prefix, (ka, kb) in lora_modules(state).items():
        a, b = _factors(state, prefix, (ka, kb))  # [r, d_in], [d_out, r]
        r = a.shape[0]
        if rank < r:
            raise ValueError(f"cannot zero-pad {prefix!r} of rank {r} to the smaller rank {rank}; "
                             "use truncate_rank")
        out[ka] = torch.cat([a, a.new_zeros(rank - r, a.shape[1])], dim=0)  # [rank, d_in]
        out[kb] = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1)  # [d_out, rank]
    return out


def _normalized_weights(weights: list[float], n_states: int) -> list[float]:
    if n_states == 0:
        raise ValueError("nothing to aggregate: no updates")
    if len(weights) != n_states:
        raise ValueError(f"{n_states} updates but {len(weights)} weights; pass one weight per update")
    if any(w < 0 for w in weights):
        raise ValueError(f"weights must be >= 0 (example counts), got {weights}")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"weights must sum to > 0, got {weights} (total {total})")
    return [float(w) / total for w in weights]


def _module_mismatch(expected: dict[str, tuple[str, str]], state: AdapterState, what: str) -> None:
    """Raise unless ``state`` has exactly the LoRA modules and key names of ``expected``."""
    got = lora_modules(state)
    if got != expected:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        raise ValueError(
            f"{what}: missing {missing[:3]}, unexpected {extra[:3]} "
            "(were all tiers built with the same target_modules?)"
        )


def _same_modules(states: list[AdapterState]) -> dict[str, tuple[str, str]]:
    """The module map of states[0], after checking every state has exactly the same keys."""
    modules = lora_modules(states[0])
    for i, s in enumerate(states[1:], start=1):
        _module_mismatch(modules, s, f"update {i} has different LoRA modules from update 0")
    return modules


# ---------------------------------------------------------------------------------------------------------
# zero-padding baseline (HetLoRA-style)


def aggregate_zeropad(states: list[AdapterState], weights: list[float], r_max: int) -> AdapterState:
    """Zero-pad every client to r_max, then sum_k w_k A_k and sum_k w_k B_k separately (weights normalized)."""
    w = _normalized_weights(weights, len(states))
    _same_modules(states)
    padded = [zero_pad_rank(s, r_max) for s in states]
    out: AdapterState = {}
    for key in padded[0]:
        acc = torch.zeros_like(padded[0][key], dtype=torch.float32)  # [r_max, d_in] or [d_out, r_max]
        for s, wk in zip(padded, w):
            if s[key].shape != acc.shape:
                raise ValueError(f"{key}: expected shape {tuple(acc.shape)}, got {tuple(s[key].shape)}")
            acc += wk * s[key].float()
        out[key] = acc
    return out


# ---------------------------------------------------------------------------------------------------------
# exact aggregation of products (FlexLoRA)


def _products64(state: AdapterState, scale: float) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, keys in lora_modules(state).items():
        a, b = _factors(state, prefix, keys)  # [r, d_in], [d_out, r]
        out[prefix] = scale * (b.double() @ a.double())  # [d_out, d_in] fp64
    return out


def products(state: AdapterState, scale: float) -> Deltas:
    """Prefix -> scale · B @ A  ([d_out, d_in], fp32): the update each LoRA module applies."""
    return {p: d.float() for p, d in _products64(state, scale).items()}


def aggregate_products(states: list[AdapterState], weights: list[float], scales: list[float]) -> Deltas:
    """Prefix -> sum_k w_k · scale_k · B_k @ A_k / sum_k w_k: exactly the weighted mean of the products."""
    w = _normalized_weights(weights, len(states))
    if len(scales) != len(states):
        raise ValueError(f"{len(states)} updates but {len(scales)} scales; pass one scale per update")
    _same_modules(states)
    acc: dict[str, torch.Tensor] = {}
    for k, (s, wk, sk) in enumerate(zip(states, w, scales)):
        for prefix, delta in _products64(s, sk).items():  # [d_out, d_in] fp64
            if prefix not in acc:
                acc[prefix] = torch.zeros_like(delta)
            elif acc[prefix].shape != delta.shape:
                raise ValueError(f"update {k}, module {prefix!r}: ΔW shape {tuple(delta.shape)} differs from "
                                 f"update 0's {tuple(acc[prefix].shape)} (different base models?)")
            acc[prefix] += wk * delta
    return {p: d.float() for p, d in acc.items()}


def _check_scale(scale: float) -> None:
    if not scale > 0:
        raise ValueError(f"LoRA scale (alpha / r) must be > 0, got {scale}")


def factorize(deltas: Deltas, rank: int, scale: float,
              template_keys: dict[str, tuple[str, str]] | None = None) -> AdapterState:
    """Best rank-r factors of each ΔW: scale · B @ A = U_r S_r V_r^T (Eckart–Young), fp32.

    B = U_r · sqrt(S_r / scale), A = sqrt(S_r / scale) · V_r^T. Keys come from ``template_keys`` (prefix ->
    (A key, B key), as ``lora_modules`` returns) or default to ``<prefix>.lora_A.weight`` / ``.lora_B.weight``.
    Ranks above min(d_out, d_in) are padded with zeros.
    """
    _check_rank(rank)
    _check_scale(scale)
    out: AdapterState = {}
    for prefix, delta in deltas.items():
        if template_keys is None:
            ka, kb = prefix + _A_SUFFIX, prefix + _B_SUFFIX
        elif prefix not in template_keys:
            raise ValueError(f"template_keys has no entry for module {prefix!r}")
        else:
            ka, kb = template_keys[prefix]
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)  # [d_out, k], [k], [k, d_in]
        r = min(rank, s.shape[0])
        root = torch.sqrt(s[:r] / scale)  # [r]
        b = u[:, :r] * root  # [d_out, r]
        a = root[:, None] * vh[:r]  # [r, d_in]
        out[ka] = torch.cat([a, a.new_zeros(rank - r, a.shape[1])], dim=0).float()  # [rank, d_in]
        out[kb] = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1).float()  # [d_out, rank]
    return out


def factorization_error(deltas: Deltas, state: AdapterState, scale: float) -> float:
    """||ΔW - scale · B @ A||_F / ||ΔW||_F over all modules together (0.0 if both are zero, inf if ΔW is)."""
    approx = _products64(state, scale)
    if set(approx) != set(deltas):
        only_d, only_s = sorted(set(deltas) - set(approx))[:3], sorted(set(approx) - set(deltas))[:3]
        raise ValueError(f"deltas and state cover different modules: only in deltas {only_d}, only in state {only_s}")
    err2 = sum(float(torch.sum((deltas[p].double() - approx[p]) ** 2)) for p in deltas)
    ref2 = sum(float(torch.sum(deltas[p].double() ** 2)) for p in deltas)
    if ref2 == 0.0:
        return 0.0 if err2 == 0.0 else float("inf")
    return (err2 / ref2) ** 0.5


@dataclass(frozen=True, eq=False)  # eq=False: == on dicts of tensors is ambiguous
class FlexLoRAState:
    """FlexLoRA's global model: full per-module deltas, the peft key names, and the shared scale alpha / r."""

    deltas: Deltas  # prefix -> ΔW [d_out, d_in] fp32
    keys: dict[str, tuple[str, str]]  # prefix -> (A key, B key), as lora_modules returns
    scale: float

    def __post_init__(self) -> None:
        _check_scale(self.scale)
        if set(self.deltas) != set(self.keys):
            raise ValueError(f"FlexLoRAState: deltas and keys name different modules: "
                             f"{sorted(set(self.deltas) ^ set(self.keys))[:3]}")

    @classmethod
    def from_adapter(cls, state: AdapterState, scale: float) -> "FlexLoRAState":
        """The global state whose ΔW is what ``state`` applies (e.g. peft's initial adapter: ΔW = 0)."""
        return cls(deltas=products(state, scale), keys=lora_modules(state), scale=scale)

    def to_adapter(self, rank: int) -> AdapterState:
        """A PEFT-compatible rank-``rank`` adapter (best approximation) for saving or sending."""
        return factorize(self.deltas, rank, self.scale, template_keys=self.keys)


# ---------------------------------------------------------------------------------------------------------
# aggregators and their registry

GlobalT = TypeVar("GlobalT")


class HeteroAggregator(Protocol[GlobalT]):
    """How the server keeps one global adapter for devices of several LoRA ranks."""

    def send(self, global_state: GlobalT, rank: int) -> AdapterState:
        """The rank-``rank`` adapter a device of that tier receives."""
        ...

    def aggregate(self, global_state: GlobalT, updates: list[AdapterState], weights: list[float],
                  ranks: list[int]) -> GlobalT:
        """The next global state from the devices' trained adapters (update k has rank ranks[k])."""
        ...


_AGGREGATORS: dict[str, Callable[[], HeteroAggregator]] = {}


def register_hetero_aggregator(name: str):
    """Decorator: register a zero-argument factory (e.g. a class) of a HeteroAggregator under ``name``."""

    def deco(factory: Callable[[], HeteroAggregator]) -> Callable[[], HeteroAggregator]:
        if name in _AGGREGATORS:
            raise ValueError(f"heterogeneous-rank aggregator {name!r} is already registered "
                             f"(registered: {available_hetero_aggregators()}); pick another name")
        _AGGREGATORS[name] = factory
        return factory

    return deco


def available_hetero_aggregators() -> list[str]:
    return sorted(_AGGREGATORS)


def create_hetero_aggregator(name: str) -> HeteroAggregator:
    if name not in _AGGREGATORS:
        raise ValueError(f"unknown heterogeneous-rank aggregator {name!r}; available: "
                         f"{available_hetero_aggregators()} (register one with register_hetero_aggregator)")
    return _AGGREGATORS[name]()


def _check_update_ranks(updates: list[AdapterState], ranks: list[int], r_max: int | None) -> None:
    if len(ranks) != len(updates):
        raise ValueError(f"{len(updates)} updates but {len(ranks)} ranks; pass one rank per update")
    for k, (u, r) in enumerate(zip(updates, ranks)):
        actual = lora_rank(u)
        if actual != r:
            raise ValueError(f"update {k} was announced as rank {r} but its LoRA factors have rank {actual}")
        if r_max is not None and r > r_max:
            raise ValueError(f"update {k} has rank {r} above the global rank r_max={r_max}")


def _check_update_keys(global_keys: dict[str, tuple[str, str]], updates: list[AdapterState]) -> None:
    for k, u in enumerate(updates):
        _module_mismatch(global_keys, u, f"update {k} has different LoRA modules or key names from the global state")


@register_hetero_aggregator("zeropad")
class ZeroPadAggregator:
    """Global state: an r_max AdapterState. Send = truncate; aggregate = zero-pad and average A, B apart."""

    def send(self, global_state: AdapterState, rank: int) -> AdapterState:
        return truncate_rank(global_state, rank)

    def aggregate(self, global_state: AdapterState, updates: list[AdapterState], weights: list[float],
                  ranks: list[int]) -> AdapterState:
        r_max = lora_rank(global_state)
        _check_update_ranks(updates, ranks, r_max)
        _check_update_keys(lora_modules(global_state), updates)
        return aggregate_zeropad(updates, weights, r_max)


@register_hetero_aggregator("flexlora")
class FlexLoRAAggregator:
    """Global state: FlexLoRAState. Send = best rank-r SVD factors; aggregate = exact mean of products."""

    def send(self, global_state: FlexLoRAState, rank: int) -> AdapterState:
        return global_state.to_adapter(rank)

    def aggregate(self, global_state: FlexLoRAState, updates: list[AdapterState], weights: list[float],
                  ranks: list[int]) -> FlexLoRAState:
        _check_update_ranks(updates, ranks, None)
        _check_update_keys(global_state.keys, updates)
        deltas = aggregate_products(updates, weights, [global_state.scale] * len(updates))
        for p, d in deltas.items():
            if d.shape != global_state.deltas[p].shape:
                raise ValueError(f"module {p!r}: clients' ΔW {tuple(d.shape)} differs from the global "
                                 f"{tuple(global_state.deltas[p].shape)}")
        return FlexLoRAState(deltas=deltas, keys=global_state.keys, scale=global_state.scale)
