"""Per-device DP-SGD calibration: a device's noise from ITS OWN sampling rate and planned steps.

Devices differ by orders of magnitude in data size. With one fixed noise multiplier a device holding a
handful of examples is sampled at a rate near 1 (no amplification) and its ε explodes (70.8 was measured
on short per-user texts); with one fixed target ε, each device needs its own σ:

    q      = min(1, B / N)                    # Poisson sampling rate of a device with N examples, batch B
    σ      = min σ such that ε_acct(σ, q, steps) <= target     (opacus' accountant, no hand-rolled maths)
    noise on the mean gradient, relative to the clip norm C:   σ·C / (q·N) / C = σ / E[batch]

A device whose calibrated noise swamps its gradient (σ / E[batch] above ``max_noise_to_batch``), or whose
data cannot fill a batch at all, is *too small to train within the budget*: it sits out, saying why
(:class:`DeviceTooSmall`). Pure functions over numbers and ledger histories; nothing here trains.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from fedtune.privacy.accounting import History, compute_epsilon

DEFAULT_TARGET_EPSILON = 8.0
# the noise std on a device's mean clipped gradient may be at most this many clip norms
DEFAULT_MAX_NOISE_TO_BATCH = 0.5
MIN_EXAMPLES = 2


class DeviceTooSmall(ValueError):
    """A device's data is too small to train within its privacy budget; it sits out (the message says why)."""


class BudgetExceeded(ValueError):
    """Training as asked would take a device's ε past its budget."""


@dataclass(frozen=True)
class DeviceNoise:
    """One device's calibrated DP-SGD setting and the ε the accountant gives it at its planned steps."""

    noise_multiplier: float
    sample_rate: float
    planned_steps: int
    expected_batch: float
    target_epsilon: float
    delta: float
    planned_epsilon: float  # ε_acct(σ, q, planned_steps) on top of the device's earlier history; <= target

    @property
    def noise_to_batch(self) -> float:
        return self.noise_multiplier / self.expected_batch


def sample_rate(num_examples: int, batch_size: int) -> float:
    """The Poisson rate giving an expected batch of ``batch_size`` (capped at 1: every example, every step)."""
    if num_examples <= 0 or batch_size <= 0:
        raise ValueError(f"need num_examples > 0 and batch_size > 0, got {num_examples} and {batch_size}")
    return min(1.0, batch_size / num_examples)


def _rdp(history, orders):
    from opacus.accountants.analysis import rdp

    return sum(rdp.compute_rdp(q=q, noise_multiplier=s, steps=n, orders=orders) for s, q, n in history)


def _epsilon(history: History, sigma: float, q: float, steps: int, delta: float, accountant: str,
             _spent=None) -> float:
    """ε after ``history`` and ``steps`` more steps at (σ, q); with RDP, opacus' analysis (what its
    RDPAccountant.get_epsilon runs) with the history's RDP curve passed in once (``_spent``)."""
    if accountant != "rdp":
        return compute_epsilon(list(history) + [(sigma, q, steps)], delta, accountant)
    import warnings

    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp

    orders = RDPAccountant.DEFAULT_ALPHAS
    spent = _rdp(history, orders) if _spent is None else _spent
    with warnings.catch_warnings():  # "optimal order is the largest alpha": fine at high noise
        warnings.simplefilter("ignore")
        eps, _ = rdp.get_privacy_spent(orders=orders, rdp=spent + _rdp([(sigma, q, steps)], orders), delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=4096)
def _calibrate(q: float, steps: int, target_epsilon: float, delta: float, accountant: str, history: tuple,
               sigma_max: float, rel_tol: float) -> float:
    spent = None
    if accountant == "rdp":
        from opacus.accountants import RDPAccountant

        spent = _rdp(history, RDPAccountant.DEFAULT_ALPHAS)

    def eps(sigma: float) -> float:
        return _epsilon(history, sigma, q, steps, delta, accountant, spent)

    if eps(sigma_max) > target_epsilon:
        raise BudgetExceeded(f"the device has spent epsilon {compute_epsilon(list(history), delta, accountant):.3f}"
                             f" of its {target_epsilon} budget; {steps} more steps at sample rate {q:.3g} cannot "
                             "fit at any noise")
    lo, hi = 0.0, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, min(hi * 2, sigma_max)
    while hi - lo > rel_tol * hi:  # ε falls as σ grows: bisect on the boundary, keep the side that fits
        mid = (lo + hi) / 2
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def calibrate(q: float, steps: int, target_epsilon: float, delta: float, accountant: str = "rdp",
              history: History = (), sigma_max: float = 1e3, rel_tol: float = 5e-3) -> float:
    """Smallest σ (within ``rel_tol``) with ε(history + ``steps`` steps at (σ, q)) <= ``target_epsilon``.

    ``history`` is what the device has already spent (its ledger): the new steps get what is left.
    Raises :class:`BudgetExceeded` if even ``sigma_max`` does not fit (the history alone is at the target).
    """
    if not target_epsilon > 0 or math.isinf(target_epsilon):
        raise ValueError(f"target_epsilon must be a positive finite number, got {target_epsilon}")
    if steps <= 0:
        raise ValueError(f"planned steps must be positive, got {steps}")
    key = tuple((float(s), float(qq), int(n)) for s, qq, n in history)
    return _calibrate(float(q), int(steps), float(target_epsilon), float(delta), accountant, key, sigma_max, rel_tol)


def device_noise(num_examples: int, batch_size: int, planned_steps: int, target_epsilon: float, delta: float,
                 accountant: str = "rdp", history: History = (),
                 max_noise_to_batch: float = DEFAULT_MAX_NOISE_TO_BATCH) -> DeviceNoise:
    """Calibrate one device: σ from its own rate ``B/N`` and ``planned_steps`` so that its ε stays within
    ``target_epsilon`` (on top of ``history``). Raises :class:`DeviceTooSmall` when the device should sit out."""
    if num_examples < MIN_EXAMPLES:
        check_trainable(num_examples, 1.0, 0.0, max_noise_to_batch)
    q = sample_rate(num_examples, batch_size)
    try:
        sigma = calibrate(q, planned_steps, target_epsilon, delta, accountant, history)
    except BudgetExceeded as err:
        raise DeviceTooSmall(str(err)) from None
    check_trainable(num_examples, q, sigma, max_noise_to_batch, f"epsilon <= {target_epsilon} over "
                    f"{planned_steps} steps")
    return DeviceNoise(noise_multiplier=sigma, sample_rate=q, planned_steps=planned_steps,
                       expected_batch=q * num_examples, target_epsilon=target_epsilon, delta=delta,
                       planned_epsilon=_epsilon(history, sigma, q, planned_steps, delta, accountant))


def check_trainable(num_examples: int, q: float, sigma: float, max_noise_to_batch: float, goal: str = "") -> None:
    """Raise :class:`DeviceTooSmall` if noise ``sigma`` on an expected batch of ``q * num_examples`` is more
    than ``max_noise_to_batch`` clip norms on the device's mean gradient (``goal`` names the budget)."""
    if num_examples < MIN_EXAMPLES:
        raise DeviceTooSmall(f"{num_examples} training example(s): DP-SGD needs at least {MIN_EXAMPLES}; the "
                             "device sits out (give it more data or merge it with others)")
    expected = q * num_examples
    if sigma / expected > max_noise_to_batch:
        raise DeviceTooSmall(
            f"{num_examples} training examples: reaching {goal} needs noise multiplier {sigma:.2f} on an expected "
            f"batch of {expected:.1f}, noise {sigma / expected:.2f} clip norms on the mean gradient (at most "
            f"{max_noise_to_batch} trains usefully); the device sits out. Fix: more data, fewer steps, a larger "
            "batch or a larger target_epsilon")


def over_target(epsilon: float | None, target: float | None, slack: float = 1e-6) -> bool:
    """True if a reported ε exceeds its target (a report must then say so; ``budget_warning``)."""
    return epsilon is not None and target is not None and epsilon > target * (1 + slack)


def budget_warning(device: str, epsilon: float, target: float) -> str:
    return (f"WARNING: device {device} reports epsilon {epsilon:.2f} above its target {target:g} "
            "(its noise was not calibrated to the target; set privacy.target_epsilon)")


def loader_sample_rate(num_examples: int, batch_size: int) -> float:
    """The rate opacus' Poisson loader uses for ``train_local``'s loader: 1 / its number of batches."""
    return 1.0 / math.ceil(num_examples / min(batch_size, num_examples))


def sit_out_reason(num_examples: int, batch_size: int, planned_steps: int, target_epsilon: float | None,
                   delta: float, accountant: str = "rdp",
                   max_noise_to_batch: float = DEFAULT_MAX_NOISE_TO_BATCH) -> str | None:
    """Why a device with ``num_examples`` must sit out a run calibrated to ``target_epsilon`` (None: it trains).
    The same check ``make_private`` makes, before any training, so a round can leave the device out."""
    if target_epsilon is None:
        return None
    if num_examples < MIN_EXAMPLES:
        return (f"{num_examples} training example(s): DP-SGD needs at least {MIN_EXAMPLES}; the device sits out")
    q = loader_sample_rate(num_examples, batch_size)
    try:
        sigma = calibrate(q, planned_steps, target_epsilon, delta, accountant)
        check_trainable(num_examples, q, sigma, max_noise_to_batch, f"epsilon <= {target_epsilon} over "
                        f"{planned_steps} steps")
    except (DeviceTooSmall, BudgetExceeded) as err:
        return str(err)
    return None
