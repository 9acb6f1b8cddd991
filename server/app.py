"""Flower ServerApp for `flwr run .`: aggregates fedtune adapters."""

from fedtune.flower.apps import server_app as app

__all__ = ["app"]
