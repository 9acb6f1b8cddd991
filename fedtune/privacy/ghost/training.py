"""DP-SGD on one device with ghost clipping: the same mechanism as the opacus path, other arithmetic.

Per step, exactly what ``fedtune.privacy.dpsgd`` (opacus' DPOptimizer with flat noise) does:
  1. Poisson-sample the batch (opacus' ``DPDataLoader``, rate q = 1 / len(loader)).
  2. Backward the mean loss; ``GhostClipper`` gives sum_i min(1, C / (||g_i|| + 1e-6)) g_i per LoRA factor.
  3. Add one flat N(0, (sigma C)^2) draw from the device's noise stream (a seeded torch generator in a
     simulation, the AES-CTR CSPRNG on a deployed device) over every trainable tensor in optimizer order
     (``fedtune.privacy.noise``), divide by the expected batch size int(N q).
  4. Step the wrapped optimizer; the accountant records (sigma, q) and the ledger keeps its history.
An empty Poisson batch records nothing, so step 2 gives zeros and the step is noise only. With micro-batches
(``train.physical_batch_size``) each one's clipped sum is added up (``signal_skip_step``) and steps 3-4 run once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedtune.config import PrivacyConfig
from fedtune.privacy.ghost.clipper import GhostClipper
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.privacy.noise import expected_batch_size, flat_gaussian_noise


class GhostDPOptimizer:
    """Clipped sums from a ``GhostClipper`` + flat noise, scaled, then the wrapped optimizer's step."""

    def __init__(self, optimizer: torch.optim.Optimizer, clipper: GhostClipper, params: list[torch.nn.Parameter],
                 noise_multiplier: float, max_grad_norm: float, expected_batch_size: int,
                 generator, accountant, sample_rate: float):  # a RandomStream (fedtune.privacy.csprng)
        self.optimizer, self.clipper, self.params = optimizer, clipper, params
        self.noise_multiplier, self.max_grad_norm = float(noise_multiplier), float(max_grad_norm)
        self.expected_batch_size, self.generator = expected_batch_size, generator
        self.accountant, self.sample_rate = accountant, sample_rate
        self._skip, self._pending = False, None  # micro-batching: clipped sums of the logical batch so far

    def signal_skip_step(self, do_skip: bool = True) -> None:
        """Like opacus: the next ``step`` only clips and accumulates this micro-batch (no noise, no step)."""
        self._skip = do_skip

    def step(self) -> None:
        sums = self.clipper.clipped_sums(self.max_grad_norm)
        if self._pending is not None:  # earlier micro-batches of this logical batch
            sums = [a + b for a, b in zip(self._pending, sums)]
        if self._skip:
            self._pending, self._skip = sums, False
            return
        self._pending = None
        noises = flat_gaussian_noise(self.noise_multiplier * self.max_grad_norm, sums, self.generator)
        for p, s, z in zip(self.params, sums, noises):
            p.grad = ((s + z) / self.expected_batch_size).view_as(p)
        self.optimizer.step()
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self.clipper.reset()


@dataclass
class GhostPrivateTraining:
    """What ``train_local`` drives: the optimizer, the Poisson loader, the constants for its metrics."""

    optimizer: GhostDPOptimizer
    loader: torch.utils.data.DataLoader
    noise_multiplier: float
    sample_rate: float
    noise_generator: str = ""  # the name of the stream the noise came from (fedtune.privacy.csprng)

    def noise_only_step(self) -> None:
        self.optimizer.step()  # nothing was recorded: the clipped sum is zero
        self.optimizer.zero_grad(set_to_none=True)

    def close(self, ledger: PrivacyLedger, server_round: int) -> None:
        """Record this round's steps in the ledger and take the hooks off the (cached) model."""
        ledger.history = [tuple(h) for h in self.optimizer.accountant.history]
        ledger.rounds.append(server_round)
        self.optimizer.clipper.close()


def make_ghost_private(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       loader: torch.utils.data.DataLoader, cfg: PrivacyConfig, ledger: PrivacyLedger,
                       noise_multiplier: float, seed: int, streams: tuple | None = None) -> GhostPrivateTraining:
    """Ghost-clipped DP-SGD over ``optimizer``'s parameters; the accountant continues from ``ledger``.

    Noise from a torch generator seeded with ``seed`` and batches from ``loader``'s generator (simulations),
    or, with ``streams`` = (sampling, noise), from a deployed device's CSPRNG streams."""
    from opacus.accountants import create_accountant
    from opacus.data_loader import DPDataLoader

    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    sample_rate = 1.0 / len(loader)
    clipper = GhostClipper(model, params)
    accountant = create_accountant(cfg.accountant)
    accountant.history = [tuple(h) for h in ledger.history]
    from fedtune.privacy.csprng import TorchStream
    from fedtune.privacy.poisson_batches import with_stream

    generator = torch.Generator(device=params[0].device)
    generator.manual_seed(seed)
    source = TorchStream(generator)
    if streams is not None:
        sampling, source = streams
    ebs = expected_batch_size(len(loader.dataset), sample_rate)
    opt = GhostDPOptimizer(optimizer, clipper, params, noise_multiplier, cfg.max_grad_norm, ebs, source,
                           accountant, sample_rate)
    batches = DPDataLoader.from_data_loader(loader)
    if streams is not None:
        batches = with_stream(batches, sampling)
    return GhostPrivateTraining(opt, batches, noise_multiplier, sample_rate, source.name)
