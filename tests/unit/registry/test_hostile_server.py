"""A hostile registry server (no keys; it replays, swaps, inflates and trickles what it has stored).

The server is a loopback ``ThreadingHTTPServer`` started and stopped by each test. It serves bytes taken
from an honest registry: every signed document it sends was genuinely signed once. The device must
refuse each attack and keep its active adapter exactly as it was.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from fedtune.registry import (DeadlineError, ExpiredError, IntegrityError, ReplayError, SignatureError,
                              publish_run)
from fedtune.registry.device import DeviceClient, DeviceConfig
from fedtune.registry.freshness import channel_key
from fedtune.registry.metadata import SNAPSHOT_ROLE, TIMESTAMP_ROLE

BASE = "tiny-llama"


class Hostile:
    """routes: path -> bytes (200) or a callable(handler) that writes the whole response itself."""

    def __init__(self):
        self.routes: dict = {}
        self.sent = 0
        self.stop = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                spec = owner.routes.get(urlsplit(self.path).path)
                if spec is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif callable(spec):
                    spec(self)
                else:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(spec)))
                    self.end_headers()
                    self.wfile.write(spec)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def serve_registry(self, registry, channel_version: int | None = None, channel: str = "stable"):
        """Everything the honest registry has stored, including unpromoted versions and old metadata."""
        v = 1
        while (got := registry.db.root(v)) is not None:
            self.routes[f"/v1/roots/{v}"] = got[1]
            v += 1
        for row in registry.db.artifacts():
            self.routes[f"/v1/manifests/{row.version}"] = row.envelope
            for f in registry.get(row.version).manifest.files:
                self.routes[f"/v1/blobs/{f.sha256}"] = registry.store.local_path(f.sha256).read_bytes()
        self.set_channel(registry, channel_version, channel)

    def set_channel(self, registry, version: int | None = None, channel: str = "stable"):
        """Channel metadata v``version`` (default: the newest), with the snapshot and timestamp signed with it."""
        rows = [r for r in registry.db.all_channel_meta() if r[1] == channel]
        base, _, v, envelope = next(r for r in reversed(rows) if version in (None, r[2]))
        self.routes["/v1/channel"] = envelope
        key = channel_key(base, channel)
        sv, snap = [(sv, e) for sv, e in registry.db.all_role_meta(SNAPSHOT_ROLE)
                    if json.loads(e)["signed"]["channels"].get(key, {}).get("version") == v][-1]
        self.routes["/v1/snapshot"] = snap
        self.routes["/v1/timestamp"] = [e for _, e in registry.db.all_role_meta(TIMESTAMP_ROLE)
                                        if json.loads(e)["signed"]["snapshot"]["version"] == sv][-1]

    def endless(self, handler):
        """A body that never ends (no Content-Length): counts what it manages to send."""
        handler.send_response(200)
        handler.end_headers()
        chunk = b"\0" * 65536
        try:
            while not self.stop.is_set() and self.sent < 500 << 20:
                handler.wfile.write(chunk)
                self.sent += len(chunk)
        except OSError:
            pass

    def trickle(self, size: int):
        def handler(h):
            h.send_response(200)
            h.send_header("Content-Length", str(size))
            h.end_headers()
            try:
                for _ in range(min(size, 40)):  # at most ~8 s, then hang up: a broken client fails, not hangs
                    if self.stop.wait(0.2):
                        return
                    h.wfile.write(b"x")
                    h.wfile.flush()
            except OSError:
                pass
        return handler


@pytest.fixture
def setup(tmp_path, registry, keys, runs):
    """v1 promoted (channel metadata v1), v2 promoted (metadata v2), v3 published but never promoted."""
    key, verify = keys
    v1 = publish_run(runs[0], registry, key, round=1).manifest
    registry.promote(1, keys=key)
    v2 = publish_run(runs[1], registry, key).manifest
    registry.promote(2, keys=key)
    v3 = publish_run(runs[0], registry, key, round=2).manifest
    return key, verify, (v1, v2, v3)


def device(tmp_path, url, verify, **kw):
    cfg = DeviceConfig(server=url, base_model_id=kw.pop("base", BASE), trusted_key=verify, **kw)
    return DeviceClient(tmp_path / "device", cfg, device_id="phone-7")


def snapshot(dev):
    """Everything that decides what the device runs, byte for byte."""
    d = dev.state.version_dir(dev.state.pointer().active)
    return dev.state.pointer(), {p.name: p.read_bytes() for p in d.iterdir()}


@contextmanager
def updated_device(tmp_path, registry, verify):
    """A hostile server serving the honest registry, and a device that took its release (v2) from it:
    (server, device, the device's state before the attack)."""
    with Hostile() as srv:
        srv.serve_registry(registry)
        dev = device(tmp_path, srv.url, verify)
        assert dev.pull().active == 2
        yield srv, dev, snapshot(dev)


def assert_untouched(dev, before):
    assert snapshot(dev) == before
    assert dev.active()[1].version == before[0].active
    assert not list((dev.state.root / "staging").iterdir())


def test_replayed_older_metadata_cannot_roll_the_device_back(tmp_path, registry, setup):
    _, verify, _ = setup
    with updated_device(tmp_path, registry, verify) as (srv, dev, before):
        srv.set_channel(registry, version=1)  # the genuine, signed metadata that named v1
        with pytest.raises(ReplayError, match="older than v2"):
            dev.pull(force=True)
        assert_untouched(dev, before)


def test_a_signed_rollback_is_accepted(tmp_path, registry, setup):
    key, verify, _ = setup
    with Hostile() as srv:
        srv.serve_registry(registry)
        dev = device(tmp_path, srv.url, verify)
        assert dev.pull().active == 2
        registry.rollback(BASE, keys=key)  # metadata v3 -> artifact v1
        srv.serve_registry(registry)
        r = dev.pull()
        assert (r.status, r.active, r.previous) == ("updated", 1, 2)


def test_an_unpromoted_version_cannot_be_offered(tmp_path, registry, setup):
    _, verify, (v1, v2, v3) = setup
    with Hostile() as srv:
        srv.serve_registry(registry)
        srv.set_channel(registry, version=1)
        dev = device(tmp_path, srv.url, verify)
        assert dev.pull().active == 1
        before = snapshot(dev)
        # 1. v3's genuine signed manifest served where the channel names v2
        srv.set_channel(registry, version=2)
        srv.routes["/v1/manifests/2"] = registry.row(3).envelope
        with pytest.raises(IntegrityError, match="bytes expected|metadata names"):
            dev.pull()
        assert_untouched(dev, before)
        # 2. channel metadata edited to name v3 (signatures kept): the threshold no longer verifies
        meta = json.loads(srv.routes["/v1/channel"])
        env = registry.row(3).envelope
        meta["signed"]["current"] = {"name": v3.name, "version": 3, "manifest_sha256": hashlib.sha256(env).hexdigest(),
                                     "manifest_size": len(env)}
        meta["signed"]["version"] += 1
        srv.routes["/v1/channel"] = json.dumps(meta).encode()
        srv.routes["/v1/manifests/3"] = env
        with pytest.raises(SignatureError, match="0 valid signature"):
            dev.pull()
        assert_untouched(dev, before)


def test_another_channels_or_base_models_or_artifacts_metadata_is_refused(tmp_path, registry, setup):
    key, verify, _ = setup
    registry.promote(3, channel="beta", keys=key)
    with Hostile() as srv:
        srv.serve_registry(registry)
        dev = device(tmp_path, srv.url, verify)
        dev.pull()
        before = snapshot(dev)
        srv.set_channel(registry, channel="beta")
        with pytest.raises(ReplayError, match="metadata for tiny-llama/beta"):
            dev.pull()
        assert_untouched(dev, before)
        srv.set_channel(registry)
        pinned = device(tmp_path, srv.url, verify, artifact="some-other-adapter")
        with pytest.raises(ReplayError, match="serves artifact 'run-b'"):
            pinned.pull()
        assert_untouched(dev, before)


def test_expired_metadata_is_refused(tmp_path, registry, setup):
    key, verify, _ = setup
    with Hostile() as srv:
        srv.serve_registry(registry)
        dev = device(tmp_path, srv.url, verify)
        dev.pull()
        before = snapshot(dev)
        registry.rollback(BASE, keys=key, ttl_s=-60)  # newer, validly signed, but already expired
        srv.serve_registry(registry)
        with pytest.raises(ExpiredError, match="expired at"):
            dev.pull()
        assert_untouched(dev, before)


def test_a_lying_server_cannot_fill_the_disk(tmp_path, registry, setup):
    _, verify, (v1, v2, _) = setup
    weights = v2.file("adapter_model.safetensors")
    with Hostile() as srv:
        srv.serve_registry(registry)
        srv.set_channel(registry, version=1)
        dev = device(tmp_path, srv.url, verify)
        dev.pull()
        before = snapshot(dev)
        srv.set_channel(registry, version=2)
        srv.routes[f"/v1/blobs/{weights.sha256}"] = srv.endless
        with pytest.raises(IntegrityError, match=f"more than the {weights.size:,} bytes expected"):
            dev.pull()
        assert_untouched(dev, before)
        assert srv.sent < weights.size + (16 << 20), srv.sent  # stopped at the size, not at 500 MB

        def liar(h):  # declares 10 GB up front: refused before a byte is read
            h.send_response(200)
            h.send_header("Content-Length", str(10 << 30))
            h.end_headers()
        srv.routes[f"/v1/blobs/{weights.sha256}"] = liar
        with pytest.raises(IntegrityError, match="more than"):
            dev.pull()
        srv.routes["/v1/channel"] = srv.endless  # metadata is bounded too
        with pytest.raises(IntegrityError, match="more than the 1,048,576 bytes"):
            dev.pull()
        assert_untouched(dev, before)


def test_a_trickling_server_hits_the_overall_deadline(tmp_path, registry, setup):
    _, verify, (v1, v2, _) = setup
    weights = v2.file("adapter_model.safetensors")
    with Hostile() as srv:
        srv.serve_registry(registry)
        srv.set_channel(registry, version=1)
        dev = device(tmp_path, srv.url, verify, deadline_s=1.5, timeout_s=30)
        dev.pull()
        before = snapshot(dev)
        srv.set_channel(registry, version=2)
        srv.routes[f"/v1/blobs/{weights.sha256}"] = srv.trickle(weights.size)  # a byte every 0.2 s
        t0 = time.monotonic()
        with pytest.raises(DeadlineError, match="1.5 s deadline"):
            dev.pull()
        assert time.monotonic() - t0 < 4
        assert_untouched(dev, before)


def test_two_documents_claiming_one_version_are_refused(tmp_path, registry, setup):
    from fedtune.registry.metadata import ChannelMeta, expires_in, sign_document

    key, verify, _ = setup
    with Hostile() as srv:
        srv.serve_registry(registry)
        dev = device(tmp_path, srv.url, verify)
        dev.pull()
        before = snapshot(dev)
        accepted = ChannelMeta.model_validate(json.loads(srv.routes["/v1/channel"])["signed"])
        other = accepted.model_copy(update={"expires": expires_in(86400 * 30)})  # same version, other bytes
        srv.routes["/v1/channel"] = sign_document(other, [key])
        with pytest.raises(ReplayError, match="two different documents claim v2"):
            dev.pull(force=True)
        assert_untouched(dev, before)


# --- TUF's timestamp and snapshot roles (freshness.py) ----------------------------------------------
def _doc(envelope: bytes) -> dict:
    return json.loads(envelope)["signed"]


def test_a_frozen_server_is_caught_by_the_stale_timestamp(tmp_path, registry, setup):
    """The server keeps serving a genuine, once-valid state after its short-lived timestamp expired."""
    key, verify, _ = setup
    registry.refresh_timestamp(keys=key, ttl_s=2)
    with updated_device(tmp_path, registry, verify) as (srv, dev, before):
        registry.promote(3, keys=key)  # the server hides this release from the device (a freeze)
        time.sleep(2.1)
        assert _doc(srv.routes["/v1/channel"])["expires"] > _doc(srv.routes["/v1/timestamp"])["expires"]
        with pytest.raises(ExpiredError, match=r"timestamp metadata v\d+ \(a frozen server.*expired at"):
            dev.pull()
        assert_untouched(dev, before)


def test_a_timestamp_pinning_an_older_snapshot_is_refused(tmp_path, registry, setup):
    """Even with the timestamp key, a server cannot point the device back to an older snapshot."""
    from fedtune.registry.freshness import TimestampMeta, pin
    from fedtune.registry.metadata import expires_in, sign_document

    key, verify, _ = setup
    with updated_device(tmp_path, registry, verify) as (srv, dev, before):
        newest = _doc(srv.routes["/v1/timestamp"])
        old_v, old_snap = registry.db.all_role_meta(SNAPSHOT_ROLE)[0]
        forged = TimestampMeta(version=newest["version"] + 1, expires=expires_in(3600), snapshot=pin(old_v, old_snap))
        srv.routes["/v1/timestamp"], srv.routes["/v1/snapshot"] = sign_document(forged, [key]), old_snap
        with pytest.raises(ReplayError, match=r"pins snapshot v1, older than v2 .*\(a snapshot rollback\)"):
            dev.pull(force=True)
        assert_untouched(dev, before)


def test_a_snapshot_that_rolls_a_channel_back_is_refused(tmp_path, registry, setup):
    """Holding the snapshot and timestamp keys, a thief re-pins the channel's older metadata: refused."""
    from fedtune.registry.freshness import SnapshotMeta, TimestampMeta, pin
    from fedtune.registry.metadata import expires_in, sign_document

    key, verify, _ = setup
    with updated_device(tmp_path, registry, verify) as (srv, dev, before):
        old = registry.db.all_channel_meta()[0]  # channel metadata v1 (named artifact v1)
        snap = SnapshotMeta(version=50, expires=expires_in(3600), channels={f"{BASE}/stable": pin(1, old[3])})
        snap_env = sign_document(snap, [key])
        ts = TimestampMeta(version=50, expires=expires_in(3600), snapshot=pin(50, snap_env))
        srv.routes.update({"/v1/timestamp": sign_document(ts, [key]), "/v1/snapshot": snap_env,
                           "/v1/channel": old[3]})
        with pytest.raises(ReplayError, match=r"channel tiny-llama/stable went back to metadata v1, .*accepted v2"):
            dev.pull(force=True)
        assert_untouched(dev, before)


def test_documents_other_than_the_pinned_ones_are_refused(tmp_path, registry, setup):
    from fedtune.registry.freshness import SnapshotMeta
    from fedtune.registry.metadata import ChannelMeta, expires_in, sign_document

    key, verify, _ = setup
    with Hostile() as srv:
        srv.serve_registry(registry)
        genuine = dict(srv.routes)
        # a snapshot re-signed at the pinned version with other bytes (a leaked snapshot key, not the timestamp's)
        snap = SnapshotMeta.model_validate(_doc(genuine["/v1/snapshot"]))
        srv.routes["/v1/snapshot"] = sign_document(snap.model_copy(update={"expires": expires_in(99_999)}), [key])
        dev = device(tmp_path, srv.url, verify)
        with pytest.raises(IntegrityError, match=r"snapshot metadata v2: its sha256 .* the signed timestamp v2 names"):
            dev.pull()
        assert dev.state.pointer().active is None and not list((dev.state.root / "versions").iterdir())
        # channel metadata re-signed at the pinned version with other bytes (a leaked release key)
        srv.routes.update(genuine)
        chan = ChannelMeta.model_validate(_doc(genuine["/v1/channel"]))
        srv.routes["/v1/channel"] = sign_document(chan.model_copy(update={"expires": expires_in(99_999)}), [key])
        with pytest.raises(IntegrityError, match=r"channel metadata .* v2: its sha256 .* the signed snapshot names"):
            dev.pull()
        assert dev.state.pointer().active is None
        srv.routes.update(genuine)
        assert dev.pull().active == 2  # the genuine documents still go through


def test_each_document_needs_its_own_roles_signature(tmp_path, registry, setup, more_keys_for_roles):
    """Distinct keys per role: a timestamp signed by the release key, or a snapshot by the timestamp key, is refused."""
    from fedtune.registry.freshness import SnapshotMeta, TimestampMeta
    from fedtune.registry.metadata import sign_document

    key, verify, _ = setup
    (s, s_pub), (t, t_pub) = more_keys_for_roles
    registry.rotate_root([key], root_keys=[verify], root_threshold=1, release_keys=[verify], release_threshold=1,
                         snapshot_keys=[s_pub], timestamp_keys=[t_pub])
    with pytest.raises(SignatureError, match="0 valid signature.* root v2's 'snapshot' keys"):
        registry.refresh(BASE, keys=key)  # the release key alone cannot sign the snapshot: nothing written
    registry.refresh(BASE, keys=[key, s, t])
    with Hostile() as srv:
        srv.serve_registry(registry)
        dev = device(tmp_path, srv.url, verify)
        assert dev.pull().active == 2  # walks root v2, then trusts the new snapshot and timestamp keys
        before = snapshot(dev)
        genuine = dict(srv.routes)
        ts = TimestampMeta.model_validate(_doc(genuine["/v1/timestamp"]))
        srv.routes["/v1/timestamp"] = sign_document(ts.model_copy(update={"version": ts.version + 1}), [key, s])
        with pytest.raises(SignatureError, match="timestamp metadata: 0 valid signature.* root v2's 'timestamp' keys"):
            dev.pull()
        assert_untouched(dev, before)
        srv.routes.update(genuine)
        snap = SnapshotMeta.model_validate(_doc(genuine["/v1/snapshot"]))
        fresh = device(tmp_path / "other", srv.url, verify)
        srv.routes["/v1/snapshot"] = sign_document(snap, [key, t])
        with pytest.raises(SignatureError, match="snapshot metadata: 0 valid signature.* root v2's 'snapshot' keys"):
            fresh.pull()
        assert fresh.state.pointer().active is None


@pytest.fixture
def more_keys_for_roles(tmp_path):
    from fedtune.registry.signing import generate_keypair, load_verify_key

    out = []
    for name in ("snapshot", "timestamp"):
        k = generate_keypair(tmp_path / "roles" / f"{name}.key")
        out.append((k, load_verify_key(tmp_path / "roles" / f"{name}.pub")))
    return out
