"""The read-only HTTP service: HEAD, no docs by default, only promoted versions, corrupted blobs refused,
and a request-read deadline against clients that trickle their headers."""

from __future__ import annotations

import os
import socket
import threading
import time

import httpx
import pytest

from fedtune.registry import publish_run
from fedtune.registry.service import create_app, server_config

BASE = "tiny-llama"


@pytest.fixture
def published(registry, keys, runs):
    """v1 promoted on stable; v2 (other weights) published but never promoted."""
    key, _ = keys
    v1 = publish_run(runs[0], registry, key, round=1).manifest
    registry.promote(1, keys=key)
    v2 = publish_run(runs[1], registry, key).manifest
    return v1, v2


def test_head_and_no_docs(registry, published, live):
    v1, _ = published
    weights = v1.file("adapter_model.safetensors")
    with httpx.Client(base_url=live.url) as http:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert http.get(path).status_code == 404, path
        get = http.get(f"/v1/blobs/{weights.sha256}")
        head = http.head(f"/v1/blobs/{weights.sha256}")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(weights.size) == get.headers["content-length"]
        assert head.headers["etag"] == get.headers["etag"]
        for path in ("/v1/health", "/v1/roots/1", "/v1/manifests/1", f"/v1/channel?base_model={BASE}"):
            g, h = http.get(path), http.head(path)
            assert g.status_code == h.status_code == 200, path
            assert h.content == b"" and int(h.headers["content-length"]) == len(g.content), path


def test_docs_on_request(registry):
    from fastapi.testclient import TestClient

    assert TestClient(create_app(registry, docs=True)).get("/openapi.json").status_code == 200


def test_only_promoted_versions_are_visible(registry, published, live):
    v1, v2 = published
    only_v2 = {f.sha256 for f in v2.files} - {f.sha256 for f in v1.files}
    with httpx.Client(base_url=live.url) as http:
        assert [v["version"] for v in http.get("/v1/versions").json()] == [1]
        assert http.get("/v1/health").json()["versions"] == 1
        assert http.get("/v1/manifests/1").status_code == 200
        assert http.get("/v1/manifests/2").status_code == 404
        assert only_v2 and all(http.get(f"/v1/blobs/{d}").status_code == 404 for d in only_v2)
        assert http.head(f"/v1/blobs/{next(iter(only_v2))}").status_code == 404


def test_a_corrupted_blob_is_refused_and_never_marked_immutable(registry, published, live):
    v1, _ = published
    weights = v1.file("adapter_model.safetensors")
    blob = registry.store.local_path(weights.sha256)
    original = blob.read_bytes()
    url = f"/v1/blobs/{weights.sha256}"
    with httpx.Client(base_url=live.url) as http:
        assert http.get(url).status_code == 200  # hashed once, cached by (inode, size, mtime)
        os.chmod(blob, 0o644)
        blob.write_bytes(original[:-8] + bytes(8))  # same size, other bytes
        for r in (http.get(url), http.head(url), http.get(url, headers={"If-None-Match": f'"{weights.sha256}"'})):
            assert r.status_code == 500
            assert "immutable" not in r.headers.get("cache-control", "") and r.headers.get("etag") is None
        assert "corrupted on the server" in http.get(url).json()["detail"]
        blob.write_bytes(original)
        assert http.get(url).content == original


def test_request_read_deadline_closes_slow_clients(registry):
    import uvicorn

    app = create_app(registry)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(server_config(app, port=port, log_level="warning", request_timeout_s=0.5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.02)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
            t0 = time.monotonic()
            assert c.recv(1024) == b""  # the server closed the connection
            assert time.monotonic() - t0 < 3
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:  # a normal request still works
            c.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert c.recv(1024).startswith(b"HTTP/1.1 200")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
