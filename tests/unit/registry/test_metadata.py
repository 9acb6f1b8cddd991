"""The root of trust: thresholds of release keys, root rotation signed by old and new keys, devices that
walk the root chain and then refuse what a dropped (e.g. stolen) key signs."""

from __future__ import annotations

import pytest

from fedtune.registry import RegistryError, SignatureError, load_anchor, publish_run
from fedtune.registry.device import DeviceClient, DeviceConfig
from fedtune.registry.metadata import ChannelMeta, expires_in, sign_document
from fedtune.registry.signing import generate_keypair, load_verify_key

BASE = "tiny-llama"


@pytest.fixture
def more_keys(tmp_path):
    """Keys B and C (private, public)."""
    out = []
    for name in ("b", "c"):
        k = generate_keypair(tmp_path / "more" / f"{name}.key")
        out.append((k, load_verify_key(tmp_path / "more" / f"{name}.pub")))
    return out


def device(tmp_path, live, anchor):
    return DeviceClient(tmp_path / "device", DeviceConfig(server=live.url, base_model_id=BASE, trusted_key=anchor),
                        device_id="d-9")


def test_rotation_needs_old_and_new_thresholds_and_devices_follow_it(tmp_path, registry, keys, more_keys, runs, live):
    a, a_pub = keys
    (b, b_pub), (c, c_pub) = more_keys
    publish_run(runs[0], registry, a, round=1)
    registry.promote(1, keys=a)
    dev = device(tmp_path, live, a_pub)  # provisioned with the first key only
    assert dev.pull().active == 1

    new = dict(root_keys=[b_pub, c_pub], root_threshold=2, release_keys=[b_pub], release_threshold=1)
    with pytest.raises(SignatureError, match=r"root v2 \(its own keys\): 1 valid signature"):
        registry.rotate_root([a, b], **new)  # the new root's threshold (2 of B, C) is not met
    with pytest.raises(SignatureError, match="0 valid signature.* root v1's 'root' keys"):
        registry.rotate_root([b, c], **new)  # the old root never agreed
    assert registry.root_meta().version == 1
    assert registry.rotate_root([a, b, c], **new).version == 2
    registry.refresh(BASE, keys=b)  # channel metadata re-signed by the new release key

    with pytest.raises(SignatureError, match="not a release key"):
        publish_run(runs[1], registry, a)  # the dropped key can no longer publish
    publish_run(runs[1], registry, b)
    registry.promote(2, keys=b)
    r = dev.pull()  # walks root v2, then trusts metadata and manifests signed by B
    assert (r.status, r.active, r.previous) == ("updated", 2, 1)
    assert dev.state.trusted_root(a_pub).version == 2
    assert dev.active()[1].version == 2 and dev.rollback().active == 1  # v1 (signed by A) still verifies

    # the dropped key A signs newer channel metadata (a thief with A and the server): refused
    meta = ChannelMeta(version=99, expires=expires_in(3600), base_model=BASE, channel="stable",
                       current=None, rollout=0, rollout_salt=registry.rollout_salt)
    with registry.db.transaction() as con:
        registry.db.insert_channel_meta(con, BASE, "stable", 99, sign_document(meta, [a]))
    with pytest.raises(SignatureError, match="0 valid signature.* root v2's 'release' keys"):
        dev.pull()
    assert dev.active()[1].version == 1


def test_a_release_threshold_of_two_keys(tmp_path, registry, keys, more_keys, runs, live):
    a, a_pub = keys
    (b, b_pub), (c, c_pub) = more_keys
    publish_run(runs[0], registry, a, round=1)
    registry.rotate_root([a], root_keys=[a_pub], root_threshold=1, release_keys=[a_pub, b_pub, c_pub],
                         release_threshold=2)
    with pytest.raises(SignatureError, match="1 valid signature.* 2 required"):
        registry.promote(1, keys=[a])
    assert registry.channel(BASE, "stable").current is None  # nothing half-promoted
    with pytest.raises(RegistryError, match="signed act"):
        registry.promote(1)
    registry.promote(1, keys=[a, c])
    root_file = tmp_path / "root.json"
    root_file.write_bytes(registry.root_envelope(1))  # devices may be provisioned with a root file instead
    anchor = load_anchor(root_file)
    assert anchor.version == 1
    assert device(tmp_path, live, anchor).pull().active == 1
