"""One seed object for a run: every random stream derives from it by name.

Streams (the names used across fedtune; a new stream gets a new name, never a new formula):

    cohort           round                  the server's cohort (uniform or Poisson) of a round
    user_noise       round                  the server's user-level DP-FedAvg noise
    task.sampling    round, device          a device's batch sampler (Poisson under DP-SGD)
    task.noise       round, device          a device's DP-SGD noise
    ...              any other parts        ``derive(name, *parts)``

Two modes:

* ``simulated``: every stream is ``blake2b("fedtune:<seed>:<name>:<parts>")``, reproducible from the run's
  public ``seed``. Whoever knows the seed (the server, a reader of ``config.yaml``) can regenerate every
  noise draw and every cohort, so a simulation's DP figures describe the mechanism, not a guarantee against
  the server. Runs record ``randomness: simulated``.
* ``secret``: streams are a keyed blake2b (a PRF) under 32 bytes from the OS CSPRNG (``os.urandom``) drawn
  when the object is made and never written anywhere. Deployed devices use one per round (noise and
  Poisson sampling from it; nothing the server sends enters it); a deployed server uses one for its
  user-level noise and cohorts. Each named stream is a CSPRNG (``fedtune.privacy.csprng.AesCtrStream``:
  AES-256-CTR under a 256-bit key, the keyed BLAKE2b of the name), so distinct names give independent
  streams and the noise stream says nothing about the sampler's choices.

``stream(name, ...)`` is what DP mechanisms draw from (a seeded ``torch.Generator`` when simulated, the
AES-CTR stream when secret); ``rng(name, ...)`` a ``random.Random`` over the same kind of stream (cohorts).
``derive`` / ``generator`` give integer seeds and torch generators, for what is not a privacy mechanism.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass, field
from typing import Literal

import torch

Mode = Literal["simulated", "secret"]
_MASK63 = 2**63 - 1


@dataclass(frozen=True)
class Seeds:
    """The run's randomness. Build with :meth:`simulated` or :meth:`secret`; derive streams by name."""

    mode: Mode
    root: int | None  # the public run seed (simulated); None when secret
    _key: bytes = field(default=b"", repr=False, compare=False)

    @classmethod
    def simulated(cls, seed: int) -> "Seeds":
        return cls(mode="simulated", root=int(seed))

    @classmethod
    def secret(cls) -> "Seeds":
        return cls(mode="secret", root=None, _key=os.urandom(32))

    @classmethod
    def for_run(cls, seed: int, *, deployed: bool) -> "Seeds":
        """A simulation's seeds are reproducible; a deployment's are secret."""
        return cls.secret() if deployed else cls.simulated(seed)

    def __post_init__(self) -> None:
        if self.mode == "simulated" and self.root is None:
            raise ValueError("Seeds(mode='simulated') needs the run seed; use Seeds.simulated(cfg.seed)")
        if self.mode == "secret" and len(self._key) != 32:
            raise ValueError("Seeds(mode='secret') needs a 32-byte OS-random key; use Seeds.secret()")
        if self.mode not in ("simulated", "secret"):
            raise ValueError(f"Seeds.mode must be 'simulated' or 'secret', got {self.mode!r}")

    def derive(self, name: str, *parts: object) -> int:
        """A 63-bit seed for the stream ``name`` at ``parts`` (e.g. ``derive("task.noise", round, device)``)."""
        label = ":".join([name, *(str(p) for p in parts)]).encode()
        if self.mode == "secret":
            digest = hashlib.blake2b(label, key=self._key, digest_size=8, person=b"fedtune.secret").digest()
        else:
            digest = hashlib.blake2b(f"fedtune:{self.root}:".encode() + label, digest_size=8).digest()
        return int.from_bytes(digest, "little") & _MASK63

    def _stream_key(self, name: str, *parts: object) -> bytes:
        label = ":".join([name, *(str(p) for p in parts)]).encode()
        return hashlib.blake2b(label, key=self._key, digest_size=32, person=b"fedtune.stream").digest()

    def stream(self, name: str, *parts: object, device: str | torch.device = "cpu"):
        """The DP stream ``name`` at ``parts`` (``fedtune.privacy.csprng.RandomStream``): AES-256-CTR under a
        secret 256-bit key when secret; a torch generator seeded with ``derive(name, *parts)`` when simulated."""
        from fedtune.privacy.csprng import AesCtrStream, TorchStream

        if self.mode == "secret":
            return AesCtrStream(self._stream_key(name, *parts))
        return TorchStream(self.generator(name, *parts, device=device))

    def rng(self, name: str, *parts: object) -> random.Random:
        """A Python RNG for the stream (cohorts, skips): over the AES-CTR stream when secret."""
        if self.mode == "secret":
            from fedtune.privacy.csprng import StreamRandom

            return StreamRandom(self.stream(name, *parts))
        return random.Random(self.derive(name, *parts))

    def generator(self, name: str, *parts: object, device: str | torch.device = "cpu") -> torch.Generator:
        """A torch generator for the stream (noise, batch sampling)."""
        gen = torch.Generator(device=device)
        gen.manual_seed(self.derive(name, *parts))
        return gen

    @property
    def label(self) -> str:
        """What a run records under ``randomness``."""
        return self.mode


def task_seeds(seeds: Seeds, server_round: int, device: int | str) -> tuple[int, int]:
    """(sampling seed, noise seed) of one device's round: two independent streams."""
    return seeds.derive("task.sampling", server_round, device), seeds.derive("task.noise", server_round, device)


def task_streams(seeds: Seeds, server_round: int, device: int | str):
    """(sampling stream, noise stream) of one device's round when its seeds are secret (the CSPRNG the
    device's DP-SGD draws from); ``None`` when simulated (training seeds torch generators from
    ``task_seeds``, reproducibly)."""
    if seeds.mode != "secret":
        return None
    return seeds.stream("task.sampling", server_round, device), seeds.stream("task.noise", server_round, device)
