"""Authenticated key adverts: the malicious-server variant of SecAgg+ (Bell et al. 2020; Bonawitz et al. 2017,
"active adversary": every client signs its stage-0 key advert with a long-term key the others already know).

Without it, the server that relays the adverts can hand client u its own X25519 key in place of neighbour v's:
u then seals v's shares and derives the u-v pairwise mask with a key the server holds, and the server can strip
u's masks. With it, each device holds an ed25519 **identity key** (``DeviceIdentity``) registered with the
operator beside its node-auth key (Flower's node keys are EC P-384, not ed25519, so the identity key is its
own key pair: ``fedtune.deploy.certs.make_device_identity``); the public halves form an ``IdentityRegistry``
every device holds before the round. Stage 0 signs (context, cid, enc key, mask key); before sealing anything a
device verifies every neighbour's advert against the registry and aborts the round, naming the neighbour, if
one is unsigned, signed by another key, for another client id, or for another run/round (a replay).

Trust left: the registry must come from the operator's registration (the PKI), not from the server in the
round. The later stages' consistency checks of the full malicious-server protocol (signed survivor lists) are
not part of this module.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedtune.privacy.secagg.client import SecAggClient
from fedtune.privacy.secagg.messages import KeyAdvert, SecAggAbort

_DOMAIN = b"fedtune.secagg.advert/v1"


@dataclass(frozen=True)
class SignedKeyAdvert(KeyAdvert):  # stage 0 with its ed25519 signature; relayed by the server as is
    signature: bytes = b""

    def nbytes(self) -> int:
        return super().nbytes() + len(self.signature)


def advert_payload(advert: KeyAdvert, context: bytes) -> bytes:
    """What a device signs: domain, the round's context, its id and both public keys (length-prefixed)."""
    parts = [_DOMAIN, context, advert.cid.to_bytes(8, "big"), advert.enc_public, advert.mask_public]
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


class DeviceIdentity:
    """A device's long-term ed25519 signing key (kept on the device; only its public half is registered)."""

    def __init__(self, key: Ed25519PrivateKey):
        self._key = key

    @classmethod
    def generate(cls) -> "DeviceIdentity":
        return cls(Ed25519PrivateKey.generate())  # OS randomness

    @classmethod
    def load(cls, path: str | Path) -> "DeviceIdentity":
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: expected an ed25519 private key (fedtune.deploy.certs.make_device_identity), "
                             f"got {type(key).__name__}")
        return cls(key)

    def save(self, path: str | Path) -> None:
        """PEM (PKCS#8), mode 0600."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)

    def public_bytes(self) -> bytes:
        return self._key.public_key().public_bytes_raw()

    def sign(self, advert: KeyAdvert, context: bytes) -> SignedKeyAdvert:
        sig = self._key.sign(advert_payload(advert, context))
        return SignedKeyAdvert(advert.cid, advert.enc_public, advert.mask_public, sig)


@dataclass(frozen=True)
class IdentityRegistry:
    """Client id -> its registered ed25519 public key (32 raw bytes), as the operator registered them."""

    keys: Mapping[int, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for cid, raw in self.keys.items():
            if len(raw) != 32:
                raise ValueError(f"identity registry: client {cid}'s key has {len(raw)} bytes; expected a raw "
                                 "32-byte ed25519 public key (DeviceIdentity.public_bytes())")

    @classmethod
    def load(cls, path: str | Path) -> "IdentityRegistry":
        """A JSON object {"<client id>": "<hex ed25519 public key>"} (``save``'s format)."""
        return cls({int(c): bytes.fromhex(h) for c, h in json.loads(Path(path).read_text()).items()})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({str(c): k.hex() for c, k in sorted(self.keys.items())}, indent=1))

    def verify(self, advert: KeyAdvert, context: bytes, *, sender: int, verifier: int) -> None:
        """Raise ``SecAggAbort`` unless ``advert`` is ``sender``'s, signed by its registered key for ``context``."""
        why = None
        if advert.cid != sender:
            why = f"it claims to be client {advert.cid}'s"
        elif not isinstance(advert, SignedKeyAdvert) or not advert.signature:
            why = "it carries no signature"
        elif sender not in self.keys:
            why = "the client has no registered identity key"
        else:
            try:
                Ed25519PublicKey.from_public_bytes(self.keys[sender]).verify(advert.signature,
                                                                              advert_payload(advert, context))
            except InvalidSignature:
                why = ("its signature does not verify under the client's registered identity key for this round "
                       "(a substituted key or a replayed advert)")
        if why is not None:
            raise SecAggAbort(f"secure aggregation: client {verifier} rejects the key advert relayed for client "
                              f"{sender}: {why}; the server (or the network) altered it, so the round is aborted "
                              "before any share is sealed")


class AuthenticatedClient:
    """A ``SecAggClient`` that signs its advert and verifies its neighbours' before stage 1."""

    def __init__(self, client: SecAggClient, identity: DeviceIdentity, registry: IdentityRegistry):
        self.client, self.identity, self.registry = client, identity, registry

    @property
    def cid(self) -> int:
        return self.client.cid

    def advertise(self) -> SignedKeyAdvert:
        return self.identity.sign(self.client.advertise(), self.client.setup.context)

    def share_keys(self, adverts: dict[int, KeyAdvert]):
        for sender, advert in sorted(adverts.items()):
            if sender != self.cid:
                self.registry.verify(advert, self.client.setup.context, sender=sender, verifier=self.cid)
        return self.client.share_keys(adverts)

    def masked_input(self, *args, **kwargs):
        return self.client.masked_input(*args, **kwargs)

    def unmask(self, *args, **kwargs):
        return self.client.unmask(*args, **kwargs)


@dataclass(frozen=True)
class AdvertAuth:
    """What ``run_secure_aggregation(auth=...)`` needs: each simulated device's identity and the registry."""

    identities: Mapping[int, DeviceIdentity]
    registry: IdentityRegistry

    @classmethod
    def generate(cls, cohort) -> "AdvertAuth":
        """Fresh identities for ``cohort``, all registered (a simulation's honest PKI)."""
        ids = {c: DeviceIdentity.generate() for c in cohort}
        return cls(ids, IdentityRegistry({c: i.public_bytes() for c, i in ids.items()}))

    def client(self, client: SecAggClient) -> AuthenticatedClient:
        if client.cid not in self.identities:
            raise ValueError(f"secure aggregation: no identity key for client {client.cid}; register one "
                             "(fedtune.deploy.certs.make_device_identity)")
        return AuthenticatedClient(client, self.identities[client.cid], self.registry)
