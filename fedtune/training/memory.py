"""Give the heap a device call freed back to the operating system (glibc ``malloc_trim``).

A CPU training step allocates and frees large buffers (activations, the [B, T, vocab] logits and their
gradient, opacus' per-sample gradients). glibc keeps freed pages mapped for reuse, so a long-lived worker
(a Flower ClientApp actor) holds its peak for good: measured with ``bench/actor_memory.py`` (SmolLM2-135M
shape, nf4, DP, 4 x 128), RSS went from 1.1 GiB with the model loaded to 2.3 GiB after one call and
stayed there. Trimming after each call returns what is free; nothing live is touched.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from functools import lru_cache

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None  # glibc only (not musl)
    except OSError:
        return None


def release_freed_heap() -> bool:
    """``malloc_trim(0)`` where the C library has it; True if it returned memory to the OS."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
