"""Pure accounting functions over a ledger history, computed by opacus' accountants (no hand-rolled maths).

A history is a list of ``(noise_multiplier, sample_rate, steps)`` entries, the format opacus'
accountants keep; composing over rounds is just concatenating histories.
"""

from __future__ import annotations

from functools import lru_cache

History = list[tuple[float, float, int]]


@lru_cache(maxsize=4096)
def _rdp_one_step(noise_multiplier: float, sample_rate: float):
    """opacus' RDP of one step at every default order (read-only array). Computing it takes ~0.3 s of
    CPU (the fractional orders), and every device call asks for ε, so it is computed once per (σ, q)."""
    from opacus.accountants.analysis import rdp as analysis
    from opacus.accountants.rdp import RDPAccountant

    out = analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                               orders=RDPAccountant.DEFAULT_ALPHAS)
    out.setflags(write=False)
    return out


def _rdp_epsilon(history: History, delta: float) -> float:
    """What ``RDPAccountant.get_epsilon`` returns, bit for bit: opacus' compute_rdp(steps=n) is the
    one-step RDP times n, summed over the history in the same order."""
    from opacus.accountants.analysis import rdp as analysis
    from opacus.accountants.rdp import RDPAccountant

    rdp = sum([_rdp_one_step(float(s), float(q)) * int(n) for s, q, n in history])
    eps, _ = analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def compute_epsilon(history: History, delta: float, accountant: str = "rdp") -> float:
    """ε after every step in ``history`` at this δ (0.0 for an empty history)."""
    from opacus.accountants import create_accountant

    if not history:
        return 0.0
    if accountant == "rdp":
        return _rdp_epsilon(history, delta)
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta=delta))


def noise_for_target_epsilon(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """Smallest noise multiplier that keeps ε <= target after ``steps`` steps at ``sample_rate``.

    The one calibrator is ``fedtune.privacy.device_budget.calibrate`` (cached); this is its history-free form."""
    from fedtune.privacy.device_budget import calibrate  # imported here: device_budget imports this module

    return calibrate(sample_rate, steps, target_epsilon, delta, accountant)
