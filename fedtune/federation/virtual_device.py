"""A simulated device's identity: which data user it trains on, which ledger key it charges, what it reports.

A simulation's population may be larger than its data (a fleet's ``population``): device ``d`` reuses user
``d % users`` and keeps its own ledger under ``device-<d>`` (a device that is its user keeps the user id), so
two devices sharing one user's data never share a privacy budget. The plain and packed ClientApps and the
in-process backend all map devices this way.
"""

from __future__ import annotations

import os


def partition_of(device: int, users: int) -> int:
    return device % users


def ledger_key(device: int, partition: int, user_id: str) -> str:
    return user_id if device == partition else f"device-{device}"


def client_done(plan, *, partition: int, device: int, user: str, seconds: float, update, sim_seconds: float,
                **extra) -> dict:
    """The run's progress event after a device trained (``events.jsonl``)."""
    return {"event": "client_done", "round": plan.server_round, "partition": partition, "device": device,
            "user": user, "seconds": round(seconds, 2), "train_loss": update.train_loss, "epsilon": update.epsilon,
            "pid": os.getpid(), **extra, "sim_seconds": sim_seconds}
