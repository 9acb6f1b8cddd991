"""What the secure-aggregation parties say to each other: the round's public setup and one message type
per protocol stage. Every field is something the server may see; ``nbytes`` is its size on the wire
(ids 8 bytes, raw keys and ciphertexts as they are), used to measure the protocol's cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedtune.privacy.secagg.field import FieldQuantizer

ID_BYTES = 8


class SecAggAbort(RuntimeError):
    """The round cannot finish without weakening the protocol (too few clients left, or a peer misbehaved)."""


@dataclass(frozen=True)
class SecAggSetup:
    """Public for the whole cohort: who takes part, the neighbour graph, the threshold, the ring."""

    context: bytes  # binds every derived key to this run and round (e.g. b"run-id/round-3")
    cohort: tuple[int, ...]  # client ids; a client's position in this tuple places it on the ring
    num_neighbours: int  # k: each client masks with, and shares its secrets among, k neighbours
    threshold: int  # t: shares that reconstruct a secret; also the fewest clients the server may sum
    vector_length: int
    quantizer: FieldQuantizer
    _pos: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        n = len(self.cohort)
        if len(set(self.cohort)) != n or n < 2:
            raise ValueError(f"secure aggregation needs >= 2 distinct client ids, got {list(self.cohort)}")
        k = self.num_neighbours
        if not (1 <= k <= n - 1) or (k < n - 1 and k % 2):
            raise ValueError(f"secure aggregation: num_neighbours must be even and in 2..{n - 1}, or exactly "
                             f"{n - 1} (everyone), got {k}")
        if not (k // 2 < self.threshold <= k):
            raise ValueError(f"secure aggregation: threshold must lie in {k // 2 + 1}..{k} (more than half of the "
                             f"{k} neighbours, so the server can never hold both shares of one client's secrets); "
                             f"got {self.threshold}")
        if self.quantizer.max_summands < n:
            raise ValueError(f"secure aggregation: the quantizer sums at most {self.quantizer.max_summands} "
                             f"clients, the cohort has {n}")
        object.__setattr__(self, "_pos", {c: i for i, c in enumerate(self.cohort)})

    def neighbours(self, cid: int) -> tuple[int, ...]:
        """The k clients ``cid`` pairs with: everyone else, or the k/2 on each side of it on the ring."""
        n, i = len(self.cohort), self._pos[cid]
        if self.num_neighbours == n - 1:
            return tuple(c for c in self.cohort if c != cid)
        half = self.num_neighbours // 2
        return tuple(self.cohort[(i + d) % n] for d in list(range(-half, 0)) + list(range(1, half + 1)))

    def share_point(self, holder: int, owner: int) -> int:
        """The Shamir evaluation point (1..k) of ``holder``'s share of ``owner``'s secrets."""
        return self.neighbours(owner).index(holder) + 1


@dataclass(frozen=True)
class KeyAdvert:  # stage 0, client -> server -> neighbours
    cid: int
    enc_public: bytes  # X25519, for sealing shares
    mask_public: bytes  # X25519, for pairwise masks

    def nbytes(self) -> int:
        return ID_BYTES + len(self.enc_public) + len(self.mask_public)


@dataclass(frozen=True)
class SealedShare:  # stage 1, client -> server -> one neighbour; the server cannot read it
    src: int
    dst: int
    sealed: bytes  # AES-GCM(shares of src's self-mask seed and mask private key)

    def nbytes(self) -> int:
        return 2 * ID_BYTES + len(self.sealed)


@dataclass(frozen=True)
class MaskedInput:  # stage 2, client -> server: uniform in the ring on its own
    cid: int
    vector: np.ndarray  # [vector_length] ring elements

    def nbytes(self) -> int:
        return ID_BYTES + self.vector.nbytes


@dataclass(frozen=True)
class UnmaskRequest:  # stage 3, server -> survivors
    survivors: tuple[int, ...]  # sent a masked input: reveal shares of their self-mask seeds
    dropped: tuple[int, ...]  # shared keys, then vanished: reveal shares of their mask private keys

    def nbytes(self) -> int:
        return ID_BYTES * (len(self.survivors) + len(self.dropped))


@dataclass(frozen=True)
class UnmaskReply:  # stage 3, survivor -> server
    cid: int
    seed_shares: dict[int, bytes]  # owner -> share of the owner's self-mask seed
    key_shares: dict[int, bytes]  # owner -> share of the owner's mask private key

    def nbytes(self) -> int:
        return ID_BYTES + sum(ID_BYTES + len(s) for s in (*self.seed_shares.values(), *self.key_shares.values()))
