"""The adapter pool: request routing, the bounded LRU, hot swap of versions, verification on load."""

from __future__ import annotations

import dataclasses

import pytest

from fedtune.serve.errors import AdapterRefused, ModelNotFound
from fedtune.serve.pool import AdapterPool, local_source, local_sources
from tests.conftest import make_config


@pytest.fixture
def pool(adapter_root):
    from fedtune.models import load_base_model

    base, _ = load_base_model(make_config().model)
    p = AdapterPool(base, "tiny-llama", capacity=2)
    for s in local_sources(adapter_root):
        p.register(s)
    return p


def lora_names(pool):
    return set(getattr(pool.model, "peft_config", {}))


def test_resolve_by_model_or_user(pool):
    assert pool.resolve("bob").name == "bob"
    assert pool.resolve("tiny-llama") is None  # the bare base
    assert pool.resolve("tiny-llama", user="carol").name == "carol"
    assert pool.resolve("tiny-llama", user="someone-else") is None
    with pytest.raises(ModelNotFound, match="alice"):
        pool.resolve("mallory")


def test_lru_keeps_at_most_capacity_and_evicts_least_recent(pool):
    a, b, c = (pool.source(n) for n in ("alice", "bob", "carol"))
    pool.activate([a])
    pool.activate([b])
    pool.activate([a])  # a is now the most recent
    pool.activate([c])  # evicts b
    assert pool.loaded == [a.peft_name, c.peft_name] and lora_names(pool) == {a.peft_name, c.peft_name}
    assert pool.loads == 3
    with pytest.raises(ValueError, match="needs 3 adapters"):
        pool.activate([a, b, c])


def test_a_newer_version_replaces_the_old_one_between_batches(pool, adapter_root):
    a = pool.source("alice")
    pool.activate([a])
    v2 = dataclasses.replace(local_source(adapter_root / "bob", name="alice"), version=2)
    pool.register(v2)
    assert pool.resolve("alice").version == 2 and a.peft_name in pool.loaded  # nothing changes mid-batch
    pool.activate([v2])
    assert pool.loaded == [v2.peft_name] and a.peft_name not in lora_names(pool)


def test_verification_failure_refuses_the_load(pool):
    def tampered():
        raise ValueError("sha256 mismatch")

    bad = dataclasses.replace(pool.source("bob"), verify=tampered)
    pool.register(bad)
    with pytest.raises(AdapterRefused, match="failed verification"):
        pool.activate([bad])
    assert bad.peft_name not in lora_names(pool) and pool.loaded == []


def test_local_sources_errors(tmp_path, adapter_root):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        local_sources(tmp_path)
    with pytest.raises(ValueError, match="adapter name"):
        local_source(adapter_root / "bob", name="no spaces")
