"""Shared fixtures: tiny models built from a config (no hub), a private model cache, prepared data."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    """Tiny models go to a per-session cache; the real SmolLM2 cache is shared with the user's."""
    if "FEDTUNE_TEST_CACHE" in os.environ:
        os.environ["FEDTUNE_CACHE"] = os.environ["FEDTUNE_TEST_CACHE"]
    else:
        os.environ["FEDTUNE_CACHE"] = str(tmp_path_factory.mktemp("fedtune-cache"))
    yield


def make_config(**sections):
    """An ExperimentConfig for the tiny model and synthetic data, with per-section overrides."""
    from fedtune.config import config_from_dict

    raw = {
        "model": {"source": "tiny", "quantization": "none"},
        "adapter": {"method": "lora", "rank": 4, "alpha": 8},
        "data": {"source": "synthetic", "synthetic_users": 3, "synthetic_docs_per_user": 8, "seq_len": 32},
        "train": {"local_steps": 4, "batch_size": 4, "lr": 0.02, "eval_max_chunks": 16},
        "privacy": {"enabled": False},
        "federation": {"rounds": 2, "clients_per_round": 3, "min_clients": 1},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_from_dict(raw)


@pytest.fixture
def tiny_cfg():
    return make_config()
