"""The device client's failure paths: crashes mid-pull, wrong base model or key, corrupted local files."""

import pytest

from fedtune.registry import IntegrityError, ManifestError, NotFoundError, SignatureError, publish_run
from fedtune.registry.device import DeviceClient, DeviceConfig
from fedtune.registry.device_state import DeviceState


class Crash(BaseException):
    """Stands in for the process dying (not an Exception: nothing may catch and carry on)."""


def two_versions(registry, key, runs):
    v1 = publish_run(runs[0], registry, key, round=1).manifest
    v2 = publish_run(runs[1], registry, key).manifest
    registry.promote(v1.version, keys=key)
    return v1, v2


def client(tmp_path, live, verify, **kw):
    cfg = DeviceConfig(server=live.url, base_model_id=kw.pop("base", "tiny-llama"), trusted_key=verify, **kw)
    return DeviceClient(tmp_path / "device", cfg, device_id="d-1")


def test_crash_mid_download_leaves_the_old_adapter_active(tmp_path, registry, keys, runs, live, monkeypatch):
    key, verify = keys
    v1, v2 = two_versions(registry, key, runs)
    dev = client(tmp_path, live, verify)
    assert dev.pull().active == 1
    registry.promote(v2.version, keys=key)

    real = DeviceClient._download
    calls = []

    def dying(self, sha256, dest, size):
        calls.append(sha256)
        if len(calls) == 1:  # v2 shares all but its weights with v1: one download
            dest.write_bytes(b"half a file")
            raise Crash()
        return real(self, sha256, dest, size)

    monkeypatch.setattr(DeviceClient, "_download", dying)
    with pytest.raises(Crash):
        dev.pull()
    assert dev.state.pointer().active == 1 and dev.active()[1].version == 1
    assert not dev.state.version_dir(2).exists()

    # a crash after the version directory is complete but before the pointer switch: still v1
    monkeypatch.setattr(DeviceClient, "_download", real)
    monkeypatch.setattr(DeviceState, "write_pointer", lambda self, p: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        dev.pull()
    assert dev.state.pointer().active == 1 and dev.active()[1].version == 1
    monkeypatch.undo()
    r = dev.pull()  # the next pull finishes the job (re-using the verified version directory)
    assert (r.status, r.active, r.previous, r.downloaded_bytes) == ("updated", 2, 1, 0)


def test_wrong_base_model_or_key_is_refused_before_any_download(tmp_path, registry, keys, runs, live):
    from fedtune.registry.signing import generate_keypair, load_verify_key

    key, verify = keys
    two_versions(registry, key, runs)
    with pytest.raises(ManifestError, match="trained on base weights"):
        client(tmp_path, live, verify, base_model_sha256="0" * 64).pull()
    generate_keypair(tmp_path / "other.key")
    with pytest.raises(SignatureError, match="0 valid signature"):  # root v1 is not signed by the key it trusts
        client(tmp_path, live, load_verify_key(tmp_path / "other.pub")).pull()
    assert not DeviceState(tmp_path / "device").installed()
    assert client(tmp_path, live, verify, base="another-model").pull().status == "none"


def test_local_corruption_is_caught_on_use_and_on_rollback(tmp_path, registry, keys, runs, live):
    key, verify = keys
    v1, v2 = two_versions(registry, key, runs)
    dev = client(tmp_path, live, verify)
    dev.pull()
    registry.promote(v2.version, keys=key)
    dev.pull()
    weights = dev.state.version_dir(1) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(IntegrityError, match="the file was altered"):
        dev.rollback()
    assert dev.active()[1].version == 2  # refused rollback changed nothing
    (dev.state.version_dir(2) / "adapter_config.json").unlink()
    with pytest.raises(IntegrityError, match="missing"):
        dev.active()


def test_rollback_needs_a_previous_version_and_device_id_persists(tmp_path, registry, keys, runs, live):
    key, verify = keys
    two_versions(registry, key, runs)
    dev = client(tmp_path, live, verify)
    with pytest.raises(NotFoundError, match="nothing to roll back"):
        dev.rollback()
    with pytest.raises(NotFoundError, match="device pull"):
        dev.active()
    assert DeviceState(tmp_path / "device").device_id() == "d-1"
    fresh = DeviceState(tmp_path / "other").device_id()
    assert len(fresh) == 32 and DeviceState(tmp_path / "other").device_id() == fresh


def test_only_active_and_previous_are_kept(tmp_path, registry, keys, runs, live):
    key, verify = keys
    v1, v2 = two_versions(registry, key, runs)
    v3 = publish_run(runs[0], registry, key, round=2).manifest
    dev = client(tmp_path, live, verify)
    for v in (v1, v2, v3):
        registry.promote(v.version, keys=key)
        assert dev.pull().active == v.version
    assert dev.state.installed() == [2, 3]


def test_concurrent_pulls_on_one_state_dir_are_serialized(tmp_path, registry, keys, runs, live, monkeypatch):
    import threading

    key, verify = keys
    v1, v2 = two_versions(registry, key, runs)
    registry.promote(v2.version, keys=key)
    inside, release = threading.Event(), threading.Event()
    real = DeviceClient._download

    def slow(self, sha256, dest, size):
        if threading.current_thread().name == "first":
            inside.set()
            assert release.wait(20)
        return real(self, sha256, dest, size)

    monkeypatch.setattr(DeviceClient, "_download", slow)
    results, errors = {}, []

    def run(name):
        try:
            with client(tmp_path, live, verify) as dev:
                results[name] = dev.pull()
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    first = threading.Thread(target=run, args=("first",), name="first")
    first.start()
    assert inside.wait(20)  # the first pull is mid-download, holding the lock
    second = threading.Thread(target=run, args=("second",), name="second")
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive()  # waits for the lock instead of sweeping the first pull's staging
    release.set()
    first.join(20)
    second.join(20)
    assert not errors, errors
    assert results["first"].status == "updated" and results["second"].status == "unchanged"
    with client(tmp_path, live, verify) as dev:
        assert dev.active()[1].version == 2 and dev.pull().status == "unchanged"


def test_a_corrupted_active_adapter_is_repaired_by_the_next_pull(tmp_path, registry, keys, runs, live):
    key, verify = keys
    v1, _ = two_versions(registry, key, runs)
    dev = client(tmp_path, live, verify)
    assert dev.pull().active == 1
    weights = dev.state.version_dir(1) / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(IntegrityError):
        dev.active()
    r = dev.pull()  # the server would answer 304: the device must not believe "unchanged"
    assert (r.status, r.active) == ("repaired", 1)
    assert r.downloaded_bytes == v1.file("adapter_model.safetensors").size  # only the damaged file travels
    assert weights.read_bytes() == good and dev.active()[1].version == 1
    assert dev.pull().status == "unchanged"
    (dev.state.version_dir(1) / "adapter_config.json").unlink()  # a missing file is repaired too
    assert dev.pull(force=True).status == "repaired" and dev.active()[1].version == 1
