"""The CSPRNG streams a deployed party's DP mechanisms draw from (``fedtune.privacy.csprng``), tested by their
distribution, their independence and their freshness; the simulated streams stay torch's own draws."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from scipy import stats

from fedtune.federation.seeds import Seeds, task_streams
from fedtune.privacy.csprng import AesCtrStream, StreamRandom, TorchStream, as_stream
from fedtune.privacy.poisson_batches import StreamPoissonSampler
from tests.unit.privacy.stats import (
    ALPHA,
    binomial_count_pvalue,
    binomial_gof_pvalue,
    gaussian_shape_pvalue,
    gaussian_std_pvalue,
    mean_zero_pvalue,
)

N = 400_000


def _fresh() -> AesCtrStream:
    return AesCtrStream(os.urandom(32))


@pytest.mark.parametrize("std", [1.0, 0.37])
def test_gaussian_has_the_right_mean_std_shape_and_tails(std):
    x = _fresh().normal(std, N, "cpu", torch.float64).numpy()
    assert x.shape == (N,) and np.isfinite(x).all()
    assert gaussian_std_pvalue(x, std) > ALPHA, x.std()
    assert mean_zero_pvalue(x, std) > ALPHA, x.mean()
    assert gaussian_shape_pvalue(x, std) > ALPHA
    for k in (2.0, 3.0, 4.0):  # the tails hold the Gaussian's mass, both sides
        tail = 2 * stats.norm.sf(k)
        assert binomial_count_pvalue(int((np.abs(x) > k * std).sum()), N, tail) > ALPHA, k
    assert binomial_count_pvalue(int((x > 0).sum()), N, 0.5) > ALPHA
    # the two halves of Box-Muller (cos, sin) are uncorrelated, and so are consecutive draws
    assert abs(np.corrcoef(x[: N // 2], x[N // 2:])[0, 1]) < 6 / np.sqrt(N / 2)
    assert abs(np.corrcoef(x[:-1], x[1:])[0, 1]) < 6 / np.sqrt(N)


def test_gaussian_lands_on_the_requested_dtype_and_odd_sizes():
    s = _fresh()
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert s.normal(2.0, 7, "cpu", dtype).dtype == dtype
    assert s.normal(1.0, 1).shape == (1,) and s.normal(1.0, 0).shape == (0,)


def test_uniforms_are_in_the_open_interval_even_at_the_extreme_words(monkeypatch):
    u = _fresh().uniform(N).numpy()
    assert stats.kstest(u, "uniform").pvalue > ALPHA
    assert 0.0 < u.min() and u.max() < 1.0
    s = _fresh()  # the smallest and largest 53-bit chunks: no log(0), no 1.0
    monkeypatch.setattr(s, "words", lambda n: torch.tensor([0, -1] * (n // 2) + [0] * (n % 2), dtype=torch.int64))
    ext = s.uniform(2)
    assert ext[0].item() == 2.0 ** -54 and ext[1].item() == 1.0 - 2.0 ** -54
    z = s.normal(1.0, 2, "cpu", torch.float64)
    assert torch.isfinite(z).all() and z.abs().max().item() < 8.7  # sqrt(2 * 54 ln 2) = 8.65


def test_sampling_and_noise_streams_are_independent():
    sampling, noise = task_streams(Seeds.secret(), 3, 7)
    assert sampling.bytes(64) != noise.bytes(64)
    u = sampling.uniform(N).numpy()
    z = noise.normal(1.0, N, "cpu", torch.float64).numpy()
    assert abs(np.corrcoef(u, z)[0, 1]) < 6 / np.sqrt(N)
    assert abs(np.corrcoef(u < 0.1, np.abs(z) > 1.64)[0, 1]) < 6 / np.sqrt(N)  # batch choice vs big noise


def test_two_devices_and_two_rounds_never_draw_the_same_stream():
    a, b = Seeds.secret(), Seeds.secret()  # two devices (or one device in two rounds: a fresh Seeds each round)
    streams = [a.stream("task.noise", 1, 0), b.stream("task.noise", 1, 0), a.stream("task.noise", 2, 0),
               a.stream("task.noise", 1, 1), a.stream("task.sampling", 1, 0)]
    heads = [s.bytes(32) for s in streams]
    assert len(set(heads)) == len(heads)
    assert a.stream("task.noise", 1, 0).bytes(32) == heads[0]  # one secret Seeds object: a named stream is fixed
    assert AesCtrStream(bytes(32)).bytes(32) not in heads  # no stream runs under an all-zero key


def test_simulated_streams_are_torchs_own_draws_and_named_so():
    s = Seeds.simulated(4).stream("task.noise", 1, 0)
    assert isinstance(s, TorchStream) and "reproducible" in s.name
    ref = torch.normal(0.0, 0.5, size=(100,), generator=Seeds.simulated(4).generator("task.noise", 1, 0))
    assert torch.equal(s.normal(0.5, 100, "cpu", torch.float32), ref)
    assert isinstance(Seeds.secret().stream("x"), AesCtrStream) and "AES-256-CTR" in AesCtrStream.name
    with pytest.raises(TypeError, match="RandomStream or a torch.Generator"):
        as_stream(3)
    with pytest.raises(ValueError, match="32-byte secret key"):
        AesCtrStream(b"short")


def test_poisson_sampler_over_a_csprng_follows_binomial_n_q():
    n, q, draws = 40, 0.1, 3000
    sampler = StreamPoissonSampler(n, q, _fresh(), steps=draws)
    sizes = [len(b) for b in sampler]
    assert len(sizes) == draws and len(StreamPoissonSampler(n, q, _fresh())) == 10
    assert binomial_gof_pvalue(sizes, n, q) > ALPHA, np.bincount(sizes)
    assert binomial_count_pvalue(sizes.count(0), draws, (1 - q) ** n) > ALPHA
    members = np.bincount([i for b in StreamPoissonSampler(n, q, _fresh(), steps=draws) for i in b], minlength=n)
    assert stats.chisquare(members).pvalue > ALPHA  # every index equally likely


def test_secret_cohorts_draw_from_the_csprng_with_the_right_law():
    from fedtune.privacy.cohort import poisson_cohort

    rng = Seeds.secret().rng("cohort", 1)
    assert isinstance(rng, StreamRandom) and "AES-256-CTR" in rng.name
    sizes = [len(poisson_cohort(200, 0.05, rng=rng)) for _ in range(2000)]
    assert binomial_gof_pvalue(sizes, 200, 0.05) > ALPHA
    assert sorted(rng.sample(range(10), 10)) == list(range(10))
    bits = [rng.getrandbits(1) for _ in range(4000)]
    assert binomial_count_pvalue(sum(bits), 4000, 0.5) > ALPHA
    a, b = Seeds.secret(), Seeds.secret()
    assert [a.rng("cohort", 1).random() for _ in range(3)] != [b.rng("cohort", 1).random() for _ in range(3)]
    with pytest.raises(NotImplementedError):
        rng.getstate()
