"""TUF's snapshot and timestamp roles: which channel metadata is the newest, and that the server is not frozen.

- **snapshot** (role ``snapshot``): version N pins, for every channel of the registry, its newest channel
  metadata (version, sha256, size). A device refuses a snapshot in which a channel it already follows
  has gone back to an older metadata version, or has disappeared (a snapshot rollback), and channel
  metadata other than the version and bytes the snapshot names (a mix-and-match server).
- **timestamp** (role ``timestamp``): version M pins the snapshot (version, sha256, size) and expires
  soon (a day by default). It is re-signed often (``Registry.refresh_timestamp``, a cron job holding
  only the timestamp key, the one key that must stay online), so a server that keeps serving an old but
  validly signed state (a freeze) is caught within the timestamp's lifetime, not the channel's week.

A device checks, in this order: root chain -> timestamp (timestamp threshold, not older than the one it
accepted, same version = same bytes, unexpired) -> snapshot (snapshot threshold, the pinned version and
hash, unexpired, no channel rolled back) -> channel metadata (metadata.py, then the snapshot's pin).
Each refusal raises one error with one reason, and the device keeps its active adapter.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from fedtune.registry.errors import IntegrityError, ReplayError
from fedtune.registry.metadata import (MAX_METADATA_BYTES, SNAPSHOT_ROLE, TIMESTAMP_ROLE, RootMeta, _Frozen,
                                       check_fresh, sha256_hex, verify_document)

TIMESTAMP_TTL_S = 86400  # a frozen server is detected within a day unless configured otherwise


class MetaPin(_Frozen):
    """Length + hash pinning of a metadata document, as TUF's METAFILES entries."""

    version: int = Field(gt=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(gt=0, le=MAX_METADATA_BYTES)


class SnapshotMeta(_Frozen):
    type: Literal["snapshot"] = "snapshot"
    version: int = Field(gt=0)
    expires: str
    channels: dict[str, MetaPin]  # channel_key(base, channel) -> its newest channel metadata


class TimestampMeta(_Frozen):
    type: Literal["timestamp"] = "timestamp"
    version: int = Field(gt=0)
    expires: str
    snapshot: MetaPin


def channel_key(base_model_id: str, channel: str) -> str:
    """``base/channel``: unambiguous, since a channel name has no '/' (registry.check_channel)."""
    return f"{base_model_id}/{channel}"


def pin(version: int, envelope: bytes) -> MetaPin:
    return MetaPin(version=version, sha256=sha256_hex(envelope), size=len(envelope))


def check_pinned(body: bytes, want: MetaPin, what: str, by: str) -> None:
    """``body`` must be exactly the document ``want`` names (size and sha256)."""
    if len(body) != want.size or sha256_hex(body) != want.sha256:
        raise IntegrityError(f"{what}: its sha256 ({len(body)} bytes) is not the one the signed {by} names "
                             f"for v{want.version} ({want.size} bytes); refusing it (a substituted or altered "
                             "document) and keeping the active adapter")


def _check_not_older(version: int, body: bytes, seen: dict | None, what: str) -> None:
    if seen is None:
        return
    if version < seen["version"]:
        raise ReplayError(f"{what}: v{version} is older than v{seen['version']}, which this device already "
                          "accepted (a replay); refusing it and keeping the active adapter")
    if version == seen["version"] and sha256_hex(body) != seen["sha256"]:
        raise ReplayError(f"{what}: two different documents claim v{version}; refusing it")


def accept_timestamp(body: bytes, root: RootMeta, seen: dict | None, now: datetime | None = None) -> TimestampMeta:
    """Verify a timestamp against the root's timestamp role and what this device accepted before (``seen``)."""
    what = "timestamp metadata"
    ts = verify_document(body, root, TIMESTAMP_ROLE, TimestampMeta, what)
    _check_not_older(ts.version, body, seen, what)
    check_fresh(ts.expires, f"{what} v{ts.version} (a frozen server, or one the registry stopped refreshing)", now)
    if seen is not None and ts.snapshot.version < seen["snapshot_version"]:
        raise ReplayError(f"{what} v{ts.version}: pins snapshot v{ts.snapshot.version}, older than "
                          f"v{seen['snapshot_version']} this device already accepted (a snapshot rollback)")
    return ts


def accept_snapshot(body: bytes, root: RootMeta, ts: TimestampMeta, seen: dict | None,
                    now: datetime | None = None) -> SnapshotMeta:
    """Verify the snapshot the timestamp pins: snapshot role, pinned version + hash, expiry, no channel rollback."""
    what = "snapshot metadata"
    snap = verify_document(body, root, SNAPSHOT_ROLE, SnapshotMeta, what)
    _check_not_older(snap.version, body, seen, what)
    if snap.version != ts.snapshot.version:
        raise ReplayError(f"{what}: got v{snap.version}, the signed timestamp v{ts.version} pins "
                          f"v{ts.snapshot.version}; refusing it")
    check_pinned(body, ts.snapshot, f"{what} v{snap.version}", f"timestamp v{ts.version}")
    check_fresh(snap.expires, f"{what} v{snap.version}", now)
    for key, old in ((seen or {}).get("channels") or {}).items():
        new = snap.channels.get(key)
        if new is None or new.version < old["version"]:
            raise ReplayError(f"{what} v{snap.version}: channel {key} "
                              f"{'is missing' if new is None else f'went back to metadata v{new.version}'}, "
                              f"this device already accepted v{old['version']} (a snapshot rollback); refusing it")
    return snap


def seen_timestamp(ts: TimestampMeta, body: bytes) -> dict:
    """What a device remembers of an accepted timestamp (trust.json)."""
    return {"version": ts.version, "sha256": sha256_hex(body), "expires": ts.expires,
            "snapshot_version": ts.snapshot.version}


def seen_snapshot(snap: SnapshotMeta, body: bytes) -> dict:
    return {"version": snap.version, "sha256": sha256_hex(body), "expires": snap.expires,
            "channels": {k: p.model_dump() for k, p in snap.channels.items()}}
