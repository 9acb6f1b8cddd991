"""Differential privacy: DP-SGD on the device (opacus), ledgers that persist accountant history."""

from fedtune.privacy.accounting import compute_epsilon, noise_for_target_epsilon
from fedtune.privacy.ledger import LedgerStore, PrivacyLedger

__all__ = ["LedgerStore", "PrivacyLedger", "compute_epsilon", "noise_for_target_epsilon"]
