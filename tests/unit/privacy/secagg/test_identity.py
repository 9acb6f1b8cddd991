"""Signed key adverts (the malicious-server variant): a server that substitutes, strips or replays a key advert
makes every affected device abort before it seals a share; an honest round gives the same sum as before."""

import dataclasses
import os
import stat

import numpy as np
import pytest

from fedtune.privacy.secagg import (
    AdvertAuth,
    DeviceIdentity,
    IdentityRegistry,
    KeyAdvert,
    SecAggAbort,
    SecAggServer,
    make_setup,
    run_secure_aggregation,
)
from fedtune.privacy.secagg import crypto, driver

P, CLIP = 200, 0.5
IDS = [11, 23, 35, 47, 59, 61]


def _round(monkeypatch=None, server=None, auth=None, context=b"run/3"):
    if server is not None:
        monkeypatch.setattr(driver, "SecAggServer", server)
    rng = np.random.default_rng(0)
    ups = {c: rng.uniform(-0.1, 0.1, P) for c in IDS}
    setup = make_setup(IDS, P, CLIP, num_neighbours=4, context=context)
    return run_secure_aggregation(setup, ups, rng=np.random.default_rng(1), auth=auth)


def _evil(tamper):
    """A server that relays client 23's advert to client 11 altered by ``tamper``."""

    class Evil(SecAggServer):
        def collect_adverts(self, adverts):
            peers = super().collect_adverts(adverts)
            peers[11][23] = tamper(peers[11][23])
            return peers

    return Evil


def _own_key(advert):  # the server's own X25519 key in place of the neighbour's mask key
    return dataclasses.replace(advert, mask_public=crypto.public_bytes(crypto.new_private_key()))


def test_honest_signed_round_gives_the_same_sum():
    plain = _round()
    signed = _round(auth=AdvertAuth.generate(IDS))
    assert np.array_equal(plain.total, signed.total) and signed.survivors == tuple(IDS)


def test_a_server_that_swaps_one_adverts_key_is_detected(monkeypatch):
    with pytest.raises(SecAggAbort, match="client 11 rejects the key advert relayed for client 23: its signature "
                                          "does not verify"):
        _round(monkeypatch, _evil(_own_key), AdvertAuth.generate(IDS))
    out = _round(monkeypatch, _evil(_own_key))  # without signatures the swap goes through unnoticed
    assert out.survivors  # the round "succeeded" with a key the server holds


@pytest.mark.parametrize("tamper, reason", [
    (lambda a: KeyAdvert(a.cid, a.enc_public, a.mask_public), "carries no signature"),
    (lambda a: dataclasses.replace(a, enc_public=crypto.public_bytes(crypto.new_private_key())), "does not verify"),
    (lambda a: dataclasses.replace(a, cid=35), "claims to be client 35's"),
])
def test_stripped_or_relabelled_adverts_are_rejected(monkeypatch, tamper, reason):
    with pytest.raises(SecAggAbort, match=reason):
        _round(monkeypatch, _evil(tamper), AdvertAuth.generate(IDS))


def test_an_advert_from_another_round_or_an_unregistered_key_is_rejected():
    auth = AdvertAuth.generate(IDS)
    old = auth.identities[23].sign(KeyAdvert(23, b"e" * 32, b"m" * 32), b"run/2")
    with pytest.raises(SecAggAbort, match="replayed"):
        auth.registry.verify(old, b"run/3", sender=23, verifier=11)
    auth.registry.verify(old, b"run/2", sender=23, verifier=11)  # in its own round it verifies
    stranger = AdvertAuth(auth.identities, IdentityRegistry({c: k for c, k in auth.registry.keys.items() if c != 23}))
    with pytest.raises(SecAggAbort, match="no registered identity key"):
        stranger.registry.verify(old, b"run/2", sender=23, verifier=11)


def test_identity_keys_are_saved_privately_and_registered(tmp_path):
    from fedtune.deploy.certs import CertPaths, make_device_identity

    private, public = make_device_identity(tmp_path, "device-1")
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert CertPaths(tmp_path).supernode_public_keys() == []  # never mistaken for a node-auth key
    identity = DeviceIdentity.load(private)
    assert identity.public_bytes().hex() == public.read_text().strip()
    registry = IdentityRegistry({7: bytes.fromhex(public.read_text().strip())})
    registry.save(tmp_path / "registry.json")
    loaded = IdentityRegistry.load(tmp_path / "registry.json")
    loaded.verify(identity.sign(KeyAdvert(7, b"e" * 32, b"m" * 32), b"c"), b"c", sender=7, verifier=1)
    with pytest.raises(ValueError, match="32-byte ed25519"):
        IdentityRegistry({1: b"short"})
    with pytest.raises(ValueError, match="plain file name"):
        make_device_identity(tmp_path, "../x")
