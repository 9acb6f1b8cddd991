"""One device's side of SecAgg+ (Bell et al. 2020; SecAgg when every client neighbours every other).

Stages, each one call:
  0. ``advertise``: fresh X25519 key pairs (c: sealing shares, s: masks) -> their public halves.
  1. ``share_keys``: a fresh 32-byte self-mask seed b; Shamir t-of-k shares of b and of s's private key,
     one of each per neighbour, sealed with AES-GCM under HKDF(X25519(c_u, c_v)).
  2. ``masked_input``: y = q(x) + PRG(b) + sum_v +-PRG(HKDF(X25519(s_u, s_v))) mod 2^m over the neighbours v
     that shared keys (+ if u < v, - otherwise: the pairwise masks cancel in the sum).
  3. ``unmask``: for each neighbour the server says survived, its share of b; for each it says dropped,
     its share of s's private key; never both for one client, and nothing if fewer than t survived.
All randomness is the OS CSPRNG's (keys, seeds, Shamir coefficients, stochastic rounding); none is derivable
from anything the server sends.
"""

from __future__ import annotations

import secrets

import numpy as np

from fedtune.privacy.secagg import crypto, shamir
from fedtune.privacy.secagg.messages import (
    KeyAdvert,
    MaskedInput,
    SealedShare,
    SecAggAbort,
    SecAggSetup,
    UnmaskReply,
    UnmaskRequest,
)

SHARE_PURPOSE, MASK_PURPOSE = b"share", b"mask"


def pairwise_mask(own_mask_key, peer: int, peer_public: bytes, me: int, setup: SecAggSetup) -> np.ndarray:
    """The mask ``me`` adds for ``peer``: +PRG(s_uv) if me < peer else -PRG(s_uv), mod 2^m. [vector_length]"""
    seed = crypto.agree(own_mask_key, peer_public, MASK_PURPOSE, setup.context)
    mask = crypto.prg(seed, setup.vector_length, setup.quantizer.dtype)
    return mask if me < peer else (np.zeros_like(mask) - mask)


class SecAggClient:
    def __init__(self, cid: int, setup: SecAggSetup):
        if cid not in setup.cohort:
            raise ValueError(f"client {cid} is not in the secure-aggregation cohort")
        self.cid, self.setup = cid, setup
        self._enc_key = crypto.new_private_key()
        self._mask_key = crypto.new_private_key()
        self._seed = secrets.token_bytes(crypto.KEY_BYTES)
        self._peers: dict[int, KeyAdvert] = {}  # neighbours that advertised keys
        self._held: dict[int, tuple[shamir.Share, shamir.Share]] = {}  # owner -> (seed share, key share)
        self._stage = 0

    def _enter(self, stage: int) -> None:
        if self._stage != stage:
            raise SecAggAbort(f"secure aggregation: client {self.cid} was asked for stage {stage} while at stage "
                              f"{self._stage}; each stage runs once, in order")
        self._stage = stage + 1

    def advertise(self) -> KeyAdvert:
        self._enter(0)
        return KeyAdvert(self.cid, crypto.public_bytes(self._enc_key), crypto.public_bytes(self._mask_key))

    def share_keys(self, adverts: dict[int, KeyAdvert]) -> list[SealedShare]:
        self._enter(1)
        mine = set(self.setup.neighbours(self.cid))
        self._peers = {v: a for v, a in adverts.items() if v in mine and v != self.cid}
        t, k = self.setup.threshold, self.setup.num_neighbours
        if len(self._peers) < t:
            raise SecAggAbort(f"secure aggregation: client {self.cid} has {len(self._peers)} live neighbours, "
                              f"fewer than the threshold {t}; the round is abandoned")
        seed_shares = shamir.split(self._seed, t, k)
        key_shares = shamir.split(crypto.private_bytes(self._mask_key), t, k)
        out = []
        for v, advert in sorted(self._peers.items()):
            x = self.setup.share_point(v, self.cid)
            key = crypto.agree(self._enc_key, advert.enc_public, SHARE_PURPOSE, self.setup.context)
            plain = seed_shares[x - 1].to_bytes() + key_shares[x - 1].to_bytes()
            out.append(SealedShare(self.cid, v, crypto.seal(key, plain, _route(self.cid, v))))
        return out

    def masked_input(self, update: np.ndarray, sealed: list[SealedShare], rng: np.random.Generator | None = None
                     ) -> MaskedInput:
        """Mask the float ``update`` [vector_length]; ``sealed``: the shares neighbours sent this client."""
        self._enter(2)
        update = np.asarray(update).ravel()
        if update.shape[0] != self.setup.vector_length:
            raise ValueError(f"secure aggregation: the update has {update.shape[0]} values, the round expects "
                             f"{self.setup.vector_length}")
        for msg in sealed:
            if msg.dst != self.cid or msg.src not in self._peers:
                raise SecAggAbort(f"secure aggregation: client {self.cid} got a share from {msg.src} to {msg.dst}, "
                                  "which is not one of its neighbours' shares for it")
            key = crypto.agree(self._enc_key, self._peers[msg.src].enc_public, SHARE_PURPOSE, self.setup.context)
            plain = crypto.open_sealed(key, msg.sealed, _route(msg.src, self.cid))  # InvalidTag if tampered
            half = len(plain) // 2
            self._held[msg.src] = (shamir.Share.from_bytes(plain[:half]), shamir.Share.from_bytes(plain[half:]))
        q = self.setup.quantizer
        y = q.quantize(update, rng or np.random.default_rng(secrets.randbits(128)))  # [n] ring elements
        y += crypto.prg(self._seed, self.setup.vector_length, q.dtype)
        for v in sorted(self._held):  # neighbours that shared keys (U1): their masks cancel ours
            y += pairwise_mask(self._mask_key, v, self._peers[v].mask_public, self.cid, self.setup)
        return MaskedInput(self.cid, y)

    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        self._enter(3)
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors & dropped:
            raise SecAggAbort(f"secure aggregation: client {self.cid} was asked to reveal both secrets of "
                              f"{sorted(survivors & dropped)}, which would unmask their inputs; refused")
        if len(survivors) < self.setup.threshold or self.cid not in survivors:
            raise SecAggAbort(f"secure aggregation: only {len(survivors)} clients survived, fewer than the "
                              f"threshold {self.setup.threshold}; client {self.cid} reveals nothing")
        seeds = {u: s.to_bytes() for u, (s, _) in self._held.items() if u in survivors}
        keys = {u: k.to_bytes() for u, (_, k) in self._held.items() if u in dropped}
        return UnmaskReply(self.cid, seeds, keys)


def export_state(client: SecAggClient) -> dict:
    """Everything a client keeps between stages, as flat values (ints, bytes and lists of them): its SECRETS,
    for the device's own state store (a Flower ClientApp's context state) and nowhere else."""
    held = sorted(client._held.items())
    return {"cid": client.cid, "stage": client._stage, "enc-key": crypto.private_bytes(client._enc_key),
            "mask-key": crypto.private_bytes(client._mask_key), "seed": client._seed,
            "peer-ids": sorted(client._peers), "peer-enc": [client._peers[v].enc_public for v in sorted(client._peers)],
            "peer-mask": [client._peers[v].mask_public for v in sorted(client._peers)],
            "held-ids": [u for u, _ in held], "held-seed": [s.to_bytes() for _, (s, _) in held],
            "held-key": [k.to_bytes() for _, (_, k) in held]}


def restore_state(setup: SecAggSetup, state: dict) -> SecAggClient:
    """The client ``export_state`` saved, under the setup the device stored at stage 0."""
    client = SecAggClient(int(state["cid"]), setup)
    client._stage = int(state["stage"])
    client._enc_key = crypto.private_from_bytes(bytes(state["enc-key"]))
    client._mask_key = crypto.private_from_bytes(bytes(state["mask-key"]))
    client._seed = bytes(state["seed"])
    client._peers = {int(v): KeyAdvert(int(v), bytes(e), bytes(m))
                     for v, e, m in zip(state["peer-ids"], state["peer-enc"], state["peer-mask"])}
    client._held = {int(u): (shamir.Share.from_bytes(bytes(s)), shamir.Share.from_bytes(bytes(k)))
                    for u, s, k in zip(state["held-ids"], state["held-seed"], state["held-key"])}
    return client


def _route(src: int, dst: int) -> bytes:
    return src.to_bytes(8, "big") + dst.to_bytes(8, "big")
