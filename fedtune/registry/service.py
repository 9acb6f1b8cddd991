"""The HTTP service devices poll (FastAPI; ``serve`` runs it under uvicorn). Read-only, and not trusted.

Every route answers GET and HEAD:

    /v1/health
    /v1/root, /v1/roots/{n}              signed root metadata (devices walk n = 1, 2, ... for key rotation)
    /v1/timestamp, /v1/snapshot          the newest signed timestamp and snapshot (freshness.py)
    /v1/channel?base_model=ID&channel=C  signed channel metadata (what the channel serves now), ETag / 304
    /v1/manifests/{version}              a signed manifest, only while the version is promoted
    /v1/blobs/{sha256}                   a file of a promoted version; re-hashed before it is served (cached by
                                         inode, size and mtime) and refused with 500 if the bytes changed
    /v1/manifest?base_model&channel&device_id   the manifest this device gets (for people and old clients)
    /v1/versions, /v1/channels           promoted versions and channel states, for people

Unpromoted versions are invisible (404). /docs, /redoc and /openapi.json are off unless ``docs=True``.
The service holds no key: devices verify every signature and hash themselves (metadata.py, device.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from fedtune.registry.errors import IntegrityError, NotFoundError, RegistryError
from fedtune.registry.metadata import SNAPSHOT_ROLE, TIMESTAMP_ROLE
from fedtune.registry.registry import Registry

log = logging.getLogger(__name__)

MANIFEST_TYPE = "application/vnd.fedtune.manifest+json"
METADATA_TYPE = "application/vnd.fedtune.metadata+json"
GET_HEAD = ["GET", "HEAD"]


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 weak comparison against a comma-separated If-None-Match list (or '*')."""
    if not if_none_match:
        return False
    bare = etag.removeprefix("W/")
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == bare:
            return True
    return False


class BlobChecker:
    """sha256 of a stored blob, recomputed whenever its (inode, size, mtime) changes."""

    def __init__(self) -> None:
        self._ok: dict[str, tuple[int, int, int]] = {}
        self._lock = threading.Lock()

    def check(self, path: Path, digest: str) -> None:
        st = os.stat(path)
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if self._ok.get(digest) == stamp:
                return
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        if h.hexdigest() != digest:
            with self._lock:
                self._ok.pop(digest, None)
            raise IntegrityError(f"blob {digest} is corrupted on the server (its bytes hash to {h.hexdigest()}); "
                                 "not serving it. Restore it from a backup or re-publish; `fedtune registry verify` "
                                 "lists every damaged blob")
        with self._lock:
            self._ok[digest] = stamp


def _body(request: Request, content: bytes, headers: dict[str, str], media_type: str) -> Response:
    if request.method == "HEAD":
        return Response(status_code=200, media_type=media_type, headers={**headers, "Content-Length": str(len(content))})
    return Response(content=content, media_type=media_type, headers=headers)


def create_app(registry: Registry, docs: bool = False) -> FastAPI:
    app = FastAPI(title="fedtune adapter registry", version="1", docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None)
    checker = BlobChecker()

    @app.exception_handler(NotFoundError)
    async def _not_found(_request, err: NotFoundError):
        return JSONResponse({"detail": str(err)}, status_code=404)

    @app.exception_handler(IntegrityError)
    async def _corrupted(_request, err: IntegrityError):
        log.error("%s", err)
        return JSONResponse({"detail": str(err)}, status_code=500, headers={"Cache-Control": "no-store"})

    @app.exception_handler(RegistryError)
    async def _bad_request(_request, err: RegistryError):
        return JSONResponse({"detail": str(err)}, status_code=400)

    @app.api_route("/v1/health", methods=GET_HEAD)
    def health() -> dict:
        return {"status": "ok", "versions": len(registry.promoted_versions())}

    @app.api_route("/v1/root", methods=GET_HEAD)
    def root(request: Request):
        return _body(request, registry.root_envelope(), {"Cache-Control": "no-cache"}, METADATA_TYPE)

    @app.api_route("/v1/roots/{version}", methods=GET_HEAD)
    def root_version(version: int, request: Request):
        return _body(request, registry.root_envelope(version), {"Cache-Control": "no-cache"}, METADATA_TYPE)

    @app.api_route("/v1/timestamp", methods=GET_HEAD)
    def timestamp(request: Request):
        return _role(request, TIMESTAMP_ROLE)

    @app.api_route("/v1/snapshot", methods=GET_HEAD)
    def snapshot(request: Request):
        return _role(request, SNAPSHOT_ROLE)

    def _role(request: Request, role: str):
        envelope = registry.role_envelope(role)
        if envelope is None:
            raise NotFoundError(f"no signed {role} metadata yet (nothing promoted)")
        return _body(request, envelope, {"Cache-Control": "no-cache"}, METADATA_TYPE)

    @app.api_route("/v1/channel", methods=GET_HEAD)
    def channel_meta(request: Request, base_model: str = Query(...), channel: str = Query("stable")):
        envelope = registry.channel_envelope(base_model, channel)
        if envelope is None:
            raise NotFoundError(f"channel {channel!r} has no signed metadata for base model {base_model!r} "
                                "(nothing promoted yet)")
        etag = f'"{hashlib.sha256(envelope).hexdigest()}"'
        headers = {"ETag": etag, "Cache-Control": "no-cache"}
        if etag_matches(request.headers.get("if-none-match"), etag):
            return Response(status_code=304, headers=headers)
        return _body(request, envelope, headers, METADATA_TYPE)

    @app.api_route("/v1/manifests/{version}", methods=GET_HEAD)
    def manifest_by_version(version: int, request: Request):
        if version not in registry.promoted_versions():
            raise NotFoundError(f"no promoted version {version}")
        envelope = registry.row(version).envelope
        etag = f'"{hashlib.sha256(envelope).hexdigest()}"'
        return _body(request, envelope, {"ETag": etag, "Cache-Control": "no-cache"}, MANIFEST_TYPE)

    @app.api_route("/v1/manifest", methods=GET_HEAD)
    def manifest(request: Request, base_model: str = Query(...), device_id: str = Query(..., min_length=1),
                 channel: str = Query("stable")):
        row = registry.resolve(base_model, channel, device_id)
        if row is None:
            raise NotFoundError(f"channel {channel!r} has no adapter for base model {base_model!r} and this "
                                "device (nothing promoted yet, or this device is outside the staged rollout)")
        etag = f'"{hashlib.sha256(row.envelope).hexdigest()}"'
        headers = {"ETag": etag, "Cache-Control": "no-cache", "X-Fedtune-Version": str(row.version)}
        if etag_matches(request.headers.get("if-none-match"), etag):
            return Response(status_code=304, headers=headers)
        return _body(request, row.envelope, headers, MANIFEST_TYPE)

    @app.api_route("/v1/blobs/{digest}", methods=GET_HEAD)
    def blob(digest: str, request: Request):
        if not registry.store.has(digest) or digest not in _promoted_blobs(registry):
            raise NotFoundError(f"no blob {digest}")
        local = getattr(registry.store, "local_path", None)
        if local is not None:
            checker.check(local(digest), digest)  # raises -> 500, no cache headers
        etag = f'"{digest}"'
        headers = {"ETag": etag, "Cache-Control": "public, max-age=31536000, immutable"}
        if etag_matches(request.headers.get("if-none-match"), etag):
            return Response(status_code=304, headers=headers)
        if local is not None:
            return FileResponse(local(digest), media_type="application/octet-stream", headers=headers)
        headers["Content-Length"] = str(registry.store.size(digest))
        if request.method == "HEAD":
            return Response(status_code=200, media_type="application/octet-stream", headers=headers)
        return StreamingResponse(_chunks(registry.store.open(digest)), media_type="application/octet-stream",
                                 headers=headers)

    @app.api_route("/v1/versions", methods=GET_HEAD)
    def versions(base_model: str | None = None) -> list[dict]:
        promoted = registry.promoted_versions()
        out = []
        for s in registry.versions(base_model):
            m = s.manifest
            if m.version not in promoted:
                continue
            out.append({"version": m.version, "name": m.name, "base_model": m.base_model.id,
                        "source": m.source.model_dump(), "privacy": m.privacy.model_dump(),
                        "metrics": m.metrics, "bytes": m.total_bytes, "created_at": m.created_at})
        return out

    @app.api_route("/v1/channels", methods=GET_HEAD)
    def channels() -> list[dict]:
        return [{"base_model": c.base_model_id, "channel": c.channel, "current": c.current,
                 "candidate": c.candidate, "rollout": c.rollout}
                for c in registry.channels()]

    return app


def _promoted_blobs(registry: Registry) -> set[str]:
    return {f.sha256 for v in registry.promoted_versions() for f in registry.get(v).manifest.files}


def _chunks(stream, size: int = 1 << 20):
    with stream:
        while chunk := stream.read(size):
            yield chunk


def bounded_protocol(request_timeout_s: float):
    """uvicorn's h11 protocol with a deadline for reading each request (headers and body), against slowloris."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class BoundedH11Protocol(H11Protocol):
        _read_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            if self._read_timer is None:
                self._read_timer = self.loop.call_later(request_timeout_s, self._read_timed_out)

        def _disarm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE:
                self._arm()  # a new request starts: it has request_timeout_s to arrive in full
            super().data_received(data)
            if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _read_timed_out(self) -> None:
            self._read_timer = None
            if self.conn.their_state not in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED) and not self.transport.is_closing():
                log.info("closing a connection that did not send its request within %g s", request_timeout_s)
                self.transport.close()

    return BoundedH11Protocol


def server_config(app, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info",
                  request_timeout_s: float = 10.0, keep_alive_s: float = 5.0, max_connections: int = 256):
    """uvicorn settings for an untrusted network: request-read deadline, short keep-alive, bounded headers."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=bounded_protocol(request_timeout_s),
                          timeout_keep_alive=int(keep_alive_s), limit_concurrency=max_connections,
                          h11_max_incomplete_event_size=16 * 1024, server_header=False)


def serve(root: Path, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info", docs: bool = False,
          request_timeout_s: float = 10.0) -> None:
    """Run the service in the foreground (``fedtune registry serve``)."""
    import uvicorn

    log.info("serving registry %s on http://%s:%d", root, host, port)
    app = create_app(Registry(root), docs=docs)
    uvicorn.Server(server_config(app, host, port, log_level, request_timeout_s)).run()
