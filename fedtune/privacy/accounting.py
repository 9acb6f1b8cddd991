"""Pure accounting functions over a ledger history, computed by opacus' accountants (no hand-rolled maths).

A history is a list of ``(noise_multiplier, sample_rate, steps)`` entries, the format opacus'
accountants keep; composing over rounds is just concatenating histories.
"""

from __future__ import annotations

History = list[tuple[float, float, int]]


def compute_epsilon(history: History, delta: float, accountant: str = "rdp") -> float:
    """ε after every step in ``history`` at this δ (0.0 for an empty history)."""
    from opacus.accountants import create_accountant

    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta=delta))


def noise_for_target_epsilon(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """Smallest noise multiplier that keeps ε <= target after ``steps`` steps at ``sample_rate``."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
            steps=steps, accountant=accountant,
        ))
    except ValueError as err:
        raise ValueError(
            f"cannot reach target_epsilon={target_epsilon} at delta={delta} with sample rate "
            f"{sample_rate:.4g} over {steps} steps ({err}); raise the target or take fewer steps"
        ) from None
