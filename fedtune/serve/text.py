"""Text in and out: prompt encoding, the chat template, and incremental detokenization with stop strings.

``ServingTokenizer`` wraps either an HF tokenizer (its own ``chat_template``) or the byte tokenizer of the
tiny test model, which has no template: for it we render a fixed ChatML-style template, so chat requests
exercise the same code path in tests.

``TextStream`` turns one row's generated token ids into text pieces that are safe to send: a piece never
ends inside a multi-byte character and never contains a prefix of a stop string that might still complete.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from fedtune.serve.errors import BadRequest

# The template the byte-level tiny model is served with (HF tokenizers bring their own).
BYTE_CHAT_TEMPLATE = "<|{role}|>\n{content}\n"
BYTE_GENERATION_PROMPT = "<|assistant|>\n"


class ServingTokenizer(Protocol):
    eos_token_ids: frozenset[int]
    pad_token_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def chat(self, messages: list[dict]) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus the tiny model's specials (bos 256, eos 257, pad 258)."""

    eos_token_ids = frozenset({257})
    pad_token_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def chat(self, messages: list[dict]) -> list[int]:
        text = "".join(BYTE_CHAT_TEMPLATE.format(role=m["role"], content=m["content"]) for m in messages)
        return self.encode(text + BYTE_GENERATION_PROMPT)


class HFTokenizer:
    def __init__(self, tokenizer, extra_eos: tuple[int, ...] = ()):
        self._tok = tokenizer
        eos = {t for t in (tokenizer.eos_token_id, *extra_eos) if t is not None}
        self.eos_token_ids = frozenset(int(t) for t in eos)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = int(pad if pad is not None else 0)

    def encode(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def chat(self, messages: list[dict]) -> list[int]:
        if not getattr(self._tok, "chat_template", None):
            raise BadRequest("this base model's tokenizer has no chat template; use /v1/completions with a plain "
                             "prompt instead", param="messages")
        out = self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "keys"):  # transformers 5 may return a BatchEncoding
            out = out["input_ids"]
        return list(out)


def load_serving_tokenizer(model_cfg, model_config=None) -> ServingTokenizer:
    """The tokenizer that matches the configured base (byte-level for the tiny model)."""
    if model_cfg.source == "tiny":
        return ByteTokenizer()
    from transformers import AutoTokenizer

    from fedtune.models.loader import resolve_model_dir

    tok = AutoTokenizer.from_pretrained(resolve_model_dir(model_cfg))
    extra = getattr(getattr(model_config, "generation_config", None), "eos_token_id", None) if model_config else None
    extra_ids = tuple(extra) if isinstance(extra, (list, tuple)) else ((extra,) if extra is not None else ())
    return HFTokenizer(tok, extra_ids)


@dataclass
class TextStream:
    """Incremental detokenizer for one row: ``push(token)`` -> (new safe text, stopped by a stop string)."""

    tokenizer: ServingTokenizer
    stop: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already handed out
    text: str = ""  # the final text once finished

    def push(self, token: int) -> tuple[str, bool]:
        self.ids.append(token)
        full = self.tokenizer.decode(self.ids)
        hit = min((i for i in (full.find(s) for s in self.stop) if i >= 0), default=-1)
        if hit >= 0:
            self.text = full[:hit]
            return self._take(self.text), True
        self.text = full
        safe = len(full.rstrip("\ufffd"))  # an incomplete multi-byte character decodes to U+FFFD
        for s in self.stop:  # hold back a tail that could still grow into a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if full[:safe].endswith(s[:k]):
                    safe -= k
                    break
        return self._take(full[:safe]), False

    def finish(self) -> str:
        """Whatever is still held back, at the end of generation."""
        return self._take(self.text)

    def _take(self, upto: str) -> str:
        piece = upto[self.sent:]
        self.sent = max(self.sent, len(upto))
        return piece
