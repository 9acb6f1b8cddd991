"""The official `openai` client against `fedtune serve` on loopback: completions, chat, streaming, errors."""

from __future__ import annotations

import httpx
import openai
import pytest

from fedtune.serve.text import ByteTokenizer
from tests.unit.serve.conftest import ADAPTERS, openai_client, reference_greedy

TOK = ByteTokenizer()
PROMPT = "The state of the union"


def test_models_lists_base_and_adapters_with_privacy(local_server):
    url, _ = local_server
    cards = {m.id: m for m in openai_client(url).models.list().data}
    assert set(cards) == {"tiny-llama", *ADAPTERS}
    alice = cards["alice"].model_extra["fedtune"]
    assert alice["kind"] == "adapter" and alice["version"] == 1 and alice["origin"] == "local"
    assert alice["privacy"]["level"] == "sample" and alice["privacy"]["epsilon"] == 3.0
    assert openai_client(url).models.retrieve("bob").id == "bob"


@pytest.mark.parametrize("name", ["alice", "carol"])
def test_greedy_completion_equals_peft_generate(local_server, adapter_root, name):
    url, _ = local_server
    r = openai_client(url).completions.create(model=name, prompt=PROMPT, max_tokens=10, temperature=0)
    want = reference_greedy(adapter_root / name, TOK.encode(PROMPT), 10)
    assert r.choices[0].text == TOK.decode(want)
    assert r.usage.prompt_tokens == len(PROMPT) and r.usage.completion_tokens == 10
    version = 1 if name == "alice" else 3  # the round in its fedtune.json
    assert r.choices[0].finish_reason == "length" and r.system_fingerprint == f"fedtune-{name}-v{version}"


def test_adapters_change_the_output_and_user_selects_one(local_server, adapter_root):
    url, _ = local_server
    c = openai_client(url)
    texts = {m: c.completions.create(model=m, prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text
             for m in ("tiny-llama", *ADAPTERS)}
    assert len(set(texts.values())) == 4  # every adapter (and the bare base) answers differently
    by_user = c.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=10, temperature=0, user="bob")
    assert by_user.choices[0].text == texts["bob"]
    assert texts["tiny-llama"] == TOK.decode(reference_greedy(None, TOK.encode(PROMPT), 10))


def test_chat_uses_the_template_and_matches_generate(local_server, adapter_root):
    url, _ = local_server
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    r = openai_client(url).chat.completions.create(model="bob", messages=messages, max_tokens=8, temperature=0)
    want = reference_greedy(adapter_root / "bob", TOK.chat(messages), 8)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == TOK.decode(want)
    assert r.object == "chat.completion" and r.usage.prompt_tokens == len(TOK.chat(messages))


def test_streaming_equals_the_whole_answer(local_server):
    url, _ = local_server
    c = openai_client(url)
    whole = c.chat.completions.create(model="alice", messages=[{"role": "user", "content": "hi"}], max_tokens=12,
                                      temperature=0).choices[0].message.content
    chunks = list(c.chat.completions.create(model="alice", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == whole
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12
    pieces = list(c.completions.create(model="carol", prompt=PROMPT, max_tokens=6, temperature=0, stream=True))
    text = c.completions.create(model="carol", prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
    assert "".join(p.choices[0].text for p in pieces) == text and len(pieces) >= 2


def test_stop_strings_and_seeded_sampling(local_server):
    url, _ = local_server
    c = openai_client(url)
    full = c.completions.create(model="alice", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    stop = full[4:6]
    cut = c.completions.create(model="alice", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop]).choices[0]
    assert cut.text == full[:full.find(stop)] and cut.finish_reason == "stop"
    a, b, other = (c.completions.create(model="bob", prompt=PROMPT, max_tokens=16, temperature=1.0, seed=s)
                   .choices[0].text for s in (7, 7, 8))
    assert a == b and a != other


def test_unknown_model_is_404_in_openai_shape(local_server):
    url, _ = local_server
    with pytest.raises(openai.NotFoundError) as err:
        openai_client(url).completions.create(model="mallory", prompt="x", max_tokens=2)
    assert err.value.status_code == 404 and err.value.code == "model_not_found"
    body = httpx.post(f"{url}/v1/chat/completions", json={"model": "mallory", "messages": [
        {"role": "user", "content": "x"}]}).json()
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["param"] == "model"
    assert "alice" in body["error"]["message"]  # says what exists


@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": 5}, "temperature"),
    ({"n": 2}, "n"),
    ({"max_tokens": 10_000}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
])
def test_bad_requests_are_400_naming_the_parameter(local_server, kwargs, param):
    url, _ = local_server
    with pytest.raises(openai.BadRequestError) as err:
        openai_client(url).completions.create(model="alice", prompt=PROMPT, **kwargs)
    assert err.value.status_code == 400 and err.value.param == param
    assert err.value.body["type"] == "invalid_request_error"


def test_malformed_body_is_400_not_422(local_server):
    url, _ = local_server
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "alice", "messages": "hello"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_concurrent_users_share_batches_and_get_their_own_answers(local_server):
    import threading

    url, server = local_server
    c = openai_client(url)
    jobs = [("alice", "one"), ("bob", "two"), ("carol", "three"), ("tiny-llama", "four"), ("bob", "five")] * 2
    alone = [c.completions.create(model=m, prompt=p, max_tokens=8, temperature=0).choices[0].text for m, p in jobs]
    before = server.context.scheduler.stats.max_rows
    got, barrier = [None] * len(jobs), threading.Barrier(len(jobs))

    def ask(i):
        barrier.wait()
        got[i] = c.completions.create(model=jobs[i][0], prompt=jobs[i][1], max_tokens=8, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == alone
    assert before == 1 and server.context.scheduler.stats.max_rows > 1  # rows of several adapters in one batch
