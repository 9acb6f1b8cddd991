"""train_local with privacy.clipping=ghost takes the steps the opacus hooks path takes: same Poisson batches,
same clipped sums, same flat noise stream, same accounting (a clip that binds, LoRA B nonzero from the start)."""

import pytest
import torch

from fedtune.adapters import create_adapter, get_adapter_state
from fedtune.data import build_client_data
from fedtune.models import load_base_model
from fedtune.models.tokenizer import ByteEncoder
from fedtune.privacy import PrivacyLedger
from fedtune.training import train_local
from fedtune.types import ClientTask
from tests.conftest import make_config


def _train(clipping: str, sigma: float, dropout: float = 0.0, checkpointing: bool = False, method: str = "lora",
           loss_chunk: int | None = None, physical: int | None = None):
    cfg = make_config(adapter={"target_modules": ["q_proj", "v_proj", "o_proj"], "dropout": dropout, "method": method},
                      privacy={"enabled": True, "noise_multiplier": sigma, "max_grad_norm": 0.02,
                               "clipping": clipping})
    base, _ = load_base_model(cfg.model)
    model = create_adapter(base, cfg.adapter, seed=0)
    gen = torch.Generator().manual_seed(4)
    start = {k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in get_adapter_state(model).items()}
    data = build_client_data(cfg.data, ByteEncoder(), seed=0)[0]
    ledger = PrivacyLedger("u")
    torch.manual_seed(0)  # dropout masks come from the global generator
    update = train_local(model, start, data, ClientTask(1, 6, 4, 0.01, seed=3, noise_seed=9), cfg.privacy, ledger,
                         gradient_checkpointing=checkpointing, loss_chunk_tokens=loss_chunk,
                         physical_batch_size=physical)
    assert not any(h for m in model.modules() for h in m._forward_hooks.values()  # hooks are gone
                   if getattr(h, "__self__", None) is not None and type(h.__self__).__name__ == "GhostClipper")
    return update, ledger


def _assert_same_update(a, b, rtol=1e-4):
    """Equal up to float32 summation order, per tensor in relative L2 (AdamW's 1/sqrt(v) lets rounding
    move near-zero coordinates more than elementwise tolerances allow; a wrong clip or noise moves every
    tensor by far more than 1e-4: see the sabotage table in docs/privacy.md)."""
    assert a.adapter.keys() == b.adapter.keys()
    for k in a.adapter:
        rel = float((b.adapter[k] - a.adapter[k]).norm() / a.adapter[k].norm())
        assert rel < rtol, (k, rel)


@pytest.mark.parametrize("sigma", [0.0, 0.7])
def test_ghost_steps_equal_the_hooks_steps(sigma):
    hooks, hooks_ledger = _train("hooks", sigma)
    ghost, ghost_ledger = _train("ghost", sigma)
    _assert_same_update(hooks, ghost)
    assert ghost_ledger.history == hooks_ledger.history and ghost_ledger.rounds == [1]
    assert ghost.epsilon == hooks.epsilon and ghost.metrics == hooks.metrics
    assert ghost.train_loss == pytest.approx(hooks.train_loss, rel=1e-5)


def test_ghost_with_lora_dropout_checkpointing_and_the_fused_loss_equals_hooks():
    """The hooks see lora_A's input after dropout, and the recompute of reentrant checkpointing."""
    hooks, _ = _train("hooks", 0.0, dropout=0.1, checkpointing=True, loss_chunk=40)
    ghost, _ = _train("ghost", 0.0, dropout=0.1, checkpointing=True, loss_chunk=40)
    _assert_same_update(hooks, ghost)


def test_ghost_on_ffa_lora_clips_only_b_and_equals_hooks():
    hooks, _ = _train("hooks", 0.5, method="ffa_lora")
    ghost, _ = _train("ghost", 0.5, method="ffa_lora")
    _assert_same_update(hooks, ghost)


def test_ghost_micro_batches_take_the_logical_batch_step_of_hooks():
    """train.physical_batch_size: each micro-batch clipped and summed, noise and the step once per logical batch."""
    hooks, hooks_ledger = _train("hooks", 0.6, physical=2)
    ghost, ghost_ledger = _train("ghost", 0.6, physical=2)
    whole, _ = _train("ghost", 0.6)
    _assert_same_update(hooks, ghost)
    _assert_same_update(whole, ghost)
    assert ghost_ledger.history == hooks_ledger.history
