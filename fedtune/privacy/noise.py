"""DP-SGD noise as one Gaussian draw per step over all of a device's trainable tensors, in order.

opacus draws one ``torch.normal`` per parameter. fedtune draws one flat vector from the device's own
seeded generator and splits it over the parameters in their optimizer order. The distribution is the
same (independent N(0, (sigma*C)^2) per coordinate); what this buys is a noise stream that a packed
fleet (``fedtune.packed``), which trains many devices in shared kernels, reproduces bit for bit for
each device with one call per device and step instead of one per device and parameter.
(On CPU, torch's normal sampler happens to give the same stream either way when every tensor's size is a
multiple of 16; CUDA's Philox offsets do not, which is why the draw is defined flat.)

The source is a ``fedtune.privacy.csprng.RandomStream``: a seeded torch generator in simulations, the
device's AES-256-CTR CSPRNG stream on a deployed device (opacus' ``secure_mode`` is not used: the CSPRNG
stream is this module's secure mode).
"""

from __future__ import annotations

import torch
from opacus.optimizers.optimizer import DPOptimizer, _check_processed_flag, _mark_as_processed

from fedtune.privacy.csprng import as_stream


def flat_noise(std: float, numel: int, generator, device, dtype) -> torch.Tensor:
    """[numel] draws of N(0, std^2) from ``generator`` (a ``RandomStream`` or a ``torch.Generator``), one
    call; zeros (no draw) when ``std`` is 0."""
    if std == 0:
        return torch.zeros(numel, device=device, dtype=dtype)
    return as_stream(generator).normal(std, numel, device, dtype)


def flat_gaussian_noise(std: float, references: list[torch.Tensor], generator) -> list[torch.Tensor]:
    """N(0, std^2) noise shaped like each of ``references``, drawn as one vector from ``generator``.

    Like opacus, a zero ``std`` draws nothing (the generator does not advance).
    """
    ref = references[0]
    if any(r.dtype != ref.dtype or r.device != ref.device for r in references):
        raise ValueError("flat DP noise needs all trainable tensors on one device in one dtype; got "
                         f"{sorted({(str(r.dtype), str(r.device)) for r in references})}")
    sizes = [r.numel() for r in references]
    flat = flat_noise(std, sum(sizes), generator, ref.device, ref.dtype)  # [P]
    return [chunk.view(r.shape) for chunk, r in zip(flat.split(sizes), references)]


class FlatNoiseDPOptimizer(DPOptimizer):
    """opacus' DPOptimizer with the step's noise drawn by :func:`flat_gaussian_noise`."""

    def add_noise(self) -> None:
        for p in self.params:
            _check_processed_flag(p.summed_grad)
        std = self.noise_multiplier * self.max_grad_norm
        noises = flat_gaussian_noise(std, [p.summed_grad for p in self.params], self.generator)
        for p, noise in zip(self.params, noises):
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)


def use_flat_noise(optimizer: DPOptimizer) -> DPOptimizer:
    """Switch an opacus DPOptimizer (flat clipping, one process) to flat noise, in place."""
    if type(optimizer) is not DPOptimizer:
        raise TypeError(f"flat noise is defined for opacus' DPOptimizer, got {type(optimizer).__name__} "
                        "(per-layer clipping or distributed DP-SGD are not supported here)")
    if optimizer.secure_mode:
        raise ValueError("flat noise draws from its own stream; for secret noise pass a CSPRNG stream "
                         "(fedtune.privacy.csprng.AesCtrStream) as the optimizer's generator, not opacus' secure_mode")
    optimizer.__class__ = FlatNoiseDPOptimizer
    return optimizer


def expected_batch_size(num_examples: int, sample_rate: float) -> int:
    """opacus' expected batch size for a Poisson loader: ``int(N * q)`` (the loss is divided by it)."""
    return int(num_examples * sample_rate)


