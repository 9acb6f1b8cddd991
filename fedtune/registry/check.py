"""``fedtune registry verify``: re-hash every blob and check every signature a device would check.

1. The root chain: v1 signed by its own root keys, each v(n+1) by a threshold of v(n)'s and its own.
2. Every manifest: signed by a release key of some root in the chain; every file present, right size.
3. Each channel's newest metadata (what devices get): the release threshold of the newest root, and
   the manifests' hashes it names.
4. The newest snapshot and timestamp: their roles' thresholds; the timestamp pins the newest snapshot,
   which pins every channel's newest metadata.
5. Every blob: re-hashed (a blob whose bytes changed on disk is reported, never silently served).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedtune.registry.errors import RegistryError
from fedtune.registry.freshness import SnapshotMeta, TimestampMeta, channel_key, check_pinned
from fedtune.registry.manifest import SignedManifest
from fedtune.registry.metadata import (RELEASE_ROLE, ROOT_ROLE, SNAPSHOT_ROLE, TIMESTAMP_ROLE, ChannelMeta,
                                       count_valid, next_root, parse_envelope, root_from_json, sha256_hex,
                                       verify_document, verify_manifest_by_root)
from fedtune.registry.registry import Registry


@dataclass
class VerifyReport:
    roots: int = 0
    manifests: int = 0
    channel_metadata: int = 0
    blobs: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_registry(registry: Registry) -> VerifyReport:
    report = VerifyReport()
    release_keys: dict = {}
    root = None
    v = 1
    while (got := registry.db.root(v)) is not None:
        try:
            if root is None:
                first = root_from_json(got[1])
                signed, sigs = parse_envelope(got[1], "root v1")
                if count_valid(signed, sigs, first.role_keys(ROOT_ROLE)) < first.roles[ROOT_ROLE].threshold:
                    raise RegistryError("root v1: not signed by a threshold of its own root keys")
                root = first
            else:
                root = next_root(root, got[1])
            release_keys.update(root.role_keys(RELEASE_ROLE))
        except RegistryError as err:
            report.problems.append(str(err))
            break
        report.roots += 1
        v += 1

    for row in registry.db.artifacts():
        report.manifests += 1
        try:
            signed = SignedManifest.from_bytes(row.envelope)
            verify_manifest_by_root(signed, release_keys)
            for f in signed.manifest.files:
                if not registry.store.has(f.sha256):
                    report.problems.append(f"v{row.version}: blob {f.sha256} ({f.path}) is missing from the store")
                elif registry.store.size(f.sha256) != f.size:
                    report.problems.append(f"v{row.version}: blob {f.sha256} ({f.path}) has "
                                           f"{registry.store.size(f.sha256)} bytes, the manifest says {f.size}")
        except RegistryError as err:
            report.problems.append(f"v{row.version}: {err}")

    hashes = {r.version: sha256_hex(r.envelope) for r in registry.db.artifacts()}
    newest = {(b, c): (v, e) for b, c, v, e in registry.db.all_channel_meta()}  # ordered by version
    for (base, channel), (version, envelope) in newest.items():
        report.channel_metadata += 1
        what = f"channel metadata {base}/{channel} v{version}"
        try:
            if root is None:
                raise RegistryError("no valid root to check it against")
            meta = verify_document(envelope, root, RELEASE_ROLE, ChannelMeta, what)
            for t in (meta.current, meta.candidate):
                if t is not None and hashes.get(t.version) != t.manifest_sha256:
                    report.problems.append(f"{what}: names manifest v{t.version} with a hash the registry's "
                                           "manifest does not have")
        except RegistryError as err:
            report.problems.append(str(err) if what in str(err) else f"{what}: {err}")

    if root is not None and newest:
        try:
            _check_freshness(registry, root, newest)
        except RegistryError as err:
            report.problems.append(str(err))

    verify_blob = getattr(registry.store, "verify", None)
    digests = getattr(registry.store, "digests", None)
    if verify_blob is not None and digests is not None:
        for digest in digests():
            report.blobs += 1
            try:
                verify_blob(digest)
            except RegistryError as err:
                report.problems.append(str(err))
    return report


def _check_freshness(registry: Registry, root, newest: dict) -> None:
    """The newest timestamp pins the newest snapshot, which pins every channel's newest metadata."""
    got_ts, got_snap = registry.db.role_meta(TIMESTAMP_ROLE), registry.db.role_meta(SNAPSHOT_ROLE)
    if got_ts is None or got_snap is None:
        raise RegistryError("no signed timestamp/snapshot: `fedtune registry refresh` each channel to write them")
    ts = verify_document(got_ts[1], root, TIMESTAMP_ROLE, TimestampMeta, f"timestamp v{got_ts[0]}")
    check_pinned(got_snap[1], ts.snapshot, f"snapshot v{got_snap[0]}", f"timestamp v{ts.version}")
    snap = verify_document(got_snap[1], root, SNAPSHOT_ROLE, SnapshotMeta, f"snapshot v{got_snap[0]}")
    for (base, channel), (version, envelope) in newest.items():
        want = snap.channels.get(channel_key(base, channel))
        if want is None:
            raise RegistryError(f"snapshot v{snap.version} does not list channel {base}/{channel}")
        check_pinned(envelope, want, f"channel metadata {base}/{channel} v{version}", f"snapshot v{snap.version}")
