"""Shamir sharing, the ring quantizer and the crypto wrappers of the secure-aggregation package."""

import itertools
import secrets

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag

from fedtune.privacy.secagg import FieldQuantizer, crypto, shamir
from tests.unit.privacy.stats import ALPHA


def test_any_t_of_k_shares_reconstruct_and_fewer_do_not():
    secret = secrets.token_bytes(32)
    shares = shamir.split(secret, threshold=3, num_shares=5)
    for subset in itertools.combinations(shares, 3):
        assert shamir.combine(list(subset), 3) == secret
    back = [shamir.Share.from_bytes(s.to_bytes()) for s in shares]
    assert shamir.combine(back[1:4], 3) == secret
    with pytest.raises(ValueError, match="needs 3 shares, got 2"):
        shamir.combine(shares[:2], 3)
    # two shares interpolated as if the threshold were 2 land anywhere in the 521-bit field (not on a 32-byte value)
    with pytest.raises(ValueError, match="inconsistent shares"):
        shamir.combine(shares[:2], 2)


def test_shares_of_a_leading_zero_secret_keep_its_length():
    secret = bytes(5) + secrets.token_bytes(27)
    assert shamir.combine(shamir.split(secret, 2, 3)[1:], 2) == secret


def test_share_arguments_are_checked():
    with pytest.raises(ValueError, match="threshold must lie in 1..3"):
        shamir.split(b"x" * 32, 4, 3)
    with pytest.raises(ValueError, match="1..64 bytes"):
        shamir.split(b"x" * 65, 2, 3)


def test_agreement_is_symmetric_and_bound_to_purpose_and_context():
    a, b = crypto.new_private_key(), crypto.new_private_key()
    k_ab = crypto.agree(a, crypto.public_bytes(b), b"mask", b"run/1")
    assert k_ab == crypto.agree(b, crypto.public_bytes(a), b"mask", b"run/1")
    assert k_ab != crypto.agree(a, crypto.public_bytes(b), b"share", b"run/1")
    assert k_ab != crypto.agree(a, crypto.public_bytes(b), b"mask", b"run/2")


def test_sealed_shares_are_authenticated_with_their_route():
    key = secrets.token_bytes(32)
    sealed = crypto.seal(key, b"share", b"route-1-2")
    assert crypto.open_sealed(key, sealed, b"route-1-2") == b"share"
    with pytest.raises(InvalidTag):
        crypto.open_sealed(key, sealed, b"route-1-3")  # re-addressed by the relay
    with pytest.raises(InvalidTag):
        crypto.open_sealed(key, sealed[:-1] + bytes([sealed[-1] ^ 1]), b"route-1-2")


def test_prg_is_deterministic_per_seed_and_uniform():
    from scipy import stats

    seed = secrets.token_bytes(32)
    a = crypto.prg(seed, 200_000, np.uint16)
    assert np.array_equal(a, crypto.prg(seed, 200_000, np.uint16)) and a.dtype == np.uint16
    assert not np.array_equal(a, crypto.prg(secrets.token_bytes(32), 200_000, np.uint16))
    counts = np.bincount(a >> 8, minlength=256)  # top byte: 256 equiprobable cells
    assert stats.chisquare(counts).pvalue > ALPHA


@pytest.mark.parametrize("bits,n,ring", [(8, 2, 16), (8, 258, 16), (8, 259, 32), (16, 100, 32), (32, 100, 64)])
def test_the_ring_is_the_smallest_that_holds_the_sum(bits, n, ring):
    assert FieldQuantizer(1.0, bits, n).ring_bits == ring


def test_quantized_sums_read_back_within_the_rounding_bound_and_unbiased():
    q = FieldQuantizer(clip_range=0.5, bits=8, max_summands=50)
    rng = np.random.default_rng(0)
    xs = rng.uniform(-0.5, 0.5, size=(50, 4000))
    total = np.zeros(4000, dtype=q.dtype)
    for x in xs:
        total += q.quantize(x, rng)
    err = q.dequantize_sum(total) - xs.sum(0)
    assert np.abs(err).max() <= q.max_error(50)
    # stochastic rounding is unbiased: the error's mean over 4000 coordinates is ~0 (its sd is ~1.3e-3 / 63)
    assert abs(err.mean()) < 6 * np.sqrt(50) * (1 / q.scale) / 2 / np.sqrt(4000)
    negative = q.dequantize_sum(q.quantize(np.array([-0.5, -0.25, 0.0, 0.7]), rng))
    assert negative[0] == -0.5 and negative[2] == 0.0 and negative[3] == 0.5  # clipped to the range
    with pytest.raises(ValueError, match="non-finite"):
        q.quantize(np.array([np.nan]), rng)
    with pytest.raises(ValueError, match="overflow a 64-bit ring"):
        FieldQuantizer(1.0, 32, 2**40)
