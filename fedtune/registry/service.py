"""The HTTP service devices poll (FastAPI; ``serve`` runs it under uvicorn).

    GET /v1/health
    GET /v1/manifest?base_model=ID&channel=stable&device_id=D
        -> the signed manifest this device should run (bytes exactly as signed and stored),
           ETag = "sha256 of those bytes"; If-None-Match with that ETag -> 304, no body.
           404 when the channel has nothing for this device.
    GET /v1/blobs/{sha256}
        -> the file; ETag = "<sha256>", immutable; If-None-Match -> 304.
    GET /v1/versions[?base_model=ID]   summaries for people (unsigned; devices never use them)
    GET /v1/channels                   channel states for people

The service holds no key and is not trusted: devices verify the signature and every hash themselves.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from fedtune.registry.errors import NotFoundError, RegistryError
from fedtune.registry.registry import Registry

log = logging.getLogger(__name__)

MANIFEST_TYPE = "application/vnd.fedtune.manifest+json"


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


def create_app(registry: Registry) -> FastAPI:
    app = FastAPI(title="fedtune adapter registry", version="1")

    @app.exception_handler(NotFoundError)
    async def _not_found(_request, err: NotFoundError):
        return JSONResponse({"detail": str(err)}, status_code=404)

    @app.exception_handler(RegistryError)
    async def _bad_request(_request, err: RegistryError):
        return JSONResponse({"detail": str(err)}, status_code=400)

    @app.get("/v1/health")
    def health() -> dict:
        return {"status": "ok", "versions": len(registry.db.artifacts())}

    @app.get("/v1/manifest")
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
        return Response(content=row.envelope, media_type=MANIFEST_TYPE, headers=headers)

    @app.get("/v1/blobs/{digest}")
    def blob(digest: str, request: Request):
        if not registry.store.has(digest):
            raise NotFoundError(f"no blob {digest}")
        etag = f'"{digest}"'
        headers = {"ETag": etag, "Cache-Control": "public, max-age=31536000, immutable"}
        if etag_matches(request.headers.get("if-none-match"), etag):
            return Response(status_code=304, headers=headers)
        local = getattr(registry.store, "local_path", None)
        if local is not None:
            return FileResponse(local(digest), media_type="application/octet-stream", headers=headers)
        stream = registry.store.open(digest)
        headers["Content-Length"] = str(registry.store.size(digest))
        return StreamingResponse(_chunks(stream), media_type="application/octet-stream", headers=headers)

    @app.get("/v1/versions")
    def versions(base_model: str | None = None) -> list[dict]:
        out = []
        for s in registry.versions(base_model):
            m = s.manifest
            out.append({"version": m.version, "name": m.name, "base_model": m.base_model.id,
                        "source": m.source.model_dump(), "privacy": m.privacy.model_dump(),
                        "metrics": m.metrics, "bytes": m.total_bytes, "created_at": m.created_at})
        return out

    @app.get("/v1/channels")
    def channels() -> list[dict]:
        return [{"base_model": c.base_model_id, "channel": c.channel, "current": c.current,
                 "candidate": c.candidate, "rollout": c.rollout, "history": list(c.history)}
                for c in registry.channels()]

    return app


def _chunks(stream, size: int = 1 << 20):
    with stream:
        while chunk := stream.read(size):
            yield chunk


def serve(root: Path, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info") -> None:
    """Run the service in the foreground (``fedtune registry serve``)."""
    import uvicorn

    log.info("serving registry %s on http://%s:%d", root, host, port)
    uvicorn.run(create_app(Registry(root)), host=host, port=port, log_level=log_level)
