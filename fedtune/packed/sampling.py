"""Each packed device's batches, drawn exactly as ``fedtune.training.train_local`` draws them.

Without DP: a shuffled loader of fixed batches (``drop_last``) over the device's chunks; with DP, opacus'
Poisson loader built from it (rate q = 1 / len(loader)). Both draw from one generator seeded with the
device's ``task.seed``, and the loader is cycled for ``local_steps`` batches, so a device's batches are the
same whether it trains alone or packed with others. A deployed device's task carries its secret
(sampling, noise) CSPRNG streams (``ClientTask.streams``): its Poisson batches draw from the first.
"""

from __future__ import annotations

from typing import Iterator

import torch

from fedtune.types import ClientData, ClientTask


class DeviceBatches:
    def __init__(self, data: ClientData, task: ClientTask, dp: bool):
        if data.num_train == 0:
            raise ValueError(f"client {data.user_id} has no training chunks")
        gen = torch.Generator().manual_seed(task.seed)
        dataset = torch.utils.data.TensorDataset(data.train)
        loader = torch.utils.data.DataLoader(dataset, batch_size=min(task.batch_size, data.num_train),
                                             shuffle=True, generator=gen, drop_last=not dp)
        self.sample_rate = 1.0 / len(loader)
        self.expected_batch_size = int(len(dataset) * self.sample_rate)  # opacus' E[B] for loss "mean"
        if dp:
            from opacus.data_loader import DPDataLoader

            loader = DPDataLoader.from_data_loader(loader)  # Poisson, same generator
            if task.streams is not None:  # a deployed device: its secret CSPRNG sampling stream
                from fedtune.privacy.poisson_batches import with_stream

                loader = with_stream(loader, task.streams[0])
        self._it = self._cycle(loader, task.local_steps)

    @staticmethod
    def _cycle(loader, steps: int) -> Iterator[torch.Tensor]:
        done = 0
        while done < steps:
            for (batch,) in loader:
                yield batch  # [b, T]; b may be 0 under Poisson sampling
                done += 1
                if done == steps:
                    return

    def next(self) -> torch.Tensor:
        return next(self._it)
