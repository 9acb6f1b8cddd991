import pytest

from fedtune.training.memory import _libc, release_freed_heap


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


@pytest.mark.skipif(_libc() is None, reason="needs glibc's malloc_trim")
def test_freed_heap_goes_back_to_the_os():
    chunks, pins = [], []
    for _ in range(3000):  # ~190 MiB of heap (below the mmap threshold), each chunk walled in by a small one
        chunks.append(bytearray(64 * 1024))
        pins.append(bytearray(512))
    del chunks  # 3000 free holes that free() cannot hand back (they are not at the heap's top)
    before = _rss_mib()
    assert release_freed_heap()
    assert before - _rss_mib() > 100
    del pins
