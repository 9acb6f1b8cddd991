"""Poisson batch sampling (the sampled Gaussian mechanism's batches) with uniforms from a ``RandomStream``.

opacus' ``UniformWithReplacementSampler`` draws ``torch.rand(N, generator=g) < q`` per step from a torch
generator. ``StreamPoissonSampler`` is the same law with its uniforms from any
``fedtune.privacy.csprng.RandomStream``: a deployed device's AES-256-CTR stream, kept apart from its noise
stream. ``with_stream`` rebuilds an opacus ``DPDataLoader`` around it (same dataset, same empty-batch collate).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler


class StreamPoissonSampler(Sampler[list[int]]):
    """``steps`` batches (default ``int(1 / q)``, opacus' count); each index joins a batch with prob. ``q``."""

    def __init__(self, num_samples: int, sample_rate: float, stream, steps: int | None = None):
        if num_samples <= 0:
            raise ValueError(f"Poisson sampling needs at least one sample, got num_samples={num_samples}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"Poisson sampling rate must lie in (0, 1], got {sample_rate!r}")
        self.num_samples, self.sample_rate, self.stream = num_samples, sample_rate, stream
        self.steps = steps if steps is not None else int(1 / sample_rate)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = self.stream.uniform(self.num_samples) < self.sample_rate  # [N] bool
            yield mask.nonzero(as_tuple=False).reshape(-1).tolist()


def with_stream(dp_loader: DataLoader, stream) -> DataLoader:
    """``dp_loader`` (an opacus ``DPDataLoader``) with its batches drawn from ``stream`` instead of its
    torch generator; the same dataset, rate and empty-batch collate."""
    sampler = StreamPoissonSampler(len(dp_loader.dataset), float(dp_loader.sample_rate), stream,
                                   steps=len(dp_loader))
    loader = DataLoader(dp_loader.dataset, batch_sampler=sampler, collate_fn=dp_loader.collate_fn)
    loader.sample_rate = dp_loader.sample_rate  # what opacus' DPDataLoader carries
    return loader
