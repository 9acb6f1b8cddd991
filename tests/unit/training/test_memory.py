import subprocess
import sys

import pytest

from fedtune.training.memory import _libc

# Run in a fresh interpreter: in a long test process the heap's layout (and glibc's dynamic mmap threshold)
# depend on every test before, so "freed holes" may not exist or may already be reused.
_PROBE = """
import psutil
from fedtune.training.memory import release_freed_heap

def rss():
    return psutil.Process().memory_info().rss / 2**20

chunks, pins = [], []
for _ in range(3000):  # ~190 MiB of heap (below the mmap threshold), each chunk walled in by a small one
    chunks.append(bytearray(64 * 1024))
    pins.append(bytearray(512))
del chunks  # 3000 free holes that free() cannot hand back (they are not at the heap's top)
before = rss()
trimmed = release_freed_heap()
print(trimmed, before - rss())
"""


@pytest.mark.skipif(_libc() is None, reason="needs glibc's malloc_trim")
def test_freed_heap_goes_back_to_the_os():
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=True)
    trimmed, released_mib = out.stdout.split()
    assert trimmed == "True" and float(released_mib) > 100, out.stdout
