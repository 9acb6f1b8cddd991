"""Personalization: split (shared + private) adapters, local fine-tuning, and per-user evaluation."""

from fedtune.personalization.device import device_round
from fedtune.personalization.store import PrivateStateStore

__all__ = ["PrivateStateStore", "device_round"]
