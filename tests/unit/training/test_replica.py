"""A frozen-sharing copy: the base is the same storage, the adapter is the copy's own."""

import torch

from fedtune.adapters import create_adapter, get_adapter_state
from fedtune.models import load_base_model
from fedtune.training.replica import frozen_sharing_copy, shares_frozen_base
from tests.conftest import make_config


def _model():
    cfg = make_config()
    return create_adapter(load_base_model(cfg.model)[0], cfg.adapter, cfg.seed)


def test_copy_shares_every_frozen_tensor_and_owns_its_adapter():
    model = _model()
    copy = frozen_sharing_copy(model)
    assert shares_frozen_base(model, copy)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen  # the base is there, and shared
    mine = dict(copy.named_parameters())
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert mine[n].data_ptr() != p.data_ptr() and torch.equal(mine[n], p)
    with torch.no_grad():  # training the copy's adapter leaves the original's alone
        for p in copy.parameters():
            if p.requires_grad:
                p.add_(1.0)
    before = get_adapter_state(model)
    assert all(not torch.equal(before[k], v) for k, v in get_adapter_state(copy).items())


def test_a_plain_deepcopy_would_not_share():
    import copy as stdcopy

    model = _model()
    assert not shares_frozen_base(model, stdcopy.deepcopy(model))
