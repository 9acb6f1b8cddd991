"""Text -> token ids, one small interface over HF tokenizers and a byte tokenizer for tiny models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class TextEncoder(Protocol):
    vocab_size: int
    eos_token_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class ByteEncoder:
    """UTF-8 bytes as tokens 0..255, then specials; pairs with the tiny random model."""

    vocab_size: int = 260
    eos_token_id: int = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFEncoder:
    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.vocab_size = len(tokenizer)
        eos = tokenizer.eos_token_id
        self.eos_token_id = int(eos if eos is not None else 0)

    def encode(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def load_encoder(model_cfg) -> TextEncoder:
    """The encoder that matches the configured base model."""
    if model_cfg.source == "tiny":
        if model_cfg.tiny.vocab_size < 260:
            raise ValueError(
                f"model.tiny.vocab_size must be >= 260 for the byte tokenizer, got {model_cfg.tiny.vocab_size}"
            )
        return ByteEncoder()
    from transformers import AutoTokenizer

    from fedtune.models.loader import resolve_model_dir

    return HFEncoder(AutoTokenizer.from_pretrained(resolve_model_dir(model_cfg)))
