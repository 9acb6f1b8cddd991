"""Differential privacy: DP-SGD on the device (opacus), ledgers that persist accountant history,
and user-level DP-FedAvg building blocks (Poisson cohorts, clipping, noisy mean, server ledger)."""

from fedtune.privacy.accounting import compute_epsilon, noise_for_target_epsilon
from fedtune.privacy.ledger import LedgerStore, PrivacyLedger
from fedtune.privacy.user_level import (
    UserLevelLedger,
    calibrate_noise,
    clip_delta,
    global_l2_norm,
    max_rounds_within_budget,
    noisy_mean,
    poisson_cohort,
    user_level_epsilon,
)

__all__ = [
    "LedgerStore",
    "PrivacyLedger",
    "UserLevelLedger",
    "calibrate_noise",
    "clip_delta",
    "compute_epsilon",
    "global_l2_norm",
    "max_rounds_within_budget",
    "noise_for_target_epsilon",
    "noisy_mean",
    "poisson_cohort",
    "user_level_epsilon",
]
