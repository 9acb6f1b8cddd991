"""Per-device DP-SGD on a packed batch: clip each sample, sum per device, add the device's own noise.

Exactly what opacus' DPOptimizer (flat clipping, loss_reduction "mean") does for one device, done for
K devices at once from the packed layers' per-sample gradients:

    norm_i   = || (dA_i, dB_i) over every LoRA layer ||_2
    c_i      = min(1, C / (norm_i + 1e-6))
    grad_k   = (sum_{i of device k} c_i g_i  +  N(0, (sigma_k C)^2) from device k's generator) / E[B_k]

The noise of device k is one flat draw over its tensors in peft order (``fedtune.privacy.noise``), so
it equals the noise of one-at-a-time training with the same seed, on the same kind of device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedtune.privacy.noise import flat_noise


@dataclass(frozen=True)
class DeviceNoise:
    """One device's DP-SGD constants for this round and its noise source (a torch generator in a
    simulation, a ``fedtune.privacy.csprng.RandomStream`` such as a deployed device's AES-CTR stream)."""

    noise_multiplier: float
    expected_batch_size: int
    generator: object


def clipped_sums(grad_samples: list[tuple[torch.Tensor, ...]], num_devices: int,
                 max_grad_norm: float) -> list[torch.Tensor]:
    """Per-device sums of clipped per-sample gradients, one [K, *shape] tensor per parameter.

    ``grad_samples`` holds, for each packed parameter in order, (dev [N], g [N, *shape]); every entry
    has the same ``dev``. Returns zeros for a device with no samples this step (a noise-only step).
    """
    dev = grad_samples[0][0]  # [N]
    norms2 = torch.zeros(dev.shape[0], device=dev.device, dtype=grad_samples[0][1].dtype)  # [N]
    for _, g in grad_samples:
        norms2 += g.flatten(1).pow(2).sum(1)
    clip = (max_grad_norm / (norms2.sqrt() + 1e-6)).clamp(max=1.0)  # [N]
    out = []
    for _, g in grad_samples:
        scaled = g * clip.view(-1, *([1] * (g.dim() - 1)))  # [N, *shape]
        out.append(g.new_zeros((num_devices, *g.shape[1:])).index_add_(0, dev, scaled))  # [K, *shape]
    return out


def noised_grads(sums: list[torch.Tensor], noise: list[DeviceNoise], max_grad_norm: float) -> list[torch.Tensor]:
    """Add each device's flat noise and divide by its expected batch size; same shapes as ``sums``."""
    k = sums[0].shape[0]
    flat = torch.cat([s.reshape(k, -1) for s in sums], dim=1)  # [K, P]
    rows = [flat_noise(n.noise_multiplier * max_grad_norm, flat.shape[1], n.generator, flat.device, flat.dtype)
            for n in noise]
    ebs = torch.tensor([float(n.expected_batch_size) for n in noise], device=flat.device, dtype=flat.dtype)
    flat = (flat + torch.stack(rows)) / ebs.view(k, 1)  # [K, P]
    sizes = [s[0].numel() for s in sums]
    return [part.reshape(s.shape) for part, s in zip(flat.split(sizes, dim=1), sums)]
