"""Bounded HTTP for devices: every byte counted against a limit, every wait against one overall deadline.

A registry server is not trusted, so it may lie about sizes, send forever, or trickle a byte at a time.
``Deadline`` is one clock for a whole pull: each request's timeouts are the smaller of the per-read
timeout and the time left, and streaming checks the clock after every network read, so a trickling
server costs at most the deadline (not a read timeout per byte). Bodies stop being read as soon as they
pass their bound: the signed size of a blob or manifest, ``MAX_METADATA_BYTES`` for metadata.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from fedtune.registry.errors import DeadlineError, IntegrityError, RegistryError


@dataclass
class Deadline:
    seconds: float
    end: float = field(init=False)

    def __post_init__(self) -> None:
        self.end = time.monotonic() + self.seconds

    def remaining(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise DeadlineError(f"the pull did not finish within its {self.seconds:g} s deadline (a slow or "
                                "trickling server); nothing was activated, the active adapter stays")
        return left

    def timeout(self, per_read: float) -> httpx.Timeout:
        return httpx.Timeout(min(per_read, self.remaining()))


@dataclass(frozen=True)
class Fetched:
    status: int
    headers: httpx.Headers
    body: bytes


def _too_big(url: str, limit: int) -> IntegrityError:
    return IntegrityError(f"GET {url}: the server sent more than the {limit:,} bytes expected; stopped reading "
                          "and refused it (the active adapter stays)")


def _declared(resp: httpx.Response) -> int | None:
    try:
        return int(resp.headers["content-length"])
    except (KeyError, ValueError):
        return None


def get_bounded(http: httpx.Client, url: str, limit: int, deadline: Deadline, per_read: float,
                params: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> Fetched:
    """GET a small document; refuse it past ``limit`` bytes or the deadline."""
    try:
        with http.stream("GET", url, params=params, headers=headers, timeout=deadline.timeout(per_read)) as resp:
            declared = _declared(resp)
            if declared is not None and declared > limit:
                raise _too_big(url, limit)
            chunks, n = [], 0
            for chunk in resp.iter_bytes():  # no chunk_size: one network read at a time
                n += len(chunk)
                if n > limit:
                    raise _too_big(url, limit)
                chunks.append(chunk)
                deadline.remaining()
            return Fetched(resp.status_code, resp.headers, b"".join(chunks))
    except httpx.TimeoutException:
        deadline.remaining()  # raises DeadlineError if that is why
        raise


def stream_blob(http: httpx.Client, url: str, dest: Path, size: int, deadline: Deadline,
                per_read: float) -> tuple[str, int]:
    """Stream a blob into ``dest`` hashing it; stop at byte ``size + 1``. Returns (sha256, bytes)."""
    h, n = hashlib.sha256(), 0
    try:
        with http.stream("GET", url, timeout=deadline.timeout(per_read)) as resp:
            if resp.status_code != 200:
                raise RegistryError(f"GET {url}: expected 200, got {resp.status_code}")
            declared = _declared(resp)
            if declared is not None and declared > size:
                raise _too_big(url, size)
            with open(dest, "wb") as out:
                for chunk in resp.iter_bytes():
                    n += len(chunk)
                    if n > size:
                        raise _too_big(url, size)
                    h.update(chunk)
                    out.write(chunk)
                    deadline.remaining()
    except httpx.TimeoutException:
        deadline.remaining()
        raise
    return h.hexdigest(), n
