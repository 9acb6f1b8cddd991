"""Device calls side by side in one process: threads, each on its own replica of the model, one frozen base.

On a CPU, torch's intra-op threads speed one small training step up poorly (SmolLM2-135M fp32, 4 x 128,
on 2 shared vCPUs: 2 threads gave 1.0-1.5x one thread), while two single-threaded steps side by side gain
~1.8x (``bench/cpu_threads_probe.py``; docs/benchmarks.md). ``ConcurrentDevices`` runs up to ``workers``
device calls at once in Python threads (torch releases the GIL in its kernels), each with
``cpus // workers`` torch threads, each on a replica of the model that shares the frozen base tensors
(``fedtune.training.replica``): one base in memory, a separate adapter, optimizer and autograd graph per
running device. Results come back in the order of the jobs, so the round consumes them as it would one at
a time; a device's update depends only on its own inputs and seeds (float summation order aside).
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

from fedtune.training.replica import frozen_sharing_copy

J = TypeVar("J")
R = TypeVar("R")


def available_cpus() -> int:
    """The cores this process trains on: torch's intra-op thread count (the machine's cores unless a caller,
    e.g. a benchmark worker given its share, set it lower)."""
    return max(1, torch.get_num_threads())


def resolve_workers(requested: int | None, device: str, cap: int = 8) -> int:
    """Devices to train at once: ``requested``, or by default the cores torch trains on (at most ``cap``) on CPU
    and 1 on a GPU (kernels of one GPU stream do not overlap by threads)."""
    if requested is not None:
        return requested
    return max(1, min(available_cpus(), cap)) if device == "cpu" else 1


@contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` for the block (process-wide), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ConcurrentDevices:
    """Runs ``fn(model_replica, job)`` for many jobs, ``workers`` at a time, in job order.

    Replicas are made once per model (lazily, ``workers - 1`` copies beside the model itself) and reused
    across rounds; each is held by one running job at a time."""

    def __init__(self, workers: int, cpus: int | None = None):
        if workers < 1:
            raise ValueError(f"simulation.concurrent_devices must be >= 1, got {workers}")
        self.workers = workers
        self.threads = max(1, (cpus or available_cpus()) // workers)
        self._free: dict[int, queue.SimpleQueue] = {}

    def _pool(self, model: torch.nn.Module) -> queue.SimpleQueue:
        free = self._free.get(id(model))
        if free is None:
            free = queue.SimpleQueue()
            free.put(model)
            for _ in range(self.workers - 1):
                free.put(frozen_sharing_copy(model))
            self._free[id(model)] = free
        return free

    def map(self, fn: Callable[[torch.nn.Module, J], R], jobs: Sequence[tuple[torch.nn.Module, J]]) -> Iterator[R]:
        """``fn(replica, job)`` for each ``(model, job)``; yields the results in order as they are ready."""
        if self.workers == 1 or len(jobs) < 2:
            for model, job in jobs:
                yield fn(model, job)
            return
        pools = [self._pool(model) for model, _ in jobs]  # made here, in this thread, before any runs

        def run(i: int) -> R:
            replica = pools[i].get()
            try:
                return fn(replica, jobs[i][1])
            finally:
                pools[i].put(replica)

        with torch_threads(self.threads), ThreadPoolExecutor(self.workers, thread_name_prefix="device") as ex:
            yield from ex.map(run, range(len(jobs)))
