"""Fixtures: tiny LoRA adapters that visibly change the output, a reference decoder, a live server."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from tests.conftest import make_config
from tests.unit.registry.conftest import LiveServer

ADAPTERS = ("alice", "bob", "carol")


def make_adapter(directory: Path, seed: int, std: float = 0.4, epsilon: float = 3.0) -> Path:
    """A PEFT LoRA directory + fedtune.json (as a run writes it) with random weights large enough to matter."""
    from fedtune.adapters import create_adapter, get_adapter_state, set_adapter_state
    from fedtune.models import load_base_model
    from fedtune.recording import save_adapter
    from fedtune.types import RoundResult

    cfg = make_config(privacy={"enabled": True, "noise_multiplier": 1.0})
    base, _ = load_base_model(cfg.model)
    model = create_adapter(base, cfg.adapter, seed=0)
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=gen) * std for k, v in get_adapter_state(model).items()}
    set_adapter_state(model, state)
    result = RoundResult(round=seed, clients_sampled=3, clients_succeeded=3, train_loss=2.0, eval_loss=1.5,
                         eval_perplexity=4.5, upload_bytes=100, wall_seconds=1.0, epsilon=epsilon, delta=1e-5)
    return save_adapter(model, directory, result, cfg,
                        {"level": "sample", "epsilon": epsilon, "delta": 1e-5, "rounds": 1,
                         "mechanism": "DP-SGD (opacus, Poisson sampling), per device", "accountant": "rdp"})


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    for i, name in enumerate(ADAPTERS, start=1):
        make_adapter(root / name, seed=i)
    return root


def reference_greedy(adapter_dir: Path | None, prompt: list[int], max_new_tokens: int) -> list[int]:
    """PyTorch + peft's own ``generate`` on a fresh base: the ground truth the server must match."""
    from peft import PeftModel

    from fedtune.models import load_base_model

    model, _ = load_base_model(make_config().model)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                             dtype=torch.long), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=257,
                             pad_token_id=258)
    return out[0, len(prompt):].tolist()


@contextlib.contextmanager
def running(options):
    """build_server + uvicorn on loopback; yields (url, server); stops both."""
    from fedtune.serve.server import build_server

    server = build_server(options)
    try:
        with LiveServer(server.app) as live:
            yield live.url, server
    finally:
        server.close()


def openai_client(url: str):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="not-needed", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local_server(adapter_root):
    from fedtune.serve.server import ServeOptions

    with running(ServeOptions(model=make_config().model, adapters=(adapter_root,), max_loaded=2)) as (url, server):
        yield url, server
