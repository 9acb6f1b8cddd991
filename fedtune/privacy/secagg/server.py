"""The server's side of SecAgg+: it relays keys and sealed shares, adds masked inputs into one running sum,
and removes the masks from the shares survivors reveal. What it ever holds: public keys, ciphertexts it
cannot open, the running sum of masked inputs (never an input on its own: ``collect_masked`` adds each one
in and keeps only the sum), the shares it asked for, and the final sum of the survivors' inputs.
"""

from __future__ import annotations

import numpy as np

from fedtune.privacy.secagg import crypto, shamir
from fedtune.privacy.secagg.client import pairwise_mask
from fedtune.privacy.secagg.messages import (
    KeyAdvert,
    MaskedInput,
    SealedShare,
    SecAggAbort,
    SecAggSetup,
    UnmaskReply,
    UnmaskRequest,
)


class SecAggServer:
    def __init__(self, setup: SecAggSetup):
        self.setup = setup
        self.adverts: dict[int, KeyAdvert] = {}
        self.shared: set[int] = set()  # U1: sent sealed shares
        self.survivors: tuple[int, ...] = ()  # U2: sent a masked input
        self.dropped: tuple[int, ...] = ()  # U1 \ U2
        self.masked_sum: np.ndarray | None = None  # sum of masked inputs, mod 2^m

    def _require(self, stage: str, alive: int) -> None:
        if alive < self.setup.threshold:
            raise SecAggAbort(f"secure aggregation, stage '{stage}': {alive} clients left, fewer than the threshold "
                              f"{self.setup.threshold}; the round is abandoned (no partial sum is revealed). "
                              "Sample more devices or lower secure_aggregation.threshold")

    def collect_adverts(self, adverts: list[KeyAdvert]) -> dict[int, dict[int, KeyAdvert]]:
        """Stage 0 -> 1: each advertising client gets its advertising neighbours' public keys."""
        self.adverts = {a.cid: a for a in adverts if a.cid in self.setup.cohort}
        self._require("advertise keys", len(self.adverts))
        return {u: {v: self.adverts[v] for v in self.setup.neighbours(u) if v in self.adverts} for u in self.adverts}

    def route_shares(self, batches: list[list[SealedShare]]) -> dict[int, list[SealedShare]]:
        """Stage 1 -> 2: forward each sealed share to its addressee (only among clients that shared)."""
        self.shared = {b[0].src for b in batches if b}
        self._require("share keys", len(self.shared))
        inbox: dict[int, list[SealedShare]] = {u: [] for u in self.shared}
        for batch in batches:
            for msg in batch:
                if msg.src not in self.shared or msg.dst not in self.setup.neighbours(msg.src):
                    raise SecAggAbort(f"secure aggregation: client {msg.src} addressed a share to {msg.dst}, "
                                      "not one of its neighbours")
                if msg.dst in inbox:
                    inbox[msg.dst].append(msg)
        return inbox

    def collect_masked(self, inputs: list[MaskedInput]) -> UnmaskRequest:
        """Stage 2 -> 3: add each masked input into the running sum; ask survivors for the unmasking shares."""
        q = self.setup.quantizer
        total = np.zeros(self.setup.vector_length, dtype=q.dtype)
        survivors = []
        for msg in inputs:
            if msg.cid not in self.shared or msg.cid in survivors:
                raise SecAggAbort(f"secure aggregation: a masked input from client {msg.cid}, which did not share "
                                  "keys this round or already sent one")
            if msg.vector.dtype != q.dtype or msg.vector.shape != (self.setup.vector_length,):
                raise SecAggAbort(f"secure aggregation: client {msg.cid} sent a {msg.vector.dtype} vector of shape "
                                  f"{msg.vector.shape}; expected {q.dtype} [{self.setup.vector_length}]")
            total += msg.vector
            survivors.append(msg.cid)
        self._require("masked input", len(survivors))
        self.masked_sum = total
        self.survivors = tuple(sorted(survivors))
        self.dropped = tuple(sorted(self.shared - set(survivors)))
        return UnmaskRequest(self.survivors, self.dropped)

    def unmask(self, replies: list[UnmaskReply]) -> np.ndarray:
        """Stage 3: reconstruct survivors' seeds and dropped clients' mask keys; the survivors' sum. [n] float64"""
        if self.masked_sum is None:
            raise SecAggAbort("secure aggregation: unmask before any masked input was collected")
        replies = [r for r in replies if r.cid in self.survivors]
        self._require("unmask", len(replies))
        q = self.setup.quantizer
        total = self.masked_sum.copy()
        for u in self.survivors:  # remove the self masks
            seed = self._reconstruct(u, [r.seed_shares for r in replies], "self-mask seed")
            total -= crypto.prg(seed, self.setup.vector_length, q.dtype)
        for u in self.dropped:  # remove the pairwise masks survivors added for a client that vanished
            key = crypto.private_from_bytes(self._reconstruct(u, [r.key_shares for r in replies], "mask key"))
            for v in self.setup.neighbours(u):
                if v in self.survivors:
                    # v added pairwise_mask(s_v, u); it equals pairwise_mask(s_u, v) with the sign flipped
                    total += pairwise_mask(key, v, self.adverts[v].mask_public, u, self.setup)
        return q.dequantize_sum(total)

    def _reconstruct(self, owner: int, offered: list[dict[int, bytes]], what: str) -> bytes:
        shares = [shamir.Share.from_bytes(d[owner]) for d in offered if owner in d]
        if len(shares) < self.setup.threshold:
            raise SecAggAbort(f"secure aggregation, stage 'unmask': {len(shares)} shares of client {owner}'s {what} "
                              f"arrived, the threshold is {self.setup.threshold}; too many of its neighbours "
                              "dropped out to finish the round (no partial sum is revealed)")
        return shamir.combine(shares, self.setup.threshold)
