"""Stable hashes for per-(seed, device, round) randomness: no global RNG, same answer in every process.

Python's ``hash()`` of a str is salted per process, so it cannot be used; blake2b of the joined parts is.
"""

from __future__ import annotations

import hashlib

_TWO_64 = float(2**64)


def stable_hash(*parts: object) -> int:
    """A 64-bit unsigned integer from ``":".join(parts)``; ``stable_hash(0, 7)`` hashes ``"0:7"``."""
    key = ":".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def stable_uniform(*parts: object) -> float:
    """A uniform number in [0, 1) determined by ``parts`` (see ``stable_hash``)."""
    return stable_hash(*parts) / _TWO_64
