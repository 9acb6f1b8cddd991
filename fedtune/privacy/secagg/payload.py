"""What a device puts into secure aggregation, and what the server makes of the sum.

Adapter states travel as one flat vector in a fixed layout (tensor names sorted). Two uses:

- Plain FedAvg: the device sends [w * x, w * R] with its weight w in [0, 1] (e.g. its example count
  clipped to a cap and divided by it: the count itself never leaves in the clear) and R the clip range; the
  server gets sum(w x) / sum(w) from the sum alone.
- User-level DP-FedAvg: the device clips its delta to L2 norm C (``clip_delta``) and sends it; the server
  adds N(0, (sigma C)^2) to the unmasked SUM and divides by the expected cohort qN, exactly the mechanism
  of ``fedtune.privacy.user_level.noisy_mean``. Trust left: the server sees the noiseless sum of the
  survivors' clipped deltas before it adds the noise (DP protects users from readers of the published
  adapter, secure aggregation from the server seeing any one update; neither protects the sum from the
  server). Distributed noise (each device adding a share) would remove that trust and is not built here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedtune.privacy.user_level import clip_delta, noised_mean_of_sum
from fedtune.types import AdapterState


@dataclass(frozen=True)
class VectorLayout:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, state: AdapterState) -> VectorLayout:
        names = tuple(sorted(state))
        return cls(names, tuple(tuple(state[k].shape) for k in names))

    @property
    def length(self) -> int:
        return sum(int(np.prod(s)) for s in self.shapes)

    def flatten(self, state: AdapterState) -> np.ndarray:
        if tuple(sorted(state)) != self.names:
            raise ValueError(f"secure aggregation: the update's tensors {sorted(state)} differ from the round's "
                             f"layout {list(self.names)}")
        return np.concatenate([state[k].detach().double().cpu().numpy().ravel() for k in self.names])

    def unflatten(self, vector: np.ndarray) -> AdapterState:
        if vector.shape != (self.length,):
            raise ValueError(f"secure aggregation: a vector of {vector.shape} for a layout of {self.length} values")
        out, i = {}, 0
        for name, shape in zip(self.names, self.shapes):
            n = int(np.prod(shape))
            out[name] = torch.from_numpy(vector[i:i + n].astype(np.float32)).reshape(shape)
            i += n
        return out


def weighted_payload(update: np.ndarray, weight: float, clip_range: float) -> np.ndarray:
    """[w * x, w * R] for plain FedAvg; ``weight`` in [0, 1]. [n + 1]"""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"secure aggregation: a FedAvg weight must lie in [0, 1] (a capped, normalised example "
                         f"count), got {weight}")
    return np.concatenate([weight * np.asarray(update, dtype=np.float64), [weight * clip_range]])


def weighted_mean_from_sum(total: np.ndarray, clip_range: float) -> np.ndarray:
    """sum(w x) / sum(w) from the sum of ``weighted_payload`` vectors. [n]"""
    weight = total[-1] / clip_range
    if weight <= 0:
        raise ValueError("secure aggregation: the survivors' weights sum to 0; nothing to average")
    return total[:-1] / weight


def clipped_delta_payload(global_state: AdapterState, update: AdapterState, clip_norm: float,
                          layout: VectorLayout) -> np.ndarray:
    """The device's side of user-level DP: its delta clipped to L2 norm C, flat. [n]"""
    delta = {k: update[k].float() - global_state[k].float() for k in global_state}
    return layout.flatten(clip_delta(delta, clip_norm)[0])


def dp_mean_from_sum(total: np.ndarray, layout: VectorLayout, clip_norm: float, noise_multiplier: float,
                     expected_cohort: float, generator: torch.Generator) -> AdapterState:
    """(sum of clipped deltas + N(0, (sigma C)^2 I)) / qN, the server's side, from the unmasked sum alone
    (``noised_mean_of_sum``, the same step DP-FedAvg takes after its own sum)."""
    return noised_mean_of_sum(layout.unflatten(total), clip_norm, noise_multiplier, expected_cohort, generator)
