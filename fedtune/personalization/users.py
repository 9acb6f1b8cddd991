"""Tuning users vs test users: hyperparameters are chosen on one fixed set of users, results reported on the rest.

A user's side depends only on its id (a CRC32 hash, not the run's seed or the other users), so the split is
the same in every run and stays put when users are added: ``crc32(user_id) mod 1000 < 1000 * fraction`` is a
tuning user. (A margin measured on the users it was tuned on says little; docs/personalization.md.)
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass


@dataclass(frozen=True)
class UserSplit:
    tuning: tuple[str, ...]
    test: tuple[str, ...]


def is_tuning_user(user_id: str, fraction: float) -> bool:
    return zlib.crc32(f"fedtune-tuning:{user_id}".encode()) % 1000 < round(1000 * fraction)


def split_users(user_ids: list[str], fraction: float) -> UserSplit:
    """Users in their given order, each on the tuning side with probability ``fraction`` (by id hash)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"tuning fraction must lie in [0, 1), got {fraction}")
    tuning = tuple(u for u in user_ids if is_tuning_user(u, fraction))
    return UserSplit(tuning=tuning, test=tuple(u for u in user_ids if u not in set(tuning)))


def select_users(user_ids: list[str], which: str, fraction: float, limit: int | None = None) -> list[str]:
    """``which`` = "test", "tuning" or "all"; at most ``limit`` of them (in order)."""
    split = split_users(user_ids, fraction)
    chosen = {"test": list(split.test), "tuning": list(split.tuning), "all": list(user_ids)}.get(which)
    if chosen is None:
        raise ValueError(f"users: expected test, tuning or all, got {which!r}")
    return chosen[:limit] if limit else chosen
