"""``seeded_initial``: the benchmark's start is the adapter the cached model was created with, not what a
previous run left on it (a second benchmark in one process, or the parent of parallel settings)."""

import torch

from fedtune.adapters import get_adapter_state, set_adapter_state
from fedtune.adapters.cached import seeded_initial
from fedtune.personalization.run_eval import load_model
from tests.conftest import make_config


def test_seeded_initial_survives_training_on_the_cached_model():
    cfg = make_config()
    model = load_model(cfg, "cpu")
    before, current = seeded_initial(model), get_adapter_state(model)
    set_adapter_state(model, {k: v + 1.0 for k, v in current.items()})  # what training leaves
    assert load_model(cfg, "cpu") is model  # the same cached model
    after = seeded_initial(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not all(torch.equal(after[k], v) for k, v in get_adapter_state(model).items())
    after[next(iter(after))] += 1  # a copy: the record stays as it was
    assert all(torch.equal(seeded_initial(model)[k], before[k]) for k in before)
    set_adapter_state(model, current)  # the cached model as other tests found it
