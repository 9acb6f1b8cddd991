"""User-level ε of DP-FedAvg, computed by opacus' accountants (no hand-rolled maths).

One round of DP-FedAvg with Poisson-sampled devices (rate q), per-device clipping to C and
Gaussian noise of std σ·C on the sum is one Poisson-subsampled Gaussian mechanism with noise
multiplier σ, exactly one DP-SGD step with "examples" = devices. So the history format is the one
``fedtune.privacy.accounting`` already uses: ``[(σ, q, rounds)]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from fedtune.privacy.accounting import History, compute_epsilon

__all__ = ["calibrate_noise", "max_rounds_within_budget", "user_level_epsilon"]


def _check_common(where: str, sample_rate: float, delta: float) -> None:
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(
            f"{where}: sample_rate must lie in (0, 1], got {sample_rate!r}; it is cohort / population"
        )
    if not 0.0 < delta < 1.0:
        raise ValueError(f"{where}: delta must lie in (0, 1), got {delta!r}; 1 / population is common")


def user_level_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    rounds: int,
    delta: float,
    accountant: str = "rdp",
    *,
    orders: Sequence[float] | None = None,
) -> float:
    """ε after ``rounds`` rounds at (σ, q), at this δ; 0.0 for no rounds, inf for σ = 0.

    ``orders`` (RDP only) replaces opacus' default RDP orders, e.g. to compare with another library.
    """
    if orders is not None and accountant != "rdp":
        raise ValueError(f"user_level_epsilon: orders apply to the 'rdp' accountant only, got {accountant!r}")
    _check_common("user_level_epsilon", sample_rate, delta)
    if rounds < 0:
        raise ValueError(f"user_level_epsilon: rounds must be >= 0, got {rounds}")
    if noise_multiplier < 0:
        raise ValueError(f"user_level_epsilon: noise_multiplier must be >= 0, got {noise_multiplier}")
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    history: History = [(float(noise_multiplier), float(sample_rate), int(rounds))]
    if orders is None:
        return compute_epsilon(history, delta, accountant)
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = history
    return float(acc.get_epsilon(delta=delta, alphas=[float(a) for a in orders]))


def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, rounds: int, accountant: str = "rdp"
) -> float:
    """Smallest σ (to within 0.5% of the target ε) with ε(σ, q, rounds) <= target_epsilon."""
    from opacus.accountants.utils import MAX_SIGMA, get_noise_multiplier

    asked = (f"target_epsilon={target_epsilon} at delta={delta:.3g} over {rounds} rounds "
             f"at sampling rate {sample_rate:.4g} ({accountant} accountant)")
    _check_common("calibrate_noise", sample_rate, delta)
    if not target_epsilon > 0 or math.isinf(target_epsilon):
        raise ValueError(f"calibrate_noise: cannot meet {asked}: epsilon must be a finite number > 0")
    if rounds < 1:
        raise ValueError(f"calibrate_noise: rounds must be >= 1, got {rounds}; no noise is needed for 0 rounds")
    try:
        sigma = float(get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=rounds,
            accountant=accountant, epsilon_tolerance=min(0.01, 0.005 * target_epsilon),
        ))
    except ValueError as err:
        # Even with σ = MAX_SIGMA the accountant certifies some ε > 0 (RDP's conversion to (ε, δ) has a
        # floor set by its largest order and δ): report that floor so the caller knows what is reachable.
        floor = user_level_epsilon(MAX_SIGMA, sample_rate, rounds, delta, accountant)
        raise ValueError(
            f"calibrate_noise: cannot meet {asked}: even noise multiplier {MAX_SIGMA:g} only certifies "
            f"epsilon={floor:.3g} ({err}). Raise target_epsilon above {floor:.3g}, raise delta, sample "
            f"fewer devices per round or run fewer rounds, or try another accountant ('prv')."
        ) from None
    return sigma


def max_rounds_within_budget(
    noise_multiplier: float,
    sample_rate: float,
    target_epsilon: float,
    delta: float,
    max_rounds: int,
    accountant: str = "rdp",
) -> int:
    """Largest r <= max_rounds with ε(σ, q, r) <= target_epsilon (0 if not even one round fits).

    ε grows monotonically with the rounds, so this is a binary search over r.
    """
    if max_rounds < 0:
        raise ValueError(f"max_rounds_within_budget: max_rounds must be >= 0, got {max_rounds}")

    def fits(r: int) -> bool:
        return user_level_epsilon(noise_multiplier, sample_rate, r, delta, accountant) <= target_epsilon

    if fits(max_rounds):
        return max_rounds
    if not fits(1):
        return 0
    lo, hi = 1, max_rounds  # invariant: fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
