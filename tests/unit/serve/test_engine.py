"""The batched decode loop: a mixed-adapter batch equals one request at a time; sampling rules."""

from __future__ import annotations

import pytest
import torch

from fedtune.serve.engine import Row, generate, sample_next
from fedtune.serve.pool import BASE, AdapterPool, local_sources
from tests.conftest import make_config
from tests.unit.serve.conftest import ADAPTERS, reference_greedy


@pytest.fixture(scope="module", params=["stacked", "peft"])
def pool(adapter_root, request):
    """Both mixed-batch kernels: the gathered batched LoRA and peft's per-adapter loop."""
    from fedtune.models import load_base_model

    base, _ = load_base_model(make_config().model)
    p = AdapterPool(base, "tiny-llama", capacity=3, kernel=request.param)
    for s in local_sources(adapter_root):
        p.register(s)
    p.activate(p.sources())
    return p


def run(model, rows):
    out = [[] for _ in rows]
    reasons = generate(model, rows, 258, lambda i, t: out[i].append(t) or False, frozenset({257}))
    return out, reasons


def test_mixed_batch_equals_one_at_a_time_and_peft_generate(pool, adapter_root):
    prompts = [list(b"hello there"), list(b"ab"), list(b"a longer prompt than the rest"), list(b"xyz")]
    names = [pool.source("alice").peft_name, pool.source("bob").peft_name, BASE, pool.source("carol").peft_name]
    budgets = [9, 5, 7, 9]
    rows = [Row(p, n, m) for p, n, m in zip(prompts, names, budgets)]
    together, reasons = run(pool.model, rows)
    alone = [run(pool.model, [r])[0][0] for r in rows]
    assert together == alone and reasons == ["length"] * 4
    assert [len(t) for t in together] == budgets  # each row stops at its own max_new_tokens
    dirs = [adapter_root / "alice", adapter_root / "bob", None, adapter_root / "carol"]
    assert together == [reference_greedy(d, p, m) for d, p, m in zip(dirs, prompts, budgets)]
    assert len({tuple(t[:5]) for t in together}) == 4  # the adapters really differ


def test_on_token_true_stops_only_that_row(pool):
    rows = [Row(list(b"hello"), pool.source("alice").peft_name, 8), Row(list(b"hello"), BASE, 8)]
    out = [[] for _ in rows]
    reasons = generate(pool.model, rows, 258, lambda i, t: out[i].append(t) or (i == 0 and len(out[0]) == 3))
    assert [len(o) for o in out] == [3, 8] and reasons == ["stop", "length"]


def test_sampling_greedy_top_p_and_seed():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    assert sample_next(logits, [Row([1], BASE, 1), Row([1], BASE, 1)], [True, True]) == [1, 0]
    tiny_p = [Row([1], BASE, 1, temperature=1.0, top_p=1e-6, generator=g(s)) for s in (1, 2)]
    assert sample_next(logits, tiny_p, [True, True]) == [1, 0]  # top_p ~ 0 keeps only the top token
    draws = [sample_next(logits[:1], [Row([1], BASE, 1, 1.0, 0.9, g(s))], [True])[0] for s in range(200)]
    assert set(draws) == {1, 3}  # 2 and 0 fall outside the 90% nucleus (p(1)+p(3) ~ 0.93)
    again = [sample_next(logits[:1], [Row([1], BASE, 1, 1.0, 0.9, g(s))], [True])[0] for s in range(200)]
    assert draws == again  # the same seed draws the same tokens
    hot = [sample_next(logits[:1], [Row([1], BASE, 1, 2.0, 1.0, g(s))], [True])[0] for s in range(400)]
    assert set(hot) == {0, 1, 2, 3}


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantized_base_mixed_batch_equals_one_at_a_time(adapter_root, quantization):
    """The project's bitsandbytes base (fedtune.models) under both kernels: same tokens batched or alone."""
    from fedtune.models import load_base_model

    base, _ = load_base_model(make_config(model={"quantization": quantization}).model)
    p = AdapterPool(base, "tiny-llama", capacity=3)
    for s in local_sources(adapter_root):
        p.register(s)
    p.activate(p.sources())
    rows = [Row(list(b"hello there"), p.source("alice").peft_name, 6), Row(list(b"ab"), BASE, 6),
            Row(list(b"xyz"), p.source("carol").peft_name, 6)]
    together, _ = run(p.model, rows)
    assert together == [run(p.model, [r])[0][0] for r in rows]
    p.set_kernel("peft")  # peft's own mixed-batch loop over the same quantized layers
    assert run(p.model, rows)[0] == together
