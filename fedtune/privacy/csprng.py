"""Random streams for DP mechanisms: a CSPRNG (AES-256-CTR) on deployed parties, torch generators in simulations.

A ``RandomStream`` gives what a DP mechanism draws, and says by its ``name`` what generator it is:

* ``normal(std, numel, device, dtype)``: [numel] i.i.d. N(0, std^2) (DP-SGD noise, DP-FedAvg noise);
* ``uniform(n)``: [n] i.i.d. uniforms in (0, 1), float64 (the Poisson batch sampler compares them to q);
* ``random()`` / ``getrandbits(k)`` through :class:`StreamRandom`, a ``random.Random`` for cohorts.

``AesCtrStream`` is the secret one: the keystream of AES-256 in counter mode (``cryptography``, OpenSSL's
AES-NI code) under a 256-bit key the caller draws from the OS CSPRNG (``fedtune.federation.seeds``: a keyed
BLAKE2b of 32 ``os.urandom`` bytes per stream name, so streams are independent and none is derivable from
anything the server sends). Its words become uniforms ``(k + 1/2) * 2^-53`` from 53-bit chunks ``k`` (never 0,
never 1) and Gaussians by Box-Muller in float64::

    r = sqrt(-2 ln u1),  z = (r cos 2 pi u2, r sin 2 pi u2)      # u1, u2 in (0, 1): no log(0)

cast to the tensor's dtype at the end. The largest |z| it can give is sqrt(2 * 54 ln 2) = 8.65 (u1 = 2^-54):
the Gaussian is cut where its tail holds about 5e-18 of the mass.

``TorchStream`` wraps a seeded ``torch.Generator`` (MT19937 on CPU, Philox on CUDA): reproducible, for
simulations, where the run says ``randomness: simulated``; it draws exactly what ``torch.normal`` /
``torch.rand`` drew before this module existed, so simulated runs are unchanged.
"""

from __future__ import annotations

import math
import random
from typing import Protocol, runtime_checkable

import torch

_MASK53 = (1 << 53) - 1
_TWO_PI = 2.0 * math.pi


@runtime_checkable
class RandomStream(Protocol):
    name: str

    def normal(self, std: float, numel: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor: ...

    def uniform(self, n: int) -> torch.Tensor: ...


def _open_uniform(words: torch.Tensor) -> torch.Tensor:
    """int64 words -> float64 uniforms (k + 1/2) * 2^-53 in (0, 1) from their low 53 bits (never 0 or 1)."""
    u = words.bitwise_and(_MASK53).double()  # [n], 0 <= k < 2^53 (exact in float64)
    return u.add_(0.5).mul_(2.0 ** -53)


_CHUNK = 1 << 20  # keystream bytes per OpenSSL call (a zero block of this size is reused)
_ZEROS = bytes(_CHUNK)


class AesCtrStream:
    """AES-256-CTR keystream under a secret 32-byte key (counter from 0: one key, one stream)."""

    name = "AES-256-CTR keystream (cryptography/OpenSSL), 256-bit key from os.urandom; Box-Muller Gaussians"
    secure = True

    def __init__(self, key: bytes):
        if not isinstance(key, (bytes, bytearray)) or len(key) != 32:
            raise ValueError(f"AesCtrStream needs a 32-byte secret key (os.urandom(32)), got "
                             f"{len(key) if isinstance(key, (bytes, bytearray)) else type(key).__name__}")
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        self._enc = Cipher(algorithms.AES(bytes(key)), modes.CTR(bytes(16))).encryptor()

    def bytes(self, n: int) -> bytes:
        """The next ``n`` keystream bytes."""
        return self._enc.update(bytes(n))

    def words(self, n: int) -> torch.Tensor:
        """[n] int64 words of the keystream (uniform over all 64-bit patterns), written in place."""
        total = 8 * n
        buf = torch.empty(total + 15, dtype=torch.uint8)  # CTR writes len(data) bytes; OpenSSL asks for +15
        view = memoryview(buf.numpy())
        for off in range(0, total, _CHUNK):
            m = min(_CHUNK, total - off)
            self._enc.update_into(_ZEROS[:m] if m < _CHUNK else _ZEROS, view[off: off + m + 15])
        return buf[:total].view(torch.int64)  # [n]

    def uniform(self, n: int) -> torch.Tensor:
        """[n] float64 uniforms in (0, 1) from 53-bit chunks: (k + 1/2) * 2^-53, never 0 or 1."""
        return _open_uniform(self.words(n))

    def normal(self, std: float, numel: int, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[numel] N(0, std^2) by Box-Muller in float64, then cast to ``dtype`` on ``device``."""
        pairs = (numel + 1) // 2
        u = _open_uniform(self.words(2 * pairs))  # [2 * pairs]
        radius = u[:pairs].log_().mul_(-2.0).sqrt_().mul_(float(std))  # [pairs], std * sqrt(-2 ln u1)
        angle = u[pairs:].mul_(_TWO_PI)  # [pairs]
        z = torch.empty(2 * pairs, dtype=torch.float64)
        torch.mul(radius, torch.cos(angle), out=z[:pairs])
        torch.mul(radius, angle.sin_(), out=z[pairs:])
        return z[:numel].to(device=device, dtype=dtype)  # [numel]


class TorchStream:
    """A seeded ``torch.Generator``: draws exactly what ``torch.normal`` / ``torch.rand`` draw (simulations)."""

    secure = False

    def __init__(self, generator: torch.Generator):
        self.generator = generator
        kind = "Philox" if generator.device.type == "cuda" else "MT19937"
        self.name = f"torch.Generator ({kind} on {generator.device.type}, seeded; reproducible, not secret)"

    def normal(self, std: float, numel: int, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.normal(0.0, std, size=(numel,), generator=self.generator, device=device, dtype=dtype)

    def uniform(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generator)


def as_stream(source) -> RandomStream:
    """A ``RandomStream`` from a stream or a ``torch.Generator`` (wrapped as ``TorchStream``)."""
    if isinstance(source, torch.Generator):
        return TorchStream(source)
    if isinstance(source, RandomStream):
        return source
    raise TypeError(f"expected a fedtune.privacy.csprng.RandomStream or a torch.Generator, got "
                    f"{type(source).__name__}")


class StreamRandom(random.Random):
    """``random.Random`` over an ``AesCtrStream`` (cohorts, skips): ``random()`` from 53-bit chunks and
    ``getrandbits`` from keystream bytes, so ``sample``, ``shuffle``, ``randrange`` all draw from it."""

    def __init__(self, stream: AesCtrStream):
        self._stream = stream
        self._buf = b""
        super().__init__(0)  # the Mersenne state is never used: every method goes through the two below

    @property
    def name(self) -> str:
        return self._stream.name

    def _take(self, n: int) -> bytes:
        if len(self._buf) < n:
            self._buf += self._stream.bytes(max(4096, n))
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def random(self) -> float:
        return (int.from_bytes(self._take(8), "little") >> 11) * 2.0 ** -53  # [0, 1), like random.random

    def getrandbits(self, k: int) -> int:
        if k < 0:
            raise ValueError("number of bits must be non-negative")
        nbytes = (k + 7) // 8
        return int.from_bytes(self._take(nbytes), "little") >> (8 * nbytes - k)

    def seed(self, *args, **kwargs) -> None:  # random.Random.__init__ calls it; a stream is not reseeded
        if getattr(self, "_stream", None) is None:
            super().seed(*args, **kwargs)

    def getstate(self):
        raise NotImplementedError("a secret stream has no state to save; draw a fresh one instead")

    def setstate(self, state) -> None:
        raise NotImplementedError("a secret stream cannot be restored; draw a fresh one instead")
