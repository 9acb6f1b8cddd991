"""The ghost-norm maths against the explicit per-sample gradients g_i^T a_i."""

import pytest
import torch

from fedtune.privacy.ghost.norms import (
    choose_mode,
    choose_storage,
    clip_factors,
    clipped_weight_grad,
    per_sample_sq_norms,
)


def _factors(b=5, t=7, d=6, p=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(b, t, d, generator=gen, dtype=torch.float64)
    g = torch.randn(b, t, p, generator=gen, dtype=torch.float64)
    g[0, 4:] = 0  # padding: masked tokens get no output gradient (their activations stay nonzero)
    g[2, 1:] = 0
    return a, g


@pytest.mark.parametrize("mode", ["gram", "direct", "auto"])
def test_norms_equal_explicit_per_sample_gradients(mode):
    a, g = _factors()
    explicit = torch.einsum("btp,btd->bpd", g, a)  # [B, p, d]
    torch.testing.assert_close(per_sample_sq_norms(a, g, mode), explicit.pow(2).sum((1, 2)), rtol=1e-12, atol=0)


def test_padded_tokens_contribute_nothing():
    a, g = _factors()
    trimmed = per_sample_sq_norms(a[:1, :4], g[:1, :4], "gram")  # sample 0 without its padding
    torch.testing.assert_close(per_sample_sq_norms(a, g, "gram")[:1], trimmed, rtol=1e-12, atol=0)


def test_clipped_sum_is_the_weighted_sum_of_per_sample_gradients():
    a, g = _factors()
    clip = clip_factors(per_sample_sq_norms(a, g), 1.5)
    assert (clip < 1).any()  # the clip binds for some samples
    explicit = torch.einsum("b,btp,btd->pd", clip, g, a)
    torch.testing.assert_close(clipped_weight_grad(a, g, clip), explicit, rtol=1e-12, atol=1e-14)


def test_norm_form_follows_li_et_al_and_storage_the_smaller_of_factors_and_gradient():
    assert choose_mode(128, 576, 8) == "direct"  # LoRA A of SmolLM2 at T = 128: d p = 4,608 < 2 T^2
    assert choose_mode(16, 576, 8) == "gram"  # short sequences: 2 T^2 = 512
    assert choose_storage(128, 576, 8) == "per_sample"  # LoRA, r < T: G_i (r d) is smaller than a_i, g_i (T (d + r))
    assert choose_storage(4, 576, 8) == "factors"  # very short sequences: the factors are smaller
    with pytest.raises(ValueError, match="batch-first"):
        per_sample_sq_norms(torch.zeros(3, 4), torch.zeros(3, 2))
