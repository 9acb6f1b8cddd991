"""Registry semantics: publish (signed, content-addressed), channels, promote and rollback, publish_run."""

import json

import pytest

from fedtune.registry import NotFoundError, RegistryError, publish_run, verify_manifest
from fedtune.registry.manifest import sha256_file
from fedtune.registry.publish import base_model_ref
from fedtune.registry.registry import Registry
from fedtune.registry.store import BlobStore, DirectoryBlobStore
from tests.conftest import make_config


def test_publish_run_records_everything_the_manifest_promises(registry, keys, runs):
    key, verify = keys
    signed = publish_run(runs[0], registry, key)  # latest round = 2
    m = verify_manifest(signed, verify)
    assert (m.version, m.name, m.source.run, m.source.round) == (1, "tiny-run", "tiny-run", 2)
    assert m.base_model == base_model_ref(make_config().model) and m.base_model.id == "tiny-llama"
    assert (m.adapter.method, m.adapter.rank, m.adapter.alpha) == ("lora", 4, 8.0)
    assert m.privacy.level == "sample" and m.privacy.epsilon == 5.0 and m.privacy.delta == 1e-5
    assert m.metrics == {}  # nothing computed on users' data is published unless allowed (issue 13)
    assert m.created_at.endswith("+00:00")
    adapter_dir = runs[0] / "adapters" / "round-2"
    assert {f.path for f in m.files} == {p.name for p in adapter_dir.iterdir()}
    for f in m.files:
        assert f.sha256 == sha256_file(adapter_dir / f.path) and registry.store.has(f.sha256)
    assert registry.get(1) == signed and registry.versions("tiny-llama") == [signed]


def test_identical_files_are_stored_once(registry, keys, runs):
    key, _ = keys
    a = publish_run(runs[0], registry, key, round=1).manifest
    b = publish_run(runs[0], registry, key, round=1).manifest
    assert a.version == 1 and b.version == 2 and [f.sha256 for f in a.files] == [f.sha256 for f in b.files]
    assert len(list(registry.store.digests())) == len(a.files)
    assert isinstance(registry.store, BlobStore)


def test_promote_stage_and_rollback(registry, keys, runs):
    key, _ = keys
    for r in (1, 2):
        publish_run(runs[0], registry, key, round=r)
    publish_run(runs[1], registry, key)
    s = registry.promote(1, keys=key)
    assert (s.current, s.candidate, s.history) == (1, None, ())
    s = registry.promote(2, rollout=10, keys=key)
    assert (s.current, s.candidate, s.rollout) == (1, 2, 10.0)
    s = registry.rollback("tiny-llama", keys=key)  # aborts the staged candidate
    assert (s.current, s.candidate) == (1, None)
    registry.promote(2, rollout=50, keys=key)
    s = registry.promote(2, rollout=100, keys=key)
    assert (s.current, s.candidate, s.history) == (2, None, (1,))
    s = registry.promote(3, keys=key)
    assert (s.current, s.history) == (3, (1, 2))
    assert registry.rollback("tiny-llama", keys=key).current == 2
    assert registry.rollback("tiny-llama", keys=key).current == 1
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback("tiny-llama", keys=key)
    with pytest.raises(RegistryError, match="already on stable for every device"):
        registry.promote(1, rollout=10, keys=key)
    with pytest.raises(NotFoundError, match=r"no version 9 .*versions: \[1, 2, 3\]"):
        registry.promote(9, keys=key)
    with pytest.raises(RegistryError, match="channel 'Bad Channel'"):
        registry.promote(1, channel="Bad Channel", keys=key)
    channels = {(c.base_model_id, c.channel): c.current for c in registry.channels()}
    assert channels == {("tiny-llama", "stable"): 1}
    assert [e.action for e in registry.events()][:3] == ["rollback", "rollback", "promote"]
    # channels are independent
    registry.promote(3, channel="beta", keys=key)
    assert registry.channel("tiny-llama", "beta").current == 3 and registry.channel("tiny-llama", "stable").current == 1


def test_registry_reopens_with_same_salt_and_data(tmp_path, keys, runs):
    key, _ = keys
    a = Registry(tmp_path / "r")
    publish_run(runs[0], a, key, round=1)
    b = Registry(tmp_path / "r", store=DirectoryBlobStore(tmp_path / "r" / "blobs"))
    assert b.rollout_salt == a.rollout_salt and [s.manifest.version for s in b.versions()] == [1]


def test_publish_refuses_what_is_not_an_adapter(tmp_path, registry, keys, runs):
    from fedtune.registry.publish import artifact_info

    key, _ = keys
    info = artifact_info(runs[0] / "adapters" / "round-1", "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="expected a PEFT adapter directory"):
        registry.publish(tmp_path / "empty", info, key)
    with pytest.raises(FileNotFoundError, match="no adapters/round-N"):
        publish_run(tmp_path / "empty", registry, key)
    with pytest.raises(FileNotFoundError, match="no adapter for round 7"):
        publish_run(runs[0], registry, key, round=7)


def test_store_rejects_path_like_ids_and_detects_corruption(tmp_path):
    from fedtune.registry import IntegrityError

    store = DirectoryBlobStore(tmp_path / "blobs")
    (tmp_path / "f").write_bytes(b"hello")
    d = store.put_file(tmp_path / "f")
    assert store.size(d) == 5 and store.has(d) and store.put_file(tmp_path / "f") == d
    with pytest.raises(NotFoundError, match="not a blob id"):
        store.open("../../etc/passwd")
    store.verify(d)
    p = store.local_path(d)
    p.chmod(0o644)
    p.write_bytes(b"jello")
    with pytest.raises(IntegrityError, match="storage corrupted"):
        store.verify(d)


def test_envelope_is_canonical_json(registry, keys, runs):
    key, _ = keys
    signed = publish_run(runs[0], registry, key, round=1)
    raw = registry.row(1).envelope
    assert raw == json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
    assert signed.to_bytes() == raw


def test_registry_imports_neither_flwr_nor_torch():
    import subprocess
    import sys

    code = ("import sys, fedtune.registry, fedtune.registry.service, fedtune.registry.device, fedtune.cli_registry; "
            "print(sorted(m for m in ('flwr', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_manifests_publish_only_allowed_metrics(registry, keys, runs):
    from fedtune.registry import ManifestError

    key, verify = keys
    m = publish_run(runs[0], registry, key, round=1, metrics=["eval_loss"]).manifest
    assert m.metrics == {"eval_loss": 2.5}  # not train_loss, clients, upload bytes...
    assert (m.privacy.epsilon, m.privacy.delta) == (2.5, 1e-5)  # the guarantee itself is always there
    with pytest.raises(ManifestError, match="--metric update_norm: .*expected some of .*eval_loss"):
        publish_run(runs[0], registry, key, round=1, metrics=["update_norm"])
