"""Flower ClientApp for `flwr run .` (and SuperNodes): a device training fedtune adapters."""

from fedtune.flower.apps import client_app as app

__all__ = ["app"]
