"""Request bodies of the OpenAI API subset we serve, validated; and the response / chunk shapes.

Fields that change what is generated but that we do not implement (n > 1, logprobs, echo, best_of,
penalties, tools) are refused with a 400 naming the field, never silently ignored; unknown fields are
ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedtune.serve.errors import BadRequest
from fedtune.serve.scheduler import SamplingParams


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    user: str | None = None
    n: int | None = 1
    logprobs: bool | int | None = None
    presence_penalty: float | None = 0
    frequency_penalty: float | None = 0

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("expected at most 4 non-empty stop strings")
        return stops

    def refuse_unsupported(self) -> None:
        if self.n not in (None, 1):
            raise BadRequest(f"n={self.n}: this server returns one choice per prompt; send n=1 (or several "
                             "requests)", param="n")
        if self.logprobs:
            raise BadRequest("logprobs are not supported by fedtune serve; leave logprobs unset", param="logprobs")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise BadRequest(f"{name} is not supported by fedtune serve; leave it unset or 0", param=name)

    def sampling(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
                              top_p=1.0 if self.top_p is None else self.top_p, stop=tuple(self.stop or ()),
                              seed=self.seed)

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise BadRequest("echo is not supported by fedtune serve; leave it false", param="echo")
        if self.best_of not in (None, 1):
            raise BadRequest("best_of is not supported by fedtune serve; leave it unset", param="best_of")
        if self.suffix:
            raise BadRequest("suffix (insertion) is not supported by fedtune serve", param="suffix")

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [p]  # one prompt as token ids
        if not p:
            raise BadRequest("prompt is empty; send a string or a list of strings", param="prompt")
        return list(p)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def as_template_input(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise BadRequest("tools / function calling are not supported by fedtune serve", param="tools")


# --- responses --------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(rid: str, obj: str, model: str, choices: list[dict], fingerprint: str, usage_: dict | None) -> dict:
    out = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": choices,
           "system_fingerprint": fingerprint}
    if usage_ is not None:
        out["usage"] = usage_
    return out
