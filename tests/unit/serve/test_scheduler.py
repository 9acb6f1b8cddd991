"""The batching scheduler: concurrent requests for different adapters run as one batch (mixed policy) or
one adapter per batch (single policy), with the same outputs; a refused adapter fails only its requests."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from fedtune.serve.pool import AdapterPool, local_sources
from fedtune.serve.scheduler import Delta, Done, Failed, GenerationRequest, SamplingParams, Scheduler
from fedtune.serve.text import ByteTokenizer
from tests.conftest import make_config

TOK = ByteTokenizer()


@pytest.fixture
def pool(adapter_root):
    from fedtune.models import load_base_model

    base, _ = load_base_model(make_config().model)
    p = AdapterPool(base, "tiny-llama", capacity=3)
    for s in local_sources(adapter_root):
        p.register(s)
    return p


def serve_all(scheduler, jobs):
    """Submit every (adapter, prompt) before the scheduler wakes; returns (texts, errors)."""
    texts, errors, done = [""] * len(jobs), [None] * len(jobs), [threading.Event() for _ in jobs]

    def emit(i):
        def _emit(ev):
            if isinstance(ev, Delta):
                texts[i] += ev.text
            elif isinstance(ev, Failed):
                errors[i] = ev.error
                done[i].set()
            elif isinstance(ev, Done):
                done[i].set()
        return _emit

    for i, (adapter, prompt) in enumerate(jobs):
        scheduler.submit(GenerationRequest(TOK.encode(prompt), adapter, SamplingParams(8, temperature=0), emit(i)))
    scheduler.start()
    assert all(e.wait(60) for e in done)
    scheduler.stop()
    return texts, errors


JOBS = [("alice", "one"), ("bob", "two"), ("carol", "three"), ("alice", "four"), (None, "five"), ("bob", "six")]


def test_mixed_policy_makes_one_batch_single_policy_one_per_adapter(pool):
    mixed = Scheduler(pool, TOK, max_batch=32, policy="mixed", window_s=0)
    texts_mixed, errors = serve_all(mixed, JOBS)
    assert errors == [None] * 6 and (mixed.stats.batches, mixed.stats.max_rows) == (1, 6)
    single = Scheduler(pool, TOK, max_batch=32, policy="single", window_s=0)
    texts_single, _ = serve_all(single, JOBS)
    assert single.stats.batches == 4 and single.stats.max_rows == 2  # alice x2, bob x2, carol, base
    assert texts_mixed == texts_single and mixed.stats.tokens == 6 * 8


def test_max_batch_and_pool_capacity_bound_a_batch(pool):
    pool.capacity = 2
    s = Scheduler(pool, TOK, max_batch=4, policy="mixed", window_s=0)
    serve_all(s, JOBS)
    # batch 1: alice, bob (+ alice, base): capacity 2 keeps carol out; batch 2: carol, bob
    assert s.stats.batches == 2 and s.stats.max_rows == 4


def test_a_refused_adapter_fails_only_its_requests(pool):
    def tampered():
        raise ValueError("signature does not verify")

    pool.register(dataclasses.replace(pool.source("bob"), verify=tampered))
    texts, errors = serve_all(Scheduler(pool, TOK, policy="mixed", window_s=0), JOBS)
    assert [e is not None for e in errors] == [False, True, False, False, False, True]
    assert errors[1].status == 503 and "failed verification" in str(errors[1])
    assert all(texts[i] for i in (0, 2, 3, 4))
