"""The OpenAI-compatible HTTP routes (FastAPI) over the scheduler and the adapter pool.

    GET  /v1/models                 the base and every served adapter, with version and privacy guarantee
    GET  /v1/models/{id}
    POST /v1/completions            prompt (string, strings or token ids) -> text; SSE with stream=true
    POST /v1/chat/completions       messages -> the tokenizer's chat template -> text; SSE with stream=true
    GET  /health

The request's ``model`` names an adapter; ``model`` = the base id with ``user`` = an adapter name selects
that user's adapter. Every error has OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fedtune.serve.errors import BadRequest, ServeError
from fedtune.serve.pool import AdapterPool, AdapterSource
from fedtune.serve.scheduler import Delta, Done, Failed, GenerationRequest, SamplingParams, Scheduler
from fedtune.serve.schemas import ChatRequest, CompletionRequest, envelope, new_id, usage
from fedtune.serve.text import ServingTokenizer

STARTED = int(time.time())


@dataclass(frozen=True)
class ServeContext:
    pool: AdapterPool
    scheduler: Scheduler
    tokenizer: ServingTokenizer
    context_len: int  # prompt + completion tokens the base model takes
    vocab_size: int
    chat_max_tokens: int = 256  # default max_tokens for chat when the request sets none
    watcher: Any = None  # RegistryWatcher, for /health


def model_card(pool: AdapterPool, s: AdapterSource | None) -> dict:
    if s is None:
        return {"id": pool.base_id, "object": "model", "created": STARTED, "owned_by": "fedtune",
                "fedtune": {"kind": "base"}}
    meta = {"kind": "adapter", "version": s.version, "origin": s.origin, "privacy": s.privacy,
            "loaded": s.peft_name in pool.loaded, "base_model": pool.base_id, **s.info}
    return {"id": s.name, "object": "model", "created": STARTED, "owned_by": "fedtune", "parent": pool.base_id,
            "fedtune": meta}


def _fingerprint(name: str | None, version: int | None) -> str:
    return f"fedtune-{name}-v{version}" if name else "fedtune-base"


class _Run:
    """The scheduler requests of one HTTP request (one per prompt), and the queue their events land in."""

    def __init__(self, ctx: ServeContext, prompts: list[list[int]], adapter: str | None, params: SamplingParams):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.requests = []
        for i, ids in enumerate(prompts):
            emit = (lambda ev, i=i: loop.call_soon_threadsafe(self.queue.put_nowait, (i, ev)))
            self.requests.append(ctx.scheduler.submit(GenerationRequest(ids, adapter, params, emit)))

    async def events(self) -> AsyncIterator[tuple[int, Any]]:
        pending = len(self.requests)
        try:
            while pending:
                i, ev = await self.queue.get()
                if isinstance(ev, (Done, Failed)):
                    pending -= 1
                yield i, ev
        finally:  # client gone or error: stop generating for it
            for r in self.requests:
                r.cancel()


def _prepare(ctx: ServeContext, body, prompts: list[list[int]], max_tokens: int | None):
    body.refuse_unsupported()
    source = ctx.pool.resolve(body.model, body.user)
    longest = max(len(p) for p in prompts)
    if any(not p for p in prompts):
        raise BadRequest("the prompt encodes to no tokens; send some text", param="prompt")
    if any(not 0 <= t < ctx.vocab_size for p in prompts for t in p):
        raise BadRequest(f"token ids must be in [0, {ctx.vocab_size}) for this model", param="prompt")
    room = ctx.context_len - longest
    limit = max_tokens if max_tokens is not None else min(ctx.chat_max_tokens, room)
    if longest + limit > ctx.context_len or limit < 1:
        raise BadRequest(f"the prompt has {longest} tokens and max_tokens is {limit}, but this model takes "
                         f"{ctx.context_len} tokens in all; shorten the prompt or lower max_tokens",
                         param="max_tokens")
    return source, body.sampling(limit)


async def _respond(ctx: ServeContext, body, prompts: list[list[int]], max_tokens: int | None, chat: bool):
    source, params = _prepare(ctx, body, prompts, max_tokens)
    run = _Run(ctx, prompts, source.name if source else None, params)
    rid = new_id("chatcmpl" if chat else "cmpl")
    obj = "chat.completion" if chat else "text_completion"
    fingerprint = _fingerprint(source.name if source else None, source.version if source else None)
    if body.stream:
        return StreamingResponse(_sse(run, rid, body, fingerprint, chat), media_type="text/event-stream")
    texts, dones = [""] * len(prompts), [None] * len(prompts)
    async for i, ev in run.events():
        if isinstance(ev, Failed):
            raise ev.error
        if isinstance(ev, Delta):
            texts[i] += ev.text
        else:
            dones[i] = ev
    choices = []
    for i, (text, d) in enumerate(zip(texts, dones)):
        if chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                            "finish_reason": d.finish_reason})
        else:
            choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": d.finish_reason})
    fingerprint = _fingerprint(source.name if source else None, dones[0].adapter_version)
    total = usage(sum(d.prompt_tokens for d in dones), sum(d.completion_tokens for d in dones))
    return envelope(rid, obj, body.model, choices, fingerprint, total)


async def _sse(run: _Run, rid: str, body, fingerprint: str, chat: bool) -> AsyncIterator[str]:
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict], usage_: dict | None = None) -> str:
        return f"data: {json.dumps(envelope(rid, obj, body.model, choices, fingerprint, usage_))}\n\n"

    prompt_tokens = completion_tokens = 0
    if chat:
        for i in range(len(run.requests)):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    async for i, ev in run.events():
        if isinstance(ev, Failed):
            yield f"data: {json.dumps(ev.error.to_dict())}\n\n"
            return
        if isinstance(ev, Delta):
            piece = {"delta": {"content": ev.text}} if chat else {"text": ev.text, "logprobs": None}
            yield chunk([{"index": i, **piece, "finish_reason": None}])
        else:
            prompt_tokens += ev.prompt_tokens
            completion_tokens += ev.completion_tokens
            last = {"delta": {}} if chat else {"text": "", "logprobs": None}
            yield chunk([{"index": i, **last, "finish_reason": ev.finish_reason}])
    if body.include_usage:
        yield chunk([], usage(prompt_tokens, completion_tokens))
    yield "data: [DONE]\n\n"


def _error(err: ServeError) -> JSONResponse:
    return JSONResponse(err.to_dict(), status_code=err.status)


def create_app(ctx: ServeContext) -> FastAPI:
    app = FastAPI(title="fedtune serve", version="1")

    @app.exception_handler(ServeError)
    async def _serve_error(_request, err: ServeError):
        return _error(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return _error(BadRequest(f"{param or 'body'}: {first.get('msg')}; see the OpenAI API reference for the "
                                 "expected request body", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request, err: StarletteHTTPException):
        kind = BadRequest if err.status_code < 500 else ServeError
        e = kind(f"{err.detail}: this server answers /v1/models, /v1/completions and /v1/chat/completions")
        return JSONResponse(e.to_dict(), status_code=err.status_code)

    @app.get("/health")
    def health() -> dict:
        s = ctx.scheduler.stats
        polls = {n: o.__dict__ for n, o in ctx.watcher.last.items()} if ctx.watcher else {}
        return {"status": "ok", "loaded": ctx.pool.loaded, "batches": s.batches, "rows": s.rows,
                "tokens": s.tokens, "registry": polls}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [model_card(ctx.pool, None)] +
                [model_card(ctx.pool, s) for s in sorted(ctx.pool.sources(), key=lambda s: s.name)]}

    @app.get("/v1/models/{model_id:path}")
    def model(model_id: str) -> dict:
        return model_card(ctx.pool, ctx.pool.resolve(model_id))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        prompts = [p if isinstance(p, list) else ctx.tokenizer.encode(p) for p in body.prompts()]
        return await _respond(ctx, body, prompts, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        prompt = ctx.tokenizer.chat([m.as_template_input() for m in body.messages])
        return await _respond(ctx, body, [prompt], body.max_completion_tokens or body.max_tokens, chat=True)

    return app
