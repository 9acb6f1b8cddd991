"""The registry: signed, versioned adapter artifacts over a blob store + SQLite metadata.

    registry_root/
      registry.sqlite     artifacts (signed manifests), channels, events      (db.py)
      blobs/              content-addressed files                             (store.py)

1. ``publish``: hash + store every file of an adapter directory, assign the next version, build the
   manifest, sign it, record it. Nothing is visible to devices until it is promoted.
2. ``promote(v, channel, rollout, keys)``: 100% makes v the channel's `current`; less stages v as the
   `candidate` for the devices whose rollout bucket is below the percentage (rollout.py).
3. ``rollback(..., keys)``: abort a staged candidate, or else return `current` to the one before it.
4. Every promote / rollback / ``refresh`` writes new channel metadata (metadata.py): version + 1, signed
   by the release keys, expiring after ``ttl_s``; then a new snapshot (pins every channel's newest
   metadata, signed by the snapshot keys) and a new timestamp (pins the snapshot, expires within a day,
   signed by the timestamp keys; freshness.py). ``refresh_timestamp`` re-signs only the timestamp (a cron
   job holding only the timestamp key). Devices trust only these, never the server's answers.
5. ``resolve(base, channel, device)``: the signed manifest this device should run, or None.

The root of trust (``roots``) is made on the first publish from its key (threshold 1) and changed only by
``rotate_root``, signed by a threshold of the old and of the new root keys.
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

from fedtune.registry.db import ArtifactRow, ChannelState, Event, MetadataDB
from fedtune.registry.errors import ManifestError, NotFoundError, RegistryError, SignatureError
from fedtune.registry.manifest import (AdapterInfo, BaseModelRef, Manifest, PrivacyGuarantee, Provenance,
                                       SignedManifest, file_entries, now_iso)
from fedtune.registry.freshness import (TIMESTAMP_TTL_S, SnapshotMeta, TimestampMeta, channel_key, pin)
from fedtune.registry.metadata import (RELEASE_ROLE, SNAPSHOT_ROLE, TIMESTAMP_ROLE, ChannelMeta, ChannelTarget,
                                       RootMeta, expires_in, make_root, next_root, root_from_json, sha256_hex,
                                       sign_document, verify_document)
from fedtune.registry.rollout import choose_version
from fedtune.registry.signing import SigningKey, VerifyKey, sign_manifest, verify_manifest
from fedtune.registry.store import BlobStore, DirectoryBlobStore

log = logging.getLogger(__name__)

_CHANNEL = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
CHANNEL_TTL_S = 7 * 86400  # channel metadata expires a week after signing unless refreshed
ROOT_TTL_S = 365 * 86400
Keys = SigningKey | Sequence[SigningKey]


def _keys(keys: Keys | None, action: str) -> list[SigningKey]:
    if keys is None:
        raise RegistryError(f"{action} is a signed act: pass the release signing key(s) (--key)")
    return [keys] if isinstance(keys, SigningKey) else list(keys)


def _sign_role(doc, root: RootMeta, role: str, signers: list[SigningKey], kind, what: str) -> bytes:
    """Sign ``doc`` with the given keys that hold ``role``; never store what a device would refuse."""
    mine = [k for k in signers if k.key_id in root.roles[role].keyids] or signers
    envelope = sign_document(doc, mine)
    verify_document(envelope, root, role, kind, what)  # the role's threshold of root v(newest), or raise
    return envelope


@dataclass(frozen=True)
class ArtifactInfo:
    """Everything a manifest says about an adapter except its version, files and creation time."""

    name: str
    base_model: BaseModelRef
    adapter: AdapterInfo
    source: Provenance
    privacy: PrivacyGuarantee
    metrics: dict[str, float]


def check_channel(channel: str) -> str:
    if not _CHANNEL.match(channel):
        raise RegistryError(f"channel {channel!r}: expected lowercase letters, digits, '.', '_' or '-' "
                            "(e.g. stable, beta)")
    return channel


class Registry:
    def __init__(self, root: Path, store: BlobStore | None = None):
        self.root = Path(root)
        self.db = MetadataDB(self.root / "registry.sqlite")
        self.store: BlobStore = store if store is not None else DirectoryBlobStore(self.root / "blobs")
        # Version-independent, fixed for the registry's life: the same devices are early every time.
        self.rollout_salt = self.db.ensure_meta("rollout_salt", secrets.token_hex(16))

    # --- publish ----------------------------------------------------------------------------------
    def publish(self, adapter_dir: Path, info: ArtifactInfo, key: SigningKey) -> SignedManifest:
        adapter_dir = Path(adapter_dir)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise ManifestError(f"{adapter_dir}: expected a PEFT adapter directory with adapter_config.json "
                                "(e.g. a run's adapters/round-N)")
        self._check_release_key(key)
        files = file_entries(adapter_dir)
        for f in files:
            digest = self.store.put_file(adapter_dir / f.path)
            if digest != f.sha256:
                raise RegistryError(f"{adapter_dir / f.path} changed while publishing "
                                    f"(hashed {f.sha256}, stored {digest}); publish again")
        with self.db.transaction() as con:
            version = self.db.next_version(con)
            manifest = Manifest(name=info.name, version=version, base_model=info.base_model,
                                adapter=info.adapter, source=info.source, metrics=info.metrics,
                                privacy=info.privacy, created_at=now_iso(), files=files)
            signed = sign_manifest(manifest, key)
            verify_manifest(signed, VerifyKey(key.public))  # never record what a device would refuse
            self.db.insert_artifact(con, ArtifactRow(version, info.name, info.base_model.id,
                                                     info.base_model.sha256, signed.to_bytes(), manifest.created_at))
        log.info("published %s v%d (%d files, %d bytes) for %s", info.name, version, len(files),
                 manifest.total_bytes, info.base_model.id)
        return signed

    # --- read -------------------------------------------------------------------------------------
    def row(self, version: int) -> ArtifactRow:
        row = self.db.artifact(version)
        if row is None:
            known = [r.version for r in self.db.artifacts()]
            raise NotFoundError(f"no version {version} in registry {self.root} (versions: {known or 'none'})")
        return row

    def get(self, version: int) -> SignedManifest:
        return SignedManifest.from_bytes(self.row(version).envelope)

    def versions(self, base_model_id: str | None = None) -> list[SignedManifest]:
        return [SignedManifest.from_bytes(r.envelope) for r in self.db.artifacts(base_model_id)]

    def channels(self) -> list[ChannelState]:
        return self.db.channels()

    def channel(self, base_model_id: str, channel: str) -> ChannelState:
        return self.db.channel(base_model_id, check_channel(channel))

    def events(self, limit: int = 50) -> list[Event]:
        return self.db.events(limit)

    def open_blob(self, digest: str) -> BinaryIO:
        return self.store.open(digest)

    # --- rollout ----------------------------------------------------------------------------------
    def promote(self, version: int, channel: str = "stable", rollout: float = 100.0, keys: Keys | None = None,
                ttl_s: float = CHANNEL_TTL_S) -> ChannelState:
        signers = _keys(keys, "promote")
        check_channel(channel)
        if not 0 < rollout <= 100:
            raise RegistryError(f"rollout: expected a percentage in (0, 100], got {rollout}")
        base = self.row(version).base_model_id
        with self.db.transaction() as con:
            s = self.db.channel_in(con, base, channel)
            if rollout >= 100:
                history = s.history + ((s.current,) if s.current is not None and s.current != version else ())
                new = ChannelState(base, channel, version, None, 0.0, history)
                detail = "100%" + (f" (replaces v{s.current})" if s.current not in (None, version) else "")
                if s.candidate not in (None, version):
                    detail += f"; drops staged v{s.candidate}"
            else:
                if s.current == version:
                    raise RegistryError(f"v{version} is already on {channel} for every device; to take it back "
                                        f"use rollback, to stage another version promote that one")
                new = ChannelState(base, channel, s.current, version, rollout, s.history)
                detail = f"{rollout:g}% (others stay on {f'v{s.current}' if s.current else 'nothing'})"
            self.db.write_channel(con, new, "promote", version, detail)
            self._sign_channel(con, new, signers, ttl_s)
        log.info("promoted v%d on %s/%s: %s", version, base, channel, detail)
        return new

    def rollback(self, base_model_id: str, channel: str = "stable", keys: Keys | None = None,
                 ttl_s: float = CHANNEL_TTL_S) -> ChannelState:
        """Abort the staged candidate if there is one; otherwise return `current` to its predecessor.

        Signed like a promotion: new channel metadata, a higher version, pointing to the older artifact.
        """
        signers = _keys(keys, "rollback")
        check_channel(channel)
        with self.db.transaction() as con:
            s = self.db.channel_in(con, base_model_id, channel)
            if s.candidate is not None:
                new = ChannelState(base_model_id, channel, s.current, None, 0.0, s.history)
                version, detail = s.candidate, f"aborted staged v{s.candidate} at {s.rollout:g}%"
            elif s.history:
                new = ChannelState(base_model_id, channel, s.history[-1], None, 0.0, s.history[:-1])
                version, detail = s.history[-1], f"v{s.current} -> v{s.history[-1]}"
            else:
                raise RegistryError(
                    f"nothing to roll back on {base_model_id}/{channel}: current="
                    f"{f'v{s.current}' if s.current else 'none'}, no staged version and no earlier version")
            self.db.write_channel(con, new, "rollback", version, detail)
            self._sign_channel(con, new, signers, ttl_s)
        log.info("rollback on %s/%s: %s", base_model_id, channel, detail)
        return new

    def refresh(self, base_model_id: str, channel: str = "stable", keys: Keys | None = None,
                ttl_s: float = CHANNEL_TTL_S) -> ChannelMeta:
        """Re-sign a channel's metadata unchanged with version + 1 and a new expiry (run it before it expires)."""
        signers = _keys(keys, "refresh")
        with self.db.transaction() as con:
            s = self.db.channel_in(con, base_model_id, check_channel(channel))
            if s.current is None and s.candidate is None:
                raise NotFoundError(f"nothing promoted on {base_model_id}/{channel}: nothing to refresh")
            meta = self._sign_channel(con, s, signers, ttl_s)
            self.db.write_channel(con, s, "refresh", s.current, f"metadata v{meta.version}, expires {meta.expires}")
        return meta

    # --- signed metadata --------------------------------------------------------------------------
    def root_meta(self) -> RootMeta | None:
        got = self.db.root()
        return root_from_json(got[1]) if got else None

    def root_envelope(self, version: int | None = None) -> bytes:
        got = self.db.root(version)
        if got is None:
            raise NotFoundError(f"no root metadata {f'v{version}' if version else ''} in {self.root}")
        return got[1]

    def _check_release_key(self, key: SigningKey) -> RootMeta:
        """The root (made now from ``key`` if this registry has none); ``key`` must be one of its release keys."""
        with self.db.transaction() as con:
            got = self.db.root_in(con)
            if got is None:
                vk = VerifyKey(key.public)
                root = make_root(1, [vk], 1, [vk], 1, ROOT_TTL_S)
                self.db.insert_root(con, 1, sign_document(root, [key]))
                log.info("made root v1 of %s: key %s, threshold 1", self.root, key.key_id)
                return root
        root = root_from_json(got[1])
        if key.key_id not in root.roles[RELEASE_ROLE].keyids:
            raise SignatureError(f"key {key.key_id} is not a release key of this registry (root v{root.version}: "
                                 f"{list(root.roles[RELEASE_ROLE].keyids)}); sign with one of those, or rotate "
                                 "the root (`fedtune registry rotate`)")
        return root

    def _sign_channel(self, con, s: ChannelState, signers: list[SigningKey], ttl_s: float) -> ChannelMeta:
        got = self.db.root_in(con)
        if got is None:
            raise RegistryError(f"{self.root} has no root metadata yet; publish a version first")
        root = root_from_json(got[1])
        prev = self.db.channel_meta_in(con, s.base_model_id, s.channel)
        meta = ChannelMeta(version=(prev[0] if prev else 0) + 1, expires=expires_in(ttl_s), base_model=s.base_model_id,
                           channel=s.channel, current=self._target(con, s.current),
                           candidate=self._target(con, s.candidate), rollout=s.rollout if s.candidate else 0.0,
                           rollout_salt=self.rollout_salt)
        envelope = _sign_role(meta, root, RELEASE_ROLE, signers, ChannelMeta,
                              f"channel metadata {s.base_model_id}/{s.channel} v{meta.version}")
        self.db.insert_channel_meta(con, s.base_model_id, s.channel, meta.version, envelope)
        self._sign_snapshot(con, root, signers, ttl_s)
        return meta

    def _sign_snapshot(self, con, root: RootMeta, signers: list[SigningKey], ttl_s: float) -> None:
        """Snapshot v+1 pinning every channel's newest metadata, then a timestamp pinning it."""
        newest: dict[str, tuple[int, bytes]] = {}
        for base, channel, version, envelope in con.execute(
                "SELECT base_model_id, channel, version, envelope FROM channel_meta ORDER BY 1, 2, 3"):
            newest[channel_key(base, channel)] = (version, bytes(envelope))
        prev = self.db.role_meta_in(con, SNAPSHOT_ROLE)
        snap = SnapshotMeta(version=(prev[0] if prev else 0) + 1, expires=expires_in(ttl_s),
                            channels={k: pin(v, e) for k, (v, e) in newest.items()})
        envelope = _sign_role(snap, root, SNAPSHOT_ROLE, signers, SnapshotMeta, f"snapshot v{snap.version}")
        self.db.insert_role_meta(con, SNAPSHOT_ROLE, snap.version, envelope)
        self._sign_timestamp(con, root, signers, min(ttl_s, TIMESTAMP_TTL_S))

    def _sign_timestamp(self, con, root: RootMeta, signers: list[SigningKey], ttl_s: float) -> TimestampMeta:
        snap = self.db.role_meta_in(con, SNAPSHOT_ROLE)
        if snap is None:
            raise NotFoundError(f"{self.root} has no snapshot yet: promote a version first")
        prev = self.db.role_meta_in(con, TIMESTAMP_ROLE)
        ts = TimestampMeta(version=(prev[0] if prev else 0) + 1, expires=expires_in(ttl_s), snapshot=pin(*snap))
        envelope = _sign_role(ts, root, TIMESTAMP_ROLE, signers, TimestampMeta, f"timestamp v{ts.version}")
        self.db.insert_role_meta(con, TIMESTAMP_ROLE, ts.version, envelope)
        return ts

    def refresh_timestamp(self, keys: Keys | None = None, ttl_s: float = TIMESTAMP_TTL_S) -> TimestampMeta:
        """Re-sign the timestamp (version + 1, same snapshot, new expiry): run it more often than ``ttl_s``."""
        signers = _keys(keys, "refresh-timestamp")
        with self.db.transaction() as con:
            got = self.db.root_in(con)
            if got is None:
                raise RegistryError(f"{self.root} has no root metadata yet; publish a version first")
            return self._sign_timestamp(con, root_from_json(got[1]), signers, ttl_s)

    def role_envelope(self, role: str) -> bytes | None:
        """The newest signed snapshot or timestamp (what devices get), None before the first promotion."""
        got = self.db.role_meta(role)
        return got[1] if got else None

    @staticmethod
    def _target(con, version: int | None) -> ChannelTarget | None:
        if version is None:
            return None
        name, envelope = con.execute("SELECT name, envelope FROM artifacts WHERE version = ?", (version,)).fetchone()
        return ChannelTarget(name=name, version=version, manifest_sha256=sha256_hex(bytes(envelope)),
                             manifest_size=len(envelope))

    def channel_envelope(self, base_model_id: str, channel: str) -> bytes | None:
        got = self.db.channel_meta(base_model_id, channel)
        return got[1] if got else None

    def promoted_versions(self) -> set[int]:
        """Versions some channel serves now (current or staged): the only ones the service shows."""
        return {v for c in self.db.channels() for v in (c.current, c.candidate) if v is not None}

    def rotate_root(self, signers: Sequence[SigningKey], root_keys: Sequence[VerifyKey], root_threshold: int,
                    release_keys: Sequence[VerifyKey], release_threshold: int, ttl_s: float = ROOT_TTL_S,
                    snapshot_keys: Sequence[VerifyKey] | None = None, snapshot_threshold: int = 1,
                    timestamp_keys: Sequence[VerifyKey] | None = None, timestamp_threshold: int = 1) -> RootMeta:
        """Root v+1 with new keys/thresholds, signed by ``signers`` (a threshold of the old and the new root keys).

        Snapshot and timestamp keys default to the release keys. Metadata signed by keys the new root drops
        stops verifying on devices: re-sign every channel (``refresh``) with the new keys right after.
        """
        with self.db.transaction() as con:
            got = self.db.root_in(con)
            if got is None:
                raise RegistryError(f"{self.root} has no root yet; publish a version first (it makes root v1)")
            old = root_from_json(got[1])
            try:
                new = make_root(old.version + 1, root_keys, root_threshold, release_keys, release_threshold, ttl_s,
                                snapshot_keys, snapshot_threshold, timestamp_keys, timestamp_threshold)
            except ValueError as err:
                raise RegistryError(f"new root: {err}") from None
            envelope = sign_document(new, list(signers))
            next_root(old, envelope)  # a threshold of the old and of the new root keys, or raise
            self.db.insert_root(con, new.version, envelope)
        log.info("rotated root to v%d", new.version)
        return new

    def resolve(self, base_model_id: str, channel: str, device_id: str) -> ArtifactRow | None:
        s = self.channel(base_model_id, channel)
        version = choose_version(s.current, s.candidate, s.rollout, device_id, self.rollout_salt)
        return self.row(version) if version is not None else None
