"""End to end over real HTTP on loopback: publish -> promote -> pull -> new version -> pull -> rollback,
with a tampered manifest and a tampered blob refused while the device keeps its adapter."""

from __future__ import annotations

import json
import os
import sqlite3

import httpx
import pytest
import torch

from fedtune.registry import IntegrityError, RegistryError, publish_run
from fedtune.registry.device import DeviceClient, DeviceConfig, load_active_adapter
from tests.conftest import make_config

BASE = "tiny-llama"
X = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(7))


def logits_of(state_dir, key):
    from fedtune.models import load_base_model

    base, _ = load_base_model(make_config().model)
    model, manifest = load_active_adapter(base, state_dir, key)
    with torch.no_grad():
        return model(input_ids=X).logits, manifest.version


def logits_of_dir(adapter_dir):
    from peft import PeftModel

    from fedtune.models import load_base_model

    base, _ = load_base_model(make_config().model)
    with torch.no_grad():
        return PeftModel.from_pretrained(base, str(adapter_dir))(input_ids=X).logits


def set_envelope(registry, version, envelope: bytes):
    with sqlite3.connect(registry.db.path) as con:
        con.execute("UPDATE artifacts SET envelope = ? WHERE version = ?", (envelope, version))


def test_publish_promote_pull_update_rollback_and_tampering(tmp_path, registry, keys, runs, live):
    key, verify = keys
    run_a, run_b = runs
    v1 = publish_run(run_a, registry, key, round=1).manifest
    registry.promote(v1.version, "stable", 100, keys=key)

    device_dir = tmp_path / "device"
    cfg = DeviceConfig(server=live.url, base_model_id=BASE, trusted_key=verify, base_model_sha256=v1.base_model.sha256)
    with DeviceClient(device_dir, cfg, device_id="phone-1") as dev:
        # 1. first pull: everything downloaded, verified, active
        r = dev.pull()
        assert (r.status, r.active, r.previous, r.http_status) == ("updated", 1, None, 200)
        assert r.downloaded_bytes == v1.total_bytes and r.reused_bytes == 0
        got, version = logits_of(device_dir, verify)
        assert version == 1 and torch.allclose(got, logits_of_dir(run_a / "adapters/round-1"), atol=1e-6)

        # 2. unchanged: a 304, no bytes
        r = dev.pull()
        assert (r.status, r.http_status, r.downloaded_bytes) == ("unchanged", 304, 0)

        # 3. a new version: only the changed files travel; the old one is kept as previous
        v2 = publish_run(run_a, registry, key, round=2).manifest
        r = dev.pull()
        assert r.status == "unchanged"  # published but not promoted: devices do not see it
        registry.promote(v2.version, "stable", 100, keys=key)
        r = dev.pull()
        assert (r.status, r.active, r.previous) == ("updated", 2, 1)
        same = {f.path for f in v2.files if f.sha256 in {g.sha256 for g in v1.files}}
        assert "adapter_config.json" in same
        assert r.reused_bytes == sum(v2.file(p).size for p in same)
        assert r.downloaded_bytes == v2.total_bytes - r.reused_bytes
        assert logits_of(device_dir, verify)[1] == 2

        # 4. device rollback: v1 active again, and the next poll does not re-install v2
        ptr = dev.rollback()
        assert (ptr.active, ptr.previous, ptr.blocked) == (1, 2, (2,))
        good, version = logits_of(device_dir, verify)
        assert version == 1
        assert dev.pull().status in ("unchanged", "blocked")

        # 5. a tampered manifest (ε lowered after signing) is refused: the signed channel metadata pins its
        #    size and sha256, so it is not even parsed; v1 keeps working
        v3 = publish_run(run_b, registry, key).manifest
        registry.promote(v3.version, "stable", 100, keys=key)
        honest = registry.row(v3.version).envelope
        forged = json.loads(honest)
        forged["manifest"]["privacy"]["epsilon"] = 0.01
        set_envelope(registry, v3.version, json.dumps(forged).encode())
        with pytest.raises(IntegrityError, match="more than the .* bytes expected|metadata names"):
            dev.pull()
        assert torch.equal(logits_of(device_dir, verify)[0], good)
        set_envelope(registry, v3.version, honest)

        # 6. a blob corrupted on the server (same size, other bytes): the service re-hashes it and refuses to
        #    serve it (500); the device installs nothing, nothing half-installed stays behind
        weights = v3.file("adapter_model.safetensors")
        blob = registry.store.local_path(weights.sha256)
        original = blob.read_bytes()
        os.chmod(blob, 0o644)
        blob.write_bytes(original[:-64] + bytes(64))
        with pytest.raises(RegistryError, match="expected 200, got 500"):
            dev.pull()
        assert dev.state.pointer().active == 1 and not (device_dir / "versions" / "3").exists()
        assert not list((device_dir / "staging").iterdir())
        assert torch.equal(logits_of(device_dir, verify)[0], good)

        # 7. repaired: v3 installs; server-side rollback of the channel brings the device back to v2
        blob.write_bytes(original)
        r = dev.pull()
        assert (r.status, r.active, r.previous) == ("updated", 3, 1)
        registry.rollback(BASE, "stable", keys=key)
        r = dev.pull(force=True)  # v2 was blocked by the device's own rollback: force takes it anyway
        assert (r.status, r.active, r.previous) == ("updated", 2, 3)


def test_etag_and_304_on_manifest_and_blobs(registry, keys, runs, live):
    key, _ = keys
    signed = publish_run(runs[0], registry, key, round=1)
    params = {"base_model": BASE, "channel": "stable", "device_id": "d1"}
    with httpx.Client(base_url=live.url) as http:
        assert http.get("/v1/manifest", params=params).status_code == 404  # nothing promoted yet
        registry.promote(signed.manifest.version, keys=key)
        first = http.get("/v1/manifest", params=params)
        assert first.status_code == 200 and first.content == signed.to_bytes()
        etag = first.headers["etag"]
        again = http.get("/v1/manifest", params=params, headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
        other = http.get("/v1/manifest", params=params, headers={"If-None-Match": '"stale"'})
        assert other.status_code == 200

        f = signed.manifest.file("adapter_model.safetensors")
        blob = http.get(f"/v1/blobs/{f.sha256}")
        assert blob.status_code == 200 and len(blob.content) == f.size
        assert blob.headers["etag"] == f'"{f.sha256}"' and "immutable" in blob.headers["cache-control"]
        cached = http.get(f"/v1/blobs/{f.sha256}", headers={"If-None-Match": blob.headers["etag"]})
        assert cached.status_code == 304 and cached.content == b""
        assert http.get("/v1/blobs/" + "0" * 64).status_code == 404
        assert http.get("/v1/blobs/not-a-hash").status_code == 404
        assert [v["version"] for v in http.get("/v1/versions").json()] == [1]
        assert http.get("/v1/channels").json()[0]["current"] == 1
