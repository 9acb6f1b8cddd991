"""Fixtures: fake run directories with real tiny adapters, a key pair, a registry, a live HTTP server."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import torch
import yaml

from tests.conftest import make_config


def write_run(root, rounds=(1,), seed=0, name="tiny-run", epsilon=2.5):
    """A run directory as `fedtune simulate` writes it: config.yaml, metrics.jsonl, adapters/round-N."""
    from fedtune.adapters import create_adapter, get_adapter_state, set_adapter_state
    from fedtune.models import load_base_model
    from fedtune.recording import save_adapter
    from fedtune.types import RoundResult

    cfg = make_config(privacy={"enabled": True, "noise_multiplier": 1.0})
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(yaml.safe_dump(dict(cfg.to_dict(), name=name)))
    gen = torch.Generator().manual_seed(seed)
    for r in rounds:
        base, _ = load_base_model(cfg.model)
        model = create_adapter(base, cfg.adapter, seed=0)
        state = {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in get_adapter_state(model).items()}
        set_adapter_state(model, state)
        result = RoundResult(round=r, clients_sampled=3, clients_succeeded=3, train_loss=2.0, eval_loss=1.5 + r,
                             eval_perplexity=4.5, upload_bytes=100, wall_seconds=1.0, epsilon=epsilon * r,
                             delta=1e-5)
        save_adapter(model, root / "adapters" / f"round-{r}", result, cfg,
                     {"level": "sample", "epsilon": epsilon * r, "delta": 1e-5, "rounds": r,
                      "mechanism": "DP-SGD (opacus, Poisson sampling), per device", "accountant": "rdp"})
        with open(root / "metrics.jsonl", "a") as f:
            f.write(json.dumps(result.to_record()) + "\n")
    return root


@pytest.fixture
def keys(tmp_path):
    from fedtune.registry.signing import generate_keypair, load_verify_key

    key = generate_keypair(tmp_path / "keys" / "signing.key")
    return key, load_verify_key(tmp_path / "keys" / "signing.pub")


@pytest.fixture
def registry(tmp_path):
    from fedtune.registry import Registry

    return Registry(tmp_path / "registry")


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Two runs (different weights) shared by the tests of a session; never modified by tests."""
    root = tmp_path_factory.mktemp("runs")
    return write_run(root / "a", rounds=(1, 2), seed=0), write_run(root / "b", rounds=(1,), seed=1, name="run-b")


class LiveServer:
    """uvicorn on 127.0.0.1 in a thread of this process; stopped through its own Server object."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start within 20 s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture
def live(registry):
    from fedtune.registry.service import create_app

    with LiveServer(create_app(registry)) as server:
        yield server
