"""Ghost clipping on a tiny peft LoRA model, against autograd per-sample gradients (one backward per sample).

Batch with right padding (attention mask, labels -100): the per-sample norms over every LoRA factor and the
clipped sum must equal those of the explicit per-sample gradients, in both norm forms.
"""

import pytest
import torch

from fedtune.adapters import create_adapter
from fedtune.models import load_base_model
from fedtune.privacy.ghost import GhostClipper
from tests.conftest import make_config

CLIP = 0.05


@pytest.fixture(scope="module")
def lora():
    cfg = make_config(adapter={"target_modules": ["q_proj", "v_proj", "o_proj"], "rank": 4})
    base, _ = load_base_model(cfg.model)
    model = create_adapter(base, cfg.adapter, seed=0).double()
    gen = torch.Generator().manual_seed(1)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:  # B is zero at init: make every factor's gradient nonzero
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
    x = torch.randint(0, 256, (4, 12), generator=gen)
    mask = torch.ones_like(x)
    mask[1, 7:] = 0  # right padding
    mask[3, 3:] = 0
    labels = x.masked_fill(mask == 0, -100)
    return model, params, x, mask, labels


def _reference(model, params, x, mask, labels):
    """Per-sample gradients of B * (the batch's mean loss), one sample at a time: opacus' 'mean' convention."""
    n_tokens = (labels[:, 1:] != -100).sum()
    grads = []
    for i in range(x.shape[0]):
        logits = model(input_ids=x[i:i + 1], attention_mask=mask[i:i + 1]).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[i:i + 1, 1:].reshape(-1),
                                                ignore_index=-100, reduction="sum")
        grads.append(torch.autograd.grad(nll * x.shape[0] / n_tokens, params))
    return grads  # [B] x [P] tensors


@pytest.mark.parametrize("mode", ["gram", "direct", "per_sample", "auto"])
def test_norms_and_clipped_sum_equal_autograd_per_sample_gradients(lora, mode):
    model, params, x, mask, labels = lora
    ref = _reference(model, params, x, mask, labels)
    ref_norms = torch.stack([torch.cat([g.flatten() for g in gi]).norm() for gi in ref])  # [B]
    clipper = GhostClipper(model, params, mode=mode)
    try:
        model(input_ids=x, attention_mask=mask, labels=labels).loss.backward()
        sums = clipper.clipped_sums(CLIP)
    finally:
        clipper.close()
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(clipper.last_norms, ref_norms, rtol=1e-5, atol=0)
    clip = (CLIP / (ref_norms + 1e-6)).clamp(max=1.0)
    assert (clip < 1).all()  # the clip binds, so a wrong factor would show
    for j, s in enumerate(sums):
        expected = sum(c * gi[j] for c, gi in zip(clip, ref))
        torch.testing.assert_close(s, expected, rtol=1e-5, atol=1e-12)


def test_no_records_is_a_zero_sum_and_eval_records_nothing(lora):
    model, params, x, mask, _ = lora
    clipper = GhostClipper(model, params)
    try:
        with torch.no_grad():
            model(input_ids=x, attention_mask=mask)
        assert all((s == 0).all() for s in clipper.clipped_sums(CLIP)) and clipper.last_norms is None
    finally:
        clipper.close()


def test_trainable_tensors_that_are_not_lora_factors_are_refused(lora):
    model, params, *_ = lora
    head = model.get_output_embeddings().weight
    with pytest.raises(ValueError, match="not LoRA linear weights.*lm_head.*clipping=hooks"):
        GhostClipper(model, params + [head])
