"""A tiny LoRA adapter on every linear of the tiny Llama, with weights large enough to matter."""

import pytest
import torch

from tests.conftest import make_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_lora(directory, cfg, seed=0, std=0.1):
    from fedtune.adapters import create_adapter, get_adapter_state, set_adapter_state
    from fedtune.models import load_base_model
    from fedtune.recording import save_adapter
    from fedtune.types import RoundResult

    base, _ = load_base_model(cfg.model)
    model = create_adapter(base, cfg.adapter, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=gen) * std for k, v in get_adapter_state(model).items()}
    set_adapter_state(model, state)
    result = RoundResult(round=1, clients_sampled=1, clients_succeeded=1, train_loss=1.0, eval_loss=1.0,
                         eval_perplexity=2.7, upload_bytes=0, wall_seconds=0.0)
    return save_adapter(model, directory, result, cfg, {"level": "none", "epsilon": None, "delta": None})


@pytest.fixture(scope="session")
def lora_cfg():
    return make_config(adapter={"rank": 4, "alpha": 8, "target_modules": TARGETS})


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory, lora_cfg):
    return save_lora(tmp_path_factory.mktemp("lora") / "round-1", lora_cfg)


@pytest.fixture(scope="session")
def reference(lora_dir):
    """(base + adapter through peft, held-out input [3, 21]) — shapes unlike the export's example."""
    from fedtune.export.source import load_with_adapter

    model, _ = load_with_adapter(lora_dir)
    x = torch.randint(0, 256, (3, 21), generator=torch.Generator().manual_seed(11))
    return model, x
