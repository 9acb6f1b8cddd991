"""ed25519 manifests: sign, verify, refuse any change or another key."""

import os
import stat

import pytest

from fedtune.registry import SignatureError, generate_keypair, load_signing_key, load_verify_key
from fedtune.registry.manifest import (AdapterInfo, BaseModelRef, FileEntry, Manifest, PrivacyGuarantee,
                                       Provenance, SignedManifest)
from fedtune.registry.signing import sign_manifest, verify_manifest


def manifest(**changes):
    raw = dict(name="m", version=1, base_model=BaseModelRef(id="b", sha256="a" * 64),
               adapter=AdapterInfo(method="lora", rank=4, alpha=8.0, target_modules=["q_proj"]),
               source=Provenance(run="r", round=3), metrics={"eval_loss": 1.0},
               privacy=PrivacyGuarantee(level="sample", epsilon=2.0, delta=1e-5), created_at="2026-01-01T00:00:00+00:00",
               files=[FileEntry(path="adapter_model.safetensors", sha256="b" * 64, size=10)])
    raw.update(changes)
    return Manifest(**raw)


def test_keygen_files_and_roundtrip(tmp_path):
    key = generate_keypair(tmp_path / "k" / "signing.key")
    assert stat.S_IMODE(os.stat(tmp_path / "k" / "signing.key").st_mode) == 0o600
    assert load_signing_key(tmp_path / "k" / "signing.key").key_id == key.key_id
    verify = load_verify_key(tmp_path / "k" / "signing.pub")
    signed = sign_manifest(manifest(), key)
    assert verify_manifest(SignedManifest.from_bytes(signed.to_bytes()), verify) == manifest()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        generate_keypair(tmp_path / "k" / "signing.key")


@pytest.mark.parametrize("change", [
    {"privacy": PrivacyGuarantee(level="sample", epsilon=0.5, delta=1e-5)},
    {"files": [FileEntry(path="adapter_model.safetensors", sha256="c" * 64, size=10)]},
    {"version": 2},
    {"metrics": {"eval_loss": 0.5}},
])
def test_any_change_breaks_the_signature(tmp_path, change):
    key = generate_keypair(tmp_path / "signing.key")
    signed = sign_manifest(manifest(), key)
    forged = SignedManifest(manifest=manifest(**change), key_id=signed.key_id, signature=signed.signature)
    with pytest.raises(SignatureError, match="signature does not match its contents"):
        verify_manifest(forged, load_verify_key(tmp_path / "signing.pub"))


def test_another_key_is_named_as_such(tmp_path):
    mine = generate_keypair(tmp_path / "a.key")
    theirs = generate_keypair(tmp_path / "b.key")
    signed = sign_manifest(manifest(), theirs)
    with pytest.raises(SignatureError, match=f"signed by key {theirs.key_id}.*trusts key {mine.key_id}"):
        verify_manifest(signed, load_verify_key(tmp_path / "a.pub"))


def test_bad_key_files_say_what_to_do(tmp_path):
    (tmp_path / "x.pem").write_text("nope")
    with pytest.raises(SignatureError, match="registry keygen"):
        load_signing_key(tmp_path / "x.pem")
    with pytest.raises(SignatureError, match="PEM public key"):
        load_verify_key(tmp_path / "x.pem")


def test_unsafe_paths_and_garbage_are_refused():
    from fedtune.registry import ManifestError
    from fedtune.registry.manifest import safe_relpath

    for bad in ("../x", "/etc/passwd", "a/../../b", ""):
        with pytest.raises(ManifestError, match="unsafe file path"):
            safe_relpath(bad)
    with pytest.raises(ManifestError, match="not a signed fedtune manifest"):
        SignedManifest.from_bytes(b"{}")
