"""Held-out evaluation: the mean loss and the per-token losses behind it agree, token for token."""

import pytest
import torch

from fedtune.adapters import create_adapter
from fedtune.data import build_client_data
from fedtune.models import load_base_model
from fedtune.models.tokenizer import ByteEncoder
from fedtune.training import evaluate_chunks, token_losses
from tests.conftest import make_config


def test_token_losses_are_the_per_token_terms_of_the_mean_loss():
    cfg = make_config()
    base, _ = load_base_model(cfg.model)
    model = create_adapter(base, cfg.adapter, seed=0)
    chunks = build_client_data(cfg.data, ByteEncoder(), seed=0)[0].train[:5]
    model.train()
    losses = token_losses(model, chunks, batch_size=2)  # batches of 2, 2 and 1 chunk
    assert losses.shape == (chunks.shape[0] * (chunks.shape[1] - 1),) and losses.dtype == torch.float64
    assert losses.mean().item() == pytest.approx(evaluate_chunks(model, chunks, 3).loss, rel=1e-6)
    # in order: the first chunk's terms are that chunk's own mean loss
    n = chunks.shape[1] - 1
    assert losses[:n].mean().item() == pytest.approx(evaluate_chunks(model, chunks[:1]).loss, rel=1e-6)
    assert model.training  # evaluation leaves the model's mode as it found it
    with pytest.raises(ValueError, match="no held-out chunks"):
        token_losses(model, chunks[:0])
