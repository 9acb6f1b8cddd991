"""Goodness-of-fit checks for privacy mechanisms: a mechanism is tested by its distribution.

Each check returns a p-value under the null "the mechanism is what it claims"; tests assert p > ALPHA.
ALPHA = 1e-9 makes a false failure astronomically unlikely for any seed, yet every sample size used in
these tests gives a halved noise std or fixed-size batches a p-value far below 1e-100.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

ALPHA = 1e-9


def gaussian_std_pvalue(x, std: float) -> float:
    """Two-sided chi-square test that the i.i.d. ``x`` are N(0, std^2): sum x^2 / std^2 ~ chi2(n)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    if std <= 0:
        raise ValueError(f"the null's std must be > 0, got {std}")
    stat = float(np.sum(x * x)) / std**2
    return float(2 * min(stats.chi2.cdf(stat, x.size), stats.chi2.sf(stat, x.size)))


def gaussian_shape_pvalue(x, std: float) -> float:
    """Kolmogorov-Smirnov test of ``x`` against N(0, std^2) (catches a non-Gaussian noise of the right std)."""
    return float(stats.kstest(np.asarray(x, dtype=np.float64).ravel(), "norm", args=(0.0, std)).pvalue)


def binomial_gof_pvalue(sizes, n: int, q: float) -> float:
    """Chi-square goodness of fit of observed counts ``sizes`` to Binomial(n, q).

    Bins with expected count < 5 are pooled into their neighbour (tails pooled inward).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    draws = sizes.size
    counts = np.bincount(sizes, minlength=n + 1)[: n + 1].astype(np.float64)
    if sizes.max(initial=0) > n:
        return 0.0  # a batch larger than the population cannot come from Binomial(n, q)
    expected = draws * stats.binom.pmf(np.arange(n + 1), n, q)
    obs_bins, exp_bins, o, e = [], [], 0.0, 0.0
    for c, m in zip(counts, expected):
        o, e = o + c, e + m
        if e >= 5:
            obs_bins.append(o), exp_bins.append(e)
            o, e = 0.0, 0.0
    if e > 0 or o > 0:  # leftover upper tail joins the last bin
        if not exp_bins:
            raise ValueError("too few draws for a chi-square test: expected counts never reach 5")
        obs_bins[-1] += o
        exp_bins[-1] += e
    obs, exp = np.array(obs_bins), np.array(exp_bins)
    if len(obs) < 2:
        raise ValueError(f"Binomial({n}, {q}) with {draws} draws gives one bin; draw more")
    stat = float(np.sum((obs - exp) ** 2 / exp))
    return float(stats.chi2.sf(stat, len(obs) - 1))


def binomial_count_pvalue(k: int, draws: int, p: float) -> float:
    """Two-sided exact binomial test that ``k`` successes in ``draws`` have rate ``p``."""
    return float(stats.binomtest(int(k), int(draws), p).pvalue)


def mean_zero_pvalue(x, std: float) -> float:
    """Two-sided z-test that i.i.d. ``x`` with known ``std`` have mean 0."""
    x = np.asarray(x, dtype=np.float64).ravel()
    z = float(x.mean()) / (std / math.sqrt(x.size))
    return float(2 * stats.norm.sf(abs(z)))
