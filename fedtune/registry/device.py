"""The device side: poll the registry, verify, install and switch adapters atomically; roll back.

``DeviceClient.pull()``:
1. GET /v1/manifest with If-None-Match = the ETag of the last accepted manifest -> 304: done, 0 bytes.
2. Verify the ed25519 signature with the provisioned public key and check the base model (id, and
   sha256 when the device knows it). Any failure: refuse, keep the active adapter.
3. Fetch each file into staging/ (a file whose content is already installed is copied, not
   downloaded), checking size and sha256 against the signed manifest while it streams.
4. Move the complete directory to versions/<v>, re-verify it, then replace pointer.json atomically
   (active = v, previous = the old active). A crash before this step leaves the old adapter active.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fedtune.registry.device_state import DeviceState, Pointer, hash_stream_to
from fedtune.registry.errors import IntegrityError, ManifestError, NotFoundError, RegistryError
from fedtune.registry.manifest import Manifest, SignedManifest, safe_relpath
from fedtune.registry.signing import VerifyKey, verify_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceConfig:
    server: str  # e.g. http://127.0.0.1:8080
    base_model_id: str
    trusted_key: VerifyKey
    channel: str = "stable"
    base_model_sha256: str | None = None  # when set, refuse adapters made for other weights
    timeout_s: float = 30.0


@dataclass(frozen=True)
class PullResult:
    status: Literal["updated", "unchanged", "none", "blocked"]
    active: int | None  # active version after the pull
    previous: int | None
    offered: int | None  # the version the server offered (None on 304 / 404)
    http_status: int  # of the manifest request
    downloaded_bytes: int  # blob bytes fetched over the network
    reused_bytes: int  # bytes copied from versions already on the device


class DeviceClient:
    def __init__(self, state_dir: Path, config: DeviceConfig, device_id: str | None = None, http=None):
        import httpx

        self.state = DeviceState(Path(state_dir))
        self.config = config
        self.device_id = self.state.device_id(device_id)
        self._http = http or httpx.Client(base_url=config.server.rstrip("/"), timeout=config.timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "DeviceClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- pull ------------------------------------------------------------------------------------
    def pull(self, force: bool = False) -> PullResult:
        self.state.sweep_staging()
        ptr = self.state.pointer()
        headers = {"If-None-Match": ptr.etag} if ptr.etag and ptr.active is not None and not force else {}
        params = {"base_model": self.config.base_model_id, "channel": self.config.channel,
                  "device_id": self.device_id}
        resp = self._http.get("/v1/manifest", params=params, headers=headers)
        if resp.status_code == 304:
            return PullResult("unchanged", ptr.active, ptr.previous, None, 304, 0, 0)
        if resp.status_code == 404:
            log.info("registry offers no adapter to this device: %s", resp.text[:200])
            return PullResult("none", ptr.active, ptr.previous, None, 404, 0, 0)
        if resp.status_code != 200:
            raise RegistryError(f"GET /v1/manifest: expected 200, 304 or 404 from {self.config.server}, "
                                f"got {resp.status_code}: {resp.text[:200]}")
        signed = SignedManifest.from_bytes(resp.content)
        manifest = self._accept(signed)
        etag = resp.headers.get("etag")
        v = manifest.version
        if v == ptr.active or (v in ptr.blocked and not force):
            self.state.write_pointer(Pointer(ptr.active, ptr.previous, ptr.blocked, etag))
            status = "unchanged" if v == ptr.active else "blocked"
            return PullResult(status, ptr.active, ptr.previous, v, 200, 0, 0)
        downloaded, reused = self._install(signed)
        blocked = tuple(b for b in ptr.blocked if b != v)
        self.state.write_pointer(Pointer(v, ptr.active, blocked, etag))  # the switch (atomic)
        self.state.prune()
        log.info("activated v%d (previous v%s): %d bytes downloaded, %d reused", v, ptr.active, downloaded, reused)
        return PullResult("updated", v, ptr.active, v, 200, downloaded, reused)

    def _accept(self, signed: SignedManifest) -> Manifest:
        """Signature and base model; raises before anything is written."""
        m = verify_manifest(signed, self.config.trusted_key)
        if m.base_model.id != self.config.base_model_id:
            raise ManifestError(f"manifest v{m.version} is for base model {m.base_model.id!r}, this device runs "
                                f"{self.config.base_model_id!r}; refusing it")
        want = self.config.base_model_sha256
        if want and m.base_model.sha256 != want:
            raise ManifestError(f"manifest v{m.version} was trained on base weights {m.base_model.sha256[:12]}..., "
                                f"this device has {want[:12]}...; refusing it (update the base model first)")
        for f in m.files:
            safe_relpath(f.path)
        return m

    def _install(self, signed: SignedManifest) -> tuple[int, int]:
        m = signed.manifest
        existing = self.state.version_dir(m.version)
        if existing.is_dir():
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
                if local is not None:
                    digest, size = hash_stream_to(_read_chunks(local), dest)  # copy + re-hash
                    reused += size
                else:
                    digest, size = self._download(f.sha256, dest)
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

    def _download(self, sha256: str, dest: Path) -> tuple[str, int]:
        with self._http.stream("GET", f"/v1/blobs/{sha256}") as resp:
            if resp.status_code != 200:
                resp.read()
                raise RegistryError(f"GET /v1/blobs/{sha256}: expected 200, got {resp.status_code}: "
                                    f"{resp.text[:200]}")
            return hash_stream_to(resp.iter_bytes(1 << 20), dest)

    # --- local operations ------------------------------------------------------------------------
    def rollback(self) -> Pointer:
        return rollback(self.state, self.config.trusted_key)

    def active(self) -> tuple[Path, Manifest]:
        return self.state.active(self.config.trusted_key)


def rollback(state: DeviceState, key: VerifyKey) -> Pointer:
    """Make the previous version active again; the version left is blocked from auto re-install."""
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


def load_active_adapter(base_model, state_dir: Path, key: VerifyKey):
    """Attach the verified active adapter to ``base_model`` (peft); returns (model, manifest)."""
    from peft import PeftModel

    directory, manifest = DeviceState(Path(state_dir)).active(key)
    return PeftModel.from_pretrained(base_model, str(directory)), manifest


def _read_chunks(path: Path, size: int = 1 << 20):
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk
