"""A device's local adapter store: verified versions side by side, and one pointer file naming the active one.

    state_dir/
      device.json              {"device_id": ...}  (made once; the id decides the rollout bucket)
      pointer.json             {"active": 3, "previous": 2, "blocked": [4], "etag": "..."}
      trust.json               the newest root this device verified, every release key it ever trusted, the
                               newest timestamp and snapshot it accepted, and per (base model, channel) the
                               highest channel-metadata version it accepted
      .lock                    flock(2): one pull / rollback at a time per state directory
      versions/<v>/            the adapter's files + manifest.signed.json
      staging/                 downloads in progress (swept at the start of every pull)

Switching versions = writing a new pointer.json to a temp file, fsync, ``os.replace``: a crash at any
moment leaves either the old pointer or the new one, and the new one only ever names a version
directory that was complete and verified before the switch. Every use re-verifies the signature and
the sha256 of every file, so a version altered on disk is refused too.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from fedtune.registry.errors import DeadlineError, IntegrityError, ManifestError, NotFoundError
from fedtune.registry.manifest import Manifest, SignedManifest, safe_relpath, sha256_file
from fedtune.registry.metadata import RELEASE_ROLE, RootMeta, anchor_root, public_from_b64, verify_manifest_by_root
from fedtune.registry.signing import VerifyKey

Anchor = VerifyKey | RootMeta  # what a device is provisioned with: the publisher's key, or a root metadata

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.signed.json"


@dataclass(frozen=True)
class Pointer:
    active: int | None = None
    previous: int | None = None
    blocked: tuple[int, ...] = ()  # versions this device rolled back from; pull skips them unless forced
    etag: str | None = None  # ETag of the last manifest this device accepted (for If-None-Match)

    def to_json(self) -> str:
        return json.dumps({"active": self.active, "previous": self.previous, "blocked": list(self.blocked),
                           "etag": self.etag}, indent=1)


@dataclass(frozen=True)
class TrustState:
    """What the device learned from verified metadata (never from unverified server answers)."""

    root: dict[str, Any] | None = None  # the newest verified root's `signed` part
    release_keys: dict[str, str] = field(default_factory=dict)  # every release key ever trusted: keyid -> b64
    channels: dict[str, dict[str, Any]] = field(default_factory=dict)  # "base/channel" -> version, sha256, expires
    anchor: str | None = None  # fingerprint of the anchor `root` and `release_keys` were verified from
    timestamp: dict[str, Any] | None = None  # the newest accepted timestamp: version, sha256, expires, snapshot_version
    snapshot: dict[str, Any] | None = None  # the newest accepted snapshot: version, sha256, expires, channel pins

    def to_json(self) -> str:
        return json.dumps({"root": self.root, "release_keys": self.release_keys, "channels": self.channels,
                           "anchor": self.anchor, "timestamp": self.timestamp, "snapshot": self.snapshot}, indent=1)


def anchor_fingerprint(anchor: "Anchor") -> str:
    return hashlib.sha256(as_root(anchor).model_dump_json().encode()).hexdigest()


def as_root(anchor: Anchor) -> RootMeta:
    return anchor if isinstance(anchor, RootMeta) else anchor_root(anchor)


@dataclass(frozen=True)
class DeviceState:
    root: Path

    def __post_init__(self):
        for sub in ("versions", "staging"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # --- identity --------------------------------------------------------------------------------
    def device_id(self, given: str | None = None) -> str:
        """The device's id: ``given`` if set (and remembered), else the remembered one, else a new uuid."""
        path = self.root / "device.json"
        stored = json.loads(path.read_text())["device_id"] if path.is_file() else None
        if given and given != stored:
            _atomic_write(path, json.dumps({"device_id": given}))
            return given
        if stored:
            return stored
        new = uuid.uuid4().hex
        _atomic_write(path, json.dumps({"device_id": new}))
        return new

    # --- pointer ---------------------------------------------------------------------------------
    @property
    def pointer_path(self) -> Path:
        return self.root / "pointer.json"

    def pointer(self) -> Pointer:
        if not self.pointer_path.is_file():
            return Pointer()
        raw = json.loads(self.pointer_path.read_text())
        return Pointer(raw.get("active"), raw.get("previous"), tuple(raw.get("blocked", ())), raw.get("etag"))

    def write_pointer(self, pointer: Pointer) -> None:
        _atomic_write(self.pointer_path, pointer.to_json())

    # --- lock ------------------------------------------------------------------------------------
    @contextmanager
    def locked(self, timeout_s: float) -> Iterator[None]:
        """Exclusive flock on ``.lock`` (released when the process dies); wait at most ``timeout_s``."""
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            end = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= end:
                        raise DeadlineError(f"another pull or rollback holds {self.root / '.lock'} for more than "
                                            f"{timeout_s:.0f} s; try again when it has finished") from None
                    time.sleep(0.02)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    # --- trust -----------------------------------------------------------------------------------
    @property
    def trust_path(self) -> Path:
        return self.root / "trust.json"

    def trust(self) -> TrustState:
        if not self.trust_path.is_file():
            return TrustState()
        raw = json.loads(self.trust_path.read_text())
        return TrustState(raw.get("root"), dict(raw.get("release_keys", {})), dict(raw.get("channels", {})),
                          raw.get("anchor"), raw.get("timestamp"), raw.get("snapshot"))

    def trust_for(self, anchor: Anchor) -> TrustState:
        """The trust state, minus the roots and keys learned from another anchor (a re-provisioned device)."""
        t = self.trust()
        if t.anchor != anchor_fingerprint(anchor):
            return TrustState(None, {}, t.channels, anchor_fingerprint(anchor), t.timestamp, t.snapshot)
        return t

    def write_trust(self, trust: TrustState) -> None:
        _atomic_write(self.trust_path, trust.to_json())

    def trusted_root(self, anchor: Anchor) -> RootMeta:
        """The newest root this device verified (walking from ``anchor``), else the anchor's."""
        stored = self.trust_for(anchor).root
        base = as_root(anchor)
        if stored is not None:
            root = RootMeta.model_validate(stored)
            if root.version >= base.version:
                return root
        return base

    def release_keys(self, anchor: Anchor) -> dict:
        """Every release key this device ever trusted: checks an installed version's signature on use."""
        keys = dict(as_root(anchor).role_keys(RELEASE_ROLE))
        keys.update(self.trusted_root(anchor).role_keys(RELEASE_ROLE))
        keys.update({k: public_from_b64(v) for k, v in self.trust_for(anchor).release_keys.items()})
        return keys

    # --- versions --------------------------------------------------------------------------------
    def version_dir(self, version: int) -> Path:
        return self.root / "versions" / str(version)

    def installed(self) -> list[int]:
        return sorted(int(p.name) for p in (self.root / "versions").iterdir() if p.name.isdigit())

    def verify_version(self, version: int, key: Anchor, expected: SignedManifest | None = None) -> Manifest:
        """Signature + every file's size and sha256; raise (never return a partial answer)."""
        d = self.version_dir(version)
        if not (d / MANIFEST_FILE).is_file():
            raise NotFoundError(f"version {version} is not installed on this device ({d})")
        signed = SignedManifest.from_bytes((d / MANIFEST_FILE).read_bytes())
        if expected is not None and signed != expected:
            raise ManifestError(f"installed v{version} has a different manifest than the server's")
        verify_manifest_by_root(signed, self.release_keys(key))
        manifest = signed.manifest
        if manifest.version != version:
            raise ManifestError(f"{d} holds the manifest of v{manifest.version}, expected v{version}")
        verify_files(d, manifest)
        return manifest

    def active(self, key: Anchor) -> tuple[Path, Manifest]:
        """The active adapter directory and its manifest, verified now (call before every use)."""
        p = self.pointer()
        if p.active is None:
            raise NotFoundError(f"no active adapter in {self.root}; run `fedtune device pull` first")
        return self.version_dir(p.active), self.verify_version(p.active, key)

    def local_blob(self, sha256: str) -> Path | None:
        """A file with this content in an installed version (so a pull need not download it again)."""
        for v in self.installed():
            d = self.version_dir(v)
            try:
                m = SignedManifest.from_bytes((d / MANIFEST_FILE).read_bytes()).manifest
            except (OSError, ManifestError):
                continue
            for f in m.files:
                if f.sha256 == sha256 and (d / f.path).is_file():
                    return d / f.path
        return None

    # --- staging and install ---------------------------------------------------------------------
    def new_staging(self, version: int) -> Path:
        d = self.root / "staging" / f"v{version}-{uuid.uuid4().hex[:8]}"
        d.mkdir(parents=True)
        return d

    def sweep_staging(self) -> None:
        """Remove downloads a crashed pull left behind."""
        for p in (self.root / "staging").iterdir():
            shutil.rmtree(p, ignore_errors=True)

    def install(self, staging: Path, signed: SignedManifest) -> Path:
        """Move a complete, verified staging directory into versions/<v> (atomic rename)."""
        (staging / MANIFEST_FILE).write_bytes(signed.to_bytes())
        _fsync_tree(staging)
        final = self.version_dir(signed.manifest.version)
        if final.exists():  # a repair: move the bad copy aside first, so the swap is two renames
            old = self.root / "staging" / f"replaced-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, final)
        _fsync_dir(final.parent)
        return final

    def prune(self) -> None:
        p = self.pointer()
        keep = {v for v in (p.active, p.previous) if v is not None}
        for v in self.installed():  # keep the active and the previous version, nothing else
            if v not in keep:
                shutil.rmtree(self.version_dir(v), ignore_errors=True)


def verify_files(directory: Path, manifest: Manifest) -> None:
    for f in manifest.files:
        path = directory / safe_relpath(f.path)
        if not path.is_file():
            raise IntegrityError(f"v{manifest.version}: file {f.path} is missing from {directory}")
        size = path.stat().st_size
        digest = sha256_file(path)
        if size != f.size or digest != f.sha256:
            raise IntegrityError(
                f"v{manifest.version}: {f.path} has sha256 {digest} ({size} bytes), the signed manifest "
                f"says {f.sha256} ({f.size} bytes); the file was altered"
            )


def hash_stream_to(chunks, dest: Path) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(dest, "wb") as out:
        for chunk in chunks:
            h.update(chunk)
            n += len(chunk)
            out.write(chunk)
    return h.hexdigest(), n


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)
