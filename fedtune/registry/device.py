"""The device side: poll the registry, verify, install and switch adapters atomically; roll back; repair.

``DeviceClient.pull()``, under an exclusive lock on the state directory and one overall deadline:
1. Walk the root chain: GET /v1/roots/{n+1} while it exists; each must be signed by a threshold of the
   old and of the new root keys (key rotation). The device starts from the key or root it was provisioned with.
2. GET /v1/timestamp: signed by the timestamp threshold, not older than the one accepted before, unexpired
   (a frozen server is caught here). It pins the snapshot; GET /v1/snapshot unless the device already has
   that one: snapshot threshold, the pinned size and sha256, unexpired, no channel gone back
   (freshness.py). Both are remembered (trust.json).
3. Re-verify the active version on disk; a corrupted one is repaired by this pull (no If-None-Match).
4. GET /v1/channel (If-None-Match = the last accepted ETag, only when the snapshot still pins the
   metadata this device has -> 304: done). The channel metadata must be signed by the release threshold,
   bound to this base model and channel (and artifact name, if set), unexpired, not older than what this
   device accepted before (same version: same bytes), and exactly the version and bytes the snapshot pins.
   Its version is remembered (trust.json) before anything else happens.
5. The device picks its own target from the metadata (staged rollout by its bucket), so a server cannot
   offer an unpromoted, older or other artifact: the manifest must have the size and sha256 the metadata
   names, and a release key's signature. Older artifacts arrive only through a newer, signed rollback.
6. Fetch each file into staging/ (files already on the device are copied), bounded by the signed size,
   checking sha256; move to versions/<v>, re-verify, replace pointer.json atomically. A crash or a
   refusal before this step leaves the old adapter active.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from fedtune.registry.device_state import Anchor, DeviceState, Pointer, hash_stream_to
from fedtune.registry.errors import (ExpiredError, IntegrityError, ManifestError, NotFoundError, RegistryError,
                                     ReplayError)
from fedtune.registry.fetch import Deadline, get_bounded, stream_blob
from fedtune.registry.freshness import (MetaPin, SnapshotMeta, accept_snapshot, accept_timestamp, channel_key,
                                        check_pinned, seen_snapshot, seen_timestamp)
from fedtune.registry.manifest import Manifest, SignedManifest, safe_relpath
from fedtune.registry.metadata import (MAX_METADATA_BYTES, RELEASE_ROLE, ChannelMeta, ChannelTarget, RootMeta,
                                       check_fresh, next_root, sha256_hex, verify_document,
                                       verify_manifest_by_root)
from fedtune.registry.rollout import in_rollout

log = logging.getLogger(__name__)

MAX_ROOT_STEPS = 64


@dataclass(frozen=True)
class DeviceConfig:
    server: str  # e.g. http://127.0.0.1:8080
    base_model_id: str
    trusted_key: Anchor  # provisioned out of band: the publisher's public key, or a root metadata
    channel: str = "stable"
    base_model_sha256: str | None = None  # when set, refuse adapters made for other weights
    timeout_s: float = 30.0  # per network read (and connect)
    deadline_s: float = 600.0  # the whole pull, however the server paces its bytes
    artifact: str | None = None  # when set, refuse channel metadata that serves another artifact name


@dataclass(frozen=True)
class PullResult:
    status: Literal["updated", "unchanged", "none", "blocked", "repaired"]
    active: int | None  # active version after the pull
    previous: int | None
    offered: int | None  # the version the channel metadata names for this device (None on 304 / 404)
    http_status: int  # of the channel-metadata request
    downloaded_bytes: int  # blob bytes fetched over the network
    reused_bytes: int  # bytes copied from versions already on the device


class DeviceClient:
    def __init__(self, state_dir: Path, config: DeviceConfig, device_id: str | None = None, http=None):
        import httpx

        self.state = DeviceState(Path(state_dir))
        self.config = config
        self.device_id = self.state.device_id(device_id)
        self._http = http or httpx.Client(base_url=config.server.rstrip("/"), timeout=config.timeout_s)
        self._deadline = Deadline(config.deadline_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "DeviceClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def _key(self) -> str:
        return f"{self.config.base_model_id}\n{self.config.channel}"

    # --- pull ------------------------------------------------------------------------------------
    def pull(self, force: bool = False) -> PullResult:
        self._deadline = Deadline(self.config.deadline_s)
        with self.state.locked(self._deadline.remaining()):
            return self._pull(force)

    def _pull(self, force: bool) -> PullResult:
        self.state.sweep_staging()  # safe: we hold the lock, so no other pull is staging
        root = self._update_root()
        ptr = self.state.pointer()
        snap = self._update_snapshot(root)
        want = snap.channels.get(channel_key(self.config.base_model_id, self.config.channel)) if snap else None
        if want is None:
            log.info("registry offers no channel metadata for %s", self._key.replace("\n", "/"))
            return PullResult("none", ptr.active, ptr.previous, None, 404, 0, 0)
        healthy = self._healthy(ptr.active)
        seen = self.state.trust().channels.get(self._key)
        fresh = seen is not None and not _expired(seen.get("expires"))
        pinned = seen is not None and (seen["version"], seen["sha256"]) == (want.version, want.sha256)
        conditional = ptr.etag and healthy and fresh and pinned and not force
        got = get_bounded(self._http, "/v1/channel", MAX_METADATA_BYTES, self._deadline, self.config.timeout_s,
                          params={"base_model": self.config.base_model_id, "channel": self.config.channel},
                          headers={"If-None-Match": ptr.etag} if conditional else {})
        if got.status == 304 and conditional:
            return PullResult("unchanged", ptr.active, ptr.previous, None, 304, 0, 0)
        if got.status == 404:
            log.info("registry offers no channel metadata for %s", self._key.replace("\n", "/"))
            return PullResult("none", ptr.active, ptr.previous, None, 404, 0, 0)
        if got.status != 200:
            raise RegistryError(f"GET /v1/channel: expected 200, 304 or 404 from {self.config.server}, got "
                                f"{got.status}: {got.body[:200]!r}")
        meta = self._accept_channel(got.body, root, want)
        etag = got.headers.get("etag")
        target = self._choose(meta)
        if target is None:
            return PullResult("none", ptr.active, ptr.previous, None, 200, 0, 0)
        v = target.version
        if v == ptr.active and healthy:
            self.state.write_pointer(Pointer(ptr.active, ptr.previous, ptr.blocked, etag))
            return PullResult("unchanged", ptr.active, ptr.previous, v, 200, 0, 0)
        if v in ptr.blocked and not force:
            return PullResult("blocked", ptr.active, ptr.previous, v, 200, 0, 0)
        signed = self._fetch_manifest(target, root)
        downloaded, reused = self._install(signed, repair=(v == ptr.active))
        blocked = tuple(b for b in ptr.blocked if b != v)
        if v == ptr.active:  # repaired in place
            self.state.write_pointer(Pointer(v, ptr.previous, blocked, etag))
            log.warning("active v%d was corrupted on disk; re-downloaded and verified", v)
            return PullResult("repaired", v, ptr.previous, v, 200, downloaded, reused)
        self.state.write_pointer(Pointer(v, ptr.active, blocked, etag))  # the switch (atomic)
        self.state.prune()
        log.info("activated v%d (previous v%s): %d bytes downloaded, %d reused", v, ptr.active, downloaded, reused)
        return PullResult("updated", v, ptr.active, v, 200, downloaded, reused)

    def _healthy(self, version: int | None) -> bool:
        if version is None:
            return False
        try:
            self.state.verify_version(version, self.config.trusted_key)
            return True
        except RegistryError as err:
            log.warning("active v%d does not verify (%s); this pull repairs it", version, err)
            return False

    def _update_root(self) -> RootMeta:
        """Walk root v+1, v+2, ... from the newest trusted root; remember the newest and its release keys."""
        root = self.state.trusted_root(self.config.trusted_key)
        for _ in range(MAX_ROOT_STEPS):
            got = get_bounded(self._http, f"/v1/roots/{root.version + 1}", MAX_METADATA_BYTES, self._deadline,
                              self.config.timeout_s)
            if got.status == 404:
                break
            if got.status != 200:
                raise RegistryError(f"GET /v1/roots/{root.version + 1}: expected 200 or 404, got {got.status}")
            root = next_root(root, got.body)
            t = self.state.trust_for(self.config.trusted_key)
            keys = dict(t.release_keys)
            keys.update({k: root.keys[k] for k in root.roles[RELEASE_ROLE].keyids})
            self.state.write_trust(replace(t, root=root.model_dump(mode="json"), release_keys=keys))
            log.info("trusted root is now v%d", root.version)
        check_fresh(root.expires, f"root metadata v{root.version}")
        return root

    def _update_snapshot(self, root: RootMeta) -> SnapshotMeta | None:
        """The verified timestamp, then the snapshot it pins (fetched only when new); None if none is served."""
        got = get_bounded(self._http, "/v1/timestamp", MAX_METADATA_BYTES, self._deadline, self.config.timeout_s)
        if got.status == 404:
            return None
        if got.status != 200:
            raise RegistryError(f"GET /v1/timestamp: expected 200 or 404 from {self.config.server}, got {got.status}")
        trust = self.state.trust_for(self.config.trusted_key)
        ts = accept_timestamp(got.body, root, trust.timestamp)
        stored = trust.snapshot
        if stored is not None and (stored["version"], stored["sha256"]) == (ts.snapshot.version, ts.snapshot.sha256):
            check_fresh(stored["expires"], f"snapshot metadata v{stored['version']}")
            snap = SnapshotMeta.model_validate({k: stored[k] for k in ("version", "expires", "channels")})
        else:
            body = get_bounded(self._http, "/v1/snapshot", MAX_METADATA_BYTES, self._deadline, self.config.timeout_s)
            if body.status != 200:
                raise RegistryError(f"GET /v1/snapshot: expected 200 (the timestamp pins v{ts.snapshot.version}), "
                                    f"got {body.status}")
            snap = accept_snapshot(body.body, root, ts, stored)
            stored = seen_snapshot(snap, body.body)
        self.state.write_trust(replace(trust, timestamp=seen_timestamp(ts, got.body), snapshot=stored))
        return snap

    def _accept_channel(self, body: bytes, root: RootMeta, want: MetaPin) -> ChannelMeta:
        cfg = self.config
        what = f"channel metadata for {cfg.base_model_id}/{cfg.channel}"
        meta = verify_document(body, root, RELEASE_ROLE, ChannelMeta, what)
        if (meta.base_model, meta.channel) != (cfg.base_model_id, cfg.channel):
            raise ReplayError(f"{what}: the server sent metadata for {meta.base_model}/{meta.channel}; refusing it")
        for t in (meta.current, meta.candidate):
            if t is not None and cfg.artifact is not None and t.name != cfg.artifact:
                raise ReplayError(f"{what}: it serves artifact {t.name!r}, this device runs {cfg.artifact!r}")
        check_fresh(meta.expires, f"{what} v{meta.version}")
        trust = self.state.trust_for(self.config.trusted_key)
        seen = trust.channels.get(self._key)
        digest = sha256_hex(body)
        if seen is not None:
            if meta.version < seen["version"]:
                raise ReplayError(f"{what}: v{meta.version} is older than v{seen['version']}, which this device "
                                  "already accepted (a replay); refusing it and keeping the active adapter")
            if meta.version == seen["version"] and digest != seen["sha256"]:
                raise ReplayError(f"{what}: two different documents claim v{meta.version}; refusing it")
        if meta.version != want.version:
            raise ReplayError(f"{what}: got v{meta.version}, the signed snapshot pins v{want.version}; refusing it")
        check_pinned(body, want, f"{what} v{meta.version}", "snapshot")
        channels = dict(trust.channels)
        channels[self._key] = {"version": meta.version, "sha256": digest, "expires": meta.expires}
        self.state.write_trust(replace(trust, channels=channels))
        return meta

    def _choose(self, meta: ChannelMeta) -> ChannelTarget | None:
        if meta.candidate is not None and in_rollout(self.device_id, meta.rollout_salt, meta.rollout):
            return meta.candidate
        return meta.current

    def _fetch_manifest(self, target: ChannelTarget, root: RootMeta) -> SignedManifest:
        got = get_bounded(self._http, f"/v1/manifests/{target.version}", target.manifest_size, self._deadline,
                          self.config.timeout_s)
        if got.status != 200:
            raise RegistryError(f"GET /v1/manifests/{target.version}: expected 200, got {got.status}")
        if sha256_hex(got.body) != target.manifest_sha256:
            raise IntegrityError(f"manifest v{target.version}: its sha256 is not the one the signed channel "
                                 "metadata names; refusing it (a substituted or altered manifest)")
        signed = SignedManifest.from_bytes(got.body)
        keys = dict(root.role_keys(RELEASE_ROLE))
        verify_manifest_by_root(signed, keys)
        self._check_manifest(signed.manifest, target)
        return signed

    def _check_manifest(self, m: Manifest, target: ChannelTarget) -> None:
        if (m.name, m.version) != (target.name, target.version):
            raise ManifestError(f"manifest is {m.name} v{m.version}, the channel names {target.name} v{target.version}")
        if m.base_model.id != self.config.base_model_id:
            raise ManifestError(f"manifest v{m.version} is for base model {m.base_model.id!r}, this device runs "
                                f"{self.config.base_model_id!r}; refusing it")
        want = self.config.base_model_sha256
        if want and m.base_model.sha256 != want:
            raise ManifestError(f"manifest v{m.version} was trained on base weights {m.base_model.sha256[:12]}..., "
                                f"this device has {want[:12]}...; refusing it (update the base model first)")
        for f in m.files:
            safe_relpath(f.path)

    def _install(self, signed: SignedManifest, repair: bool = False) -> tuple[int, int]:
        m = signed.manifest
        existing = self.state.version_dir(m.version)
        if existing.is_dir() and not repair:
            try:  # e.g. re-pulling a version this device rolled back from
                self.state.verify_version(m.version, self.config.trusted_key, expected=signed)
                return 0, m.total_bytes
            except RegistryError:
                shutil.rmtree(existing)
        staging = self.state.new_staging(m.version)
        downloaded = reused = 0
        try:
            for f in m.files:
                dest = staging / f.path
                dest.parent.mkdir(parents=True, exist_ok=True)
                local = self.state.local_blob(f.sha256)
                digest, size = hash_stream_to(_read_chunks(local), dest) if local is not None else ("", -1)
                if (digest, size) == (f.sha256, f.size):
                    reused += size
                else:  # not on the device, or the local copy is corrupted: download it
                    digest, size = self._download(f.sha256, dest, f.size)
                    downloaded += size
                if digest != f.sha256 or size != f.size:
                    raise IntegrityError(
                        f"v{m.version}: {f.path} arrived with sha256 {digest} ({size} bytes), the signed manifest "
                        f"says {f.sha256} ({f.size} bytes); refusing v{m.version} and keeping the active adapter"
                    )
            final = self.state.install(staging, signed)
            self.state.verify_version(m.version, self.config.trusted_key, expected=signed)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        log.debug("installed v%d at %s", m.version, final)
        return downloaded, reused

    def _download(self, sha256: str, dest: Path, size: int) -> tuple[str, int]:
        return stream_blob(self._http, f"/v1/blobs/{sha256}", dest, size, self._deadline, self.config.timeout_s)

    # --- local operations ------------------------------------------------------------------------
    def rollback(self) -> Pointer:
        return rollback(self.state, self.config.trusted_key)

    def active(self) -> tuple[Path, Manifest]:
        return self.state.active(self.config.trusted_key)


def rollback(state: DeviceState, key: Anchor, lock_timeout_s: float = 60.0) -> Pointer:
    """Make the previous version active again; the version left is blocked from auto re-install."""
    with state.locked(lock_timeout_s):
        return _rollback(state, key)


def _rollback(state: DeviceState, key: Anchor) -> Pointer:
    ptr = state.pointer()
    if ptr.previous is None:
        raise NotFoundError(f"nothing to roll back to in {state.root}: active="
                            f"{f'v{ptr.active}' if ptr.active else 'none'}, no previous version kept")
    state.verify_version(ptr.previous, key)
    blocked = tuple(sorted(set(ptr.blocked) | {ptr.active}))
    new = Pointer(ptr.previous, ptr.active, blocked, ptr.etag)
    state.write_pointer(new)
    log.info("device rolled back v%s -> v%d (v%s blocked until a forced pull)", ptr.active, ptr.previous, ptr.active)
    return new


def load_active_adapter(base_model, state_dir: Path, key: Anchor):
    """Attach the verified active adapter to ``base_model`` (peft); returns (model, manifest)."""
    from peft import PeftModel

    directory, manifest = DeviceState(Path(state_dir)).active(key)
    return PeftModel.from_pretrained(base_model, str(directory)), manifest


def _read_chunks(path: Path, size: int = 1 << 20):
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk


def _expired(expires: str | None) -> bool:
    if not expires:
        return True
    try:
        check_fresh(expires, "stored channel metadata")
        return False
    except ExpiredError:
        return True
