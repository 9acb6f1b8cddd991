"""Signed, expiring, versioned metadata in the model of TUF / Uptane: a root of trust and channel metadata.

The documents travel inside the same envelope, ``{"signed": {...}, "signatures": [{"keyid", "sig"}]}``
(ed25519 over the canonical JSON of ``signed``):

- **root** (TUF's root role): the keys of the registry and, per role, which keys and how many of them
  (the threshold) must sign. Role ``root`` signs the next root; ``release`` (TUF's targets) signs channel
  metadata and manifests; ``snapshot`` and ``timestamp`` sign the documents of ``freshness.py``. Root
  version N+1 must be signed by a threshold of version N's root keys *and* of its own, so a device walks
  the chain 1, 2, 3... from the key it was provisioned with (key rotation, of every role).
- **channel** (TUF's targets, for one base model and one channel): a monotonically increasing
  version, an expiry, the artifact(s) this channel serves now (name, version, sha256 and size of the
  signed manifest) and the staged rollout. A device refuses channel metadata that is not signed by the
  release threshold, is meant for another base model/channel/artifact, is expired, is older than
  (or, at the same version, different from) what it already accepted, or is not the version and hash
  the signed snapshot pins. A rollback is a new, higher version that points to an older artifact.
- **snapshot** and **timestamp** (``freshness.py``): the snapshot pins every channel's newest metadata
  (version + hash); the timestamp, short-lived and re-signed often, pins the snapshot. Together they let
  a device tell a frozen or mix-and-match server from a quiet one.

Why not python-tuf itself: its client (ngclient) expects the four fixed roles over a file tree of
targets and has no notion of per-device staged rollout; this module keeps TUF's rules (thresholds,
root chaining, expiry, version monotonicity, length + hash pinning) over fedtune's own documents.
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, Sequence, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedtune.registry.errors import ExpiredError, ManifestError, ReplayError, SignatureError
from fedtune.registry.manifest import SignedManifest, canonical_json
from fedtune.registry.signing import SigningKey, VerifyKey, key_id

MAX_METADATA_BYTES = 1 << 20  # a root, channel metadata or manifest larger than this is refused unread
ROOT_ROLE, RELEASE_ROLE, SNAPSHOT_ROLE, TIMESTAMP_ROLE = "root", "release", "snapshot", "timestamp"
ROLES = (ROOT_ROLE, RELEASE_ROLE, SNAPSHOT_ROLE, TIMESTAMP_ROLE)
ANCHOR_EXPIRES = "9999-12-31T00:00:00+00:00"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RoleSpec(_Frozen):
    keyids: tuple[str, ...]
    threshold: int = Field(ge=1)


class RootMeta(_Frozen):
    type: Literal["root"] = "root"
    version: int = Field(ge=0)  # 0 = the implicit root of a device provisioned with a single public key
    expires: str
    keys: dict[str, str]  # keyid -> base64 of the raw ed25519 public key
    roles: dict[str, RoleSpec]

    @model_validator(mode="after")
    def _consistent(self) -> "RootMeta":
        for kid, raw in self.keys.items():
            if key_id(public_from_b64(raw)) != kid:
                raise ValueError(f"root v{self.version}: key id {kid} does not match its key")
        unknown = sorted(set(self.roles) - set(ROLES))
        if unknown:
            raise ValueError(f"root v{self.version}: unknown role(s) {unknown}; expected {list(ROLES)}")
        for name in ROLES:
            role = self.roles.get(name)
            if role is None:
                raise ValueError(f"root v{self.version}: no {name!r} role")
            missing = [k for k in role.keyids if k not in self.keys]
            if missing or role.threshold > len(set(role.keyids)):
                raise ValueError(f"root v{self.version}: role {name!r} names unknown keys {missing} or a "
                                 f"threshold {role.threshold} above its {len(set(role.keyids))} keys")
        return self

    def role_keys(self, role: str) -> dict[str, Ed25519PublicKey]:
        return {k: public_from_b64(self.keys[k]) for k in self.roles[role].keyids}


class ChannelTarget(_Frozen):
    name: str  # the artifact's name (manifest.name)
    version: int = Field(gt=0)  # the artifact version (manifest.version)
    manifest_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # of the signed manifest's bytes as served
    manifest_size: int = Field(gt=0, le=MAX_METADATA_BYTES)


class ChannelMeta(_Frozen):
    type: Literal["channel"] = "channel"
    version: int = Field(gt=0)  # metadata version: +1 on every promote, rollback and refresh
    expires: str
    base_model: str
    channel: str
    current: ChannelTarget | None
    candidate: ChannelTarget | None = None
    rollout: float = Field(ge=0, le=100)  # percent of devices that take `candidate`
    rollout_salt: str


M = TypeVar("M", RootMeta, ChannelMeta)


# --- time -------------------------------------------------------------------------------------------
def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def expires_in(seconds: float) -> str:
    return (utcnow() + timedelta(seconds=seconds)).replace(microsecond=0).isoformat()


def check_fresh(expires: str, what: str, now: datetime | None = None) -> None:
    when = datetime.fromisoformat(expires)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    if (now or utcnow()) >= when:
        raise ExpiredError(f"{what} expired at {expires}; the registry must re-sign it (`fedtune registry "
                           "refresh`), or this server is replaying old metadata. Keeping the active adapter")


# --- sign / verify ----------------------------------------------------------------------------------
def public_from_b64(raw_b64: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(raw_b64, validate=True))


def public_b64(key: VerifyKey | SigningKey) -> str:
    raw = key.public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def sign_document(signed: BaseModel, keys: Sequence[SigningKey]) -> bytes:
    """The envelope bytes (canonical JSON) of ``signed`` with one signature per distinct key."""
    body = canonical_json(signed.model_dump(mode="json"))
    sigs, seen = [], set()
    for k in keys:
        if k.key_id not in seen:
            seen.add(k.key_id)
            sigs.append({"keyid": k.key_id, "sig": base64.b64encode(k.private.sign(body)).decode()})
    return canonical_json({"signed": signed.model_dump(mode="json"), "signatures": sigs})


def parse_envelope(data: bytes, what: str) -> tuple[dict[str, Any], list[dict[str, str]]]:
    if len(data) > MAX_METADATA_BYTES:
        raise ManifestError(f"{what}: {len(data)} bytes, more than the {MAX_METADATA_BYTES} a metadata "
                            "document may have; refusing it")
    try:
        env = json.loads(data)
        signed, sigs = env["signed"], env["signatures"]
        if not isinstance(signed, dict) or not isinstance(sigs, list):
            raise TypeError
        sigs = [{"keyid": str(s["keyid"]), "sig": str(s["sig"])} for s in sigs]
    except (ValueError, TypeError, KeyError):
        raise ManifestError(f"{what}: not a signed metadata envelope (expected JSON with 'signed' and "
                            "'signatures')") from None
    return signed, sigs


def count_valid(signed: dict[str, Any], sigs: list[dict[str, str]], keys: dict[str, Ed25519PublicKey]) -> int:
    """How many distinct trusted keys signed ``signed`` (bad or unknown signatures count for nothing)."""
    body, good = canonical_json(signed), set()
    for s in sigs:
        pub = keys.get(s["keyid"])
        if pub is None or s["keyid"] in good:
            continue
        try:
            pub.verify(base64.b64decode(s["sig"], validate=True), body)
            good.add(s["keyid"])
        except (InvalidSignature, ValueError):
            continue
    return len(good)


def _check_threshold(signed, sigs, root: RootMeta, role: str, what: str) -> None:
    spec = root.roles[role]
    n = count_valid(signed, sigs, root.role_keys(role))
    if n < spec.threshold:
        raise SignatureError(f"{what}: {n} valid signature(s) from root v{root.version}'s {role!r} keys, "
                             f"{spec.threshold} required; refusing it (forged, altered, or signed by keys "
                             "this device does not trust)")


def verify_document(data: bytes, root: RootMeta, role: str, kind: type[M], what: str) -> M:
    signed, sigs = parse_envelope(data, what)
    _check_threshold(signed, sigs, root, role, what)
    try:
        return kind.model_validate(signed)
    except ValidationError as err:
        raise ManifestError(f"{what}: signed, but not a valid {kind.__name__}: {err.errors()[0]['msg']}") from None


# --- roots ------------------------------------------------------------------------------------------
def anchor_root(key: VerifyKey) -> RootMeta:
    """The implicit root v0 of a device provisioned with one public key: that key, threshold 1, every role."""
    kid = key.key_id
    spec = RoleSpec(keyids=(kid,), threshold=1)
    return RootMeta(version=0, expires=ANCHOR_EXPIRES, keys={kid: public_b64(key)},
                    roles={role: spec for role in ROLES})


def make_root(version: int, root_keys: Sequence[VerifyKey], root_threshold: int, release_keys: Sequence[VerifyKey],
              release_threshold: int, ttl_s: float, snapshot_keys: Sequence[VerifyKey] | None = None,
              snapshot_threshold: int = 1, timestamp_keys: Sequence[VerifyKey] | None = None,
              timestamp_threshold: int = 1) -> RootMeta:
    """Root metadata; the snapshot and timestamp roles default to the release keys (threshold 1)."""
    per_role = {ROOT_ROLE: (root_keys, root_threshold), RELEASE_ROLE: (release_keys, release_threshold),
                SNAPSHOT_ROLE: (release_keys, 1) if snapshot_keys is None else (snapshot_keys, snapshot_threshold),
                TIMESTAMP_ROLE: (release_keys, 1) if timestamp_keys is None else (timestamp_keys, timestamp_threshold)}
    keys = {k.key_id: public_b64(k) for ks, _ in per_role.values() for k in ks}
    return RootMeta(version=version, expires=expires_in(ttl_s), keys=keys, roles={
        role: RoleSpec(keyids=tuple(dict.fromkeys(k.key_id for k in ks)), threshold=t)
        for role, (ks, t) in per_role.items()})


def next_root(trusted: RootMeta, data: bytes) -> RootMeta:
    """Accept root version trusted.version + 1 iff a threshold of the old *and* of the new root keys signed it."""
    what = f"root metadata after v{trusted.version}"
    signed, sigs = parse_envelope(data, what)
    _check_threshold(signed, sigs, trusted, ROOT_ROLE, what)
    try:
        new = RootMeta.model_validate(signed)
    except ValidationError as err:
        raise ManifestError(f"{what}: not a valid root: {err.errors()[0]['msg']}") from None
    if new.version != trusted.version + 1:
        raise ReplayError(f"{what}: got root v{new.version}, expected v{trusted.version + 1}")
    _check_threshold(signed, sigs, new, ROOT_ROLE, f"root v{new.version} (its own keys)")
    return new


def root_from_json(data: bytes) -> RootMeta:
    """A root metadata file a device is provisioned with (its signatures are checked by its successors)."""
    signed, _ = parse_envelope(data, "root metadata file")
    return RootMeta.model_validate(signed)


def verify_manifest_by_root(signed: SignedManifest, keys: dict[str, Ed25519PublicKey]) -> None:
    """A manifest carries one signature; it must be by a release key the device trusts."""
    m = signed.manifest
    pub = keys.get(signed.key_id)
    if pub is None:
        raise SignatureError(f"manifest v{m.version} is signed by key {signed.key_id}, which is not a release key "
                             f"this device trusts ({sorted(keys)}); refusing it")
    try:
        pub.verify(base64.b64decode(signed.signature, validate=True), m.canonical_bytes())
    except (InvalidSignature, ValueError):
        raise SignatureError(f"manifest v{m.version} ({m.name}): ed25519 signature does not match its contents "
                             f"(key {signed.key_id}); the manifest was altered after signing. Refusing it.") from None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_anchor(path) -> VerifyKey | RootMeta:
    """What a device is provisioned with: a PEM public key (``keygen``'s .pub) or a root metadata file (JSON)."""
    from pathlib import Path

    from fedtune.registry.errors import InputError
    from fedtune.registry.signing import load_verify_key

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; expected the publisher's .pub key or a root metadata file "
                         "(`fedtune registry root --out root.json`)")
    if path.read_bytes().lstrip().startswith(b"-----BEGIN"):
        return load_verify_key(path)
    try:
        return root_from_json(path.read_bytes())
    except (ManifestError, ValidationError) as err:
        raise InputError(f"{path}: neither a PEM public key nor a root metadata file ({str(err)[:120]})") from None
