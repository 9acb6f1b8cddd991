"""Shamir secret sharing (t-of-k) of short byte strings over the prime field GF(2^521 - 1).

A secret of up to 64 bytes is read as an integer s < p; a random polynomial f of degree t - 1 with
f(0) = s is evaluated at x = 1..k (coefficients from the OS CSPRNG, ``secrets``). Any t shares give s
back by Lagrange interpolation at 0; fewer reveal nothing about s (information-theoretically).
p = 2^521 - 1 is a Mersenne prime, so every 64-byte secret fits and shares are 66 bytes.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

PRIME = 2**521 - 1
SECRET_BYTES = 64  # secrets up to this length (the length is carried in the share)
_Y_BYTES = 66  # ceil(521 / 8)


@dataclass(frozen=True)
class Share:
    x: int  # the holder's evaluation point, 1..k
    y: int  # f(x) mod p
    length: int  # the secret's length in bytes

    def to_bytes(self) -> bytes:
        return self.x.to_bytes(4, "big") + self.length.to_bytes(1, "big") + self.y.to_bytes(_Y_BYTES, "big")

    @classmethod
    def from_bytes(cls, raw: bytes) -> Share:
        if len(raw) != 5 + _Y_BYTES:
            raise ValueError(f"a Shamir share is {5 + _Y_BYTES} bytes, got {len(raw)}")
        y = int.from_bytes(raw[5:], "big")
        if y >= PRIME:
            raise ValueError("a Shamir share's value lies outside the field")
        return cls(int.from_bytes(raw[:4], "big"), y, raw[4])


def split(secret: bytes, threshold: int, num_shares: int) -> list[Share]:
    """Shares at x = 1..num_shares of which any ``threshold`` reconstruct ``secret``."""
    if not 1 <= len(secret) <= SECRET_BYTES:
        raise ValueError(f"Shamir secrets are 1..{SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= num_shares:
        raise ValueError(f"Shamir threshold must lie in 1..{num_shares} (the number of shares), got {threshold}")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, num_shares + 1):
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares.append(Share(x, y, len(secret)))
    return shares


def combine(shares: list[Share], threshold: int) -> bytes:
    """The secret from ``threshold`` or more shares with distinct x (the first ``threshold`` are used)."""
    if len({s.x for s in shares}) != len(shares):
        raise ValueError("Shamir shares must have distinct evaluation points")
    if len(shares) < threshold:
        raise ValueError(f"Shamir reconstruction needs {threshold} shares, got {len(shares)}")
    if len({s.length for s in shares}) != 1:
        raise ValueError("Shamir shares disagree on the secret's length")
    use = shares[:threshold]
    secret = 0
    for i, si in enumerate(use):
        num, den = 1, 1
        for j, sj in enumerate(use):
            if i != j:
                num = num * (-sj.x) % PRIME
                den = den * (si.x - sj.x) % PRIME
        secret = (secret + si.y * num * pow(den, -1, PRIME)) % PRIME
    length = use[0].length
    if secret >= 256**length:
        raise ValueError("Shamir shares do not reconstruct a secret of the stated length (inconsistent shares)")
    return secret.to_bytes(length, "big")
