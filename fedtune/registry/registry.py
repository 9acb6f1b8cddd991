"""The registry: signed, versioned adapter artifacts over a blob store + SQLite metadata.

    registry_root/
      registry.sqlite     artifacts (signed manifests), channels, events      (db.py)
      blobs/              content-addressed files                             (store.py)

1. ``publish``: hash + store every file of an adapter directory, assign the next version, build the
   manifest, sign it, record it. Nothing is visible to devices until it is promoted.
2. ``promote(v, channel, rollout)``: 100% makes v the channel's `current`; less stages v as the
   `candidate` for the devices whose rollout bucket is below the percentage (rollout.py).
3. ``rollback``: abort a staged candidate, or else return `current` to the one before it.
4. ``resolve(base, channel, device)``: the signed manifest this device should run, or None.
"""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from fedtune.registry.db import ArtifactRow, ChannelState, Event, MetadataDB
from fedtune.registry.errors import ManifestError, NotFoundError, RegistryError
from fedtune.registry.manifest import (AdapterInfo, BaseModelRef, Manifest, PrivacyGuarantee, Provenance,
                                       SignedManifest, file_entries, now_iso)
from fedtune.registry.rollout import choose_version
from fedtune.registry.signing import SigningKey, VerifyKey, sign_manifest, verify_manifest
from fedtune.registry.store import BlobStore, DirectoryBlobStore

log = logging.getLogger(__name__)

_CHANNEL = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


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
    def promote(self, version: int, channel: str = "stable", rollout: float = 100.0) -> ChannelState:
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
        log.info("promoted v%d on %s/%s: %s", version, base, channel, detail)
        return new

    def rollback(self, base_model_id: str, channel: str = "stable") -> ChannelState:
        """Abort the staged candidate if there is one; otherwise return `current` to its predecessor."""
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
        log.info("rollback on %s/%s: %s", base_model_id, channel, detail)
        return new

    def resolve(self, base_model_id: str, channel: str, device_id: str) -> ArtifactRow | None:
        s = self.channel(base_model_id, channel)
        version = choose_version(s.current, s.candidate, s.rollout, device_id, self.rollout_salt)
        return self.row(version) if version is not None else None
