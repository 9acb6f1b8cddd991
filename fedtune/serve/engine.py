"""One batched generate over one base with a different LoRA adapter per row.

``generate(model, rows, pad_id, on_token)``:
1. Left-pad the prompts into ``input_ids [B, L]`` with ``attention_mask [B, L]``; positions count real
   tokens only, so a padded row sees exactly what it would see alone.
2. Prefill once (``logits_to_keep=1``), then decode one token per step for every row against the shared
   KV cache. peft's ``adapter_names=[...]`` routes row i through adapter ``rows[i].adapter`` in every LoRA
   layer ("__base__" = no adapter).
3. Each row samples with its own temperature / top_p / seeded generator (greedy when temperature == 0),
   and finishes on eos, on its own max_new_tokens, or when ``on_token`` says so (stop string, cancelled).
   Finished rows ride along (their tokens are ignored) until every row is done.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Row:
    prompt: list[int]
    adapter: str  # peft adapter name, or "__base__"
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None  # on the model's device; None = greedy only


OnToken = Callable[[int, int], bool]  # (row index, token) -> True when that row is finished (stop string, cancel)


def sample_next(logits: torch.Tensor, rows: list[Row], active: list[bool]) -> list[int]:
    """logits [B, V] (float32) -> one token per row (greedy rows by argmax, others by top-p sampling)."""
    tokens = logits.argmax(dim=-1).tolist()  # [B]
    for i, row in enumerate(rows):
        if not active[i] or row.temperature <= 0:
            continue
        probs = torch.softmax(logits[i] / row.temperature, dim=-1)  # [V]
        if row.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < row.top_p  # always keeps the top token
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        tokens[i] = int(torch.multinomial(probs, 1, generator=row.generator).item())
    return tokens


def _left_pad(rows: list[Row], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r.prompt) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r.prompt):] = torch.tensor(r.prompt, dtype=torch.long)
        mask[i, width - len(r.prompt):] = 1
    return ids.to(device), mask.to(device)


def _forward(model, adapter_names: list[str] | None, **kw):
    if adapter_names is not None:
        kw["adapter_names"] = adapter_names
    return model(**kw, use_cache=True, logits_to_keep=1)


@torch.inference_mode()
def generate(model, rows: list[Row], pad_id: int, on_token: OnToken,
             eos_ids: frozenset[int] = frozenset()) -> list[str]:
    """Decode ``rows`` together; ``on_token`` sees each row's tokens in order (never eos).

    Returns each row's finish reason: "stop" (eos, or ``on_token`` returned True) or "length".
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    peft = hasattr(model, "peft_config")
    names = [r.adapter for r in rows] if peft else None
    if not peft and any(r.adapter != "__base__" for r in rows):
        raise ValueError("rows name adapters but the model has no peft adapters loaded")
    ids, mask = _left_pad(rows, pad_id, device)  # [B, L], [B, L]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, L]
    cache = DynamicCache()
    out = _forward(model, names, input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache)
    active = [r.max_new_tokens > 0 for r in rows]
    budget = [r.max_new_tokens for r in rows]
    reasons = ["length"] * len(rows)
    next_pos = positions[:, -1:] + 1  # [B, 1]
    while any(active):
        tokens = sample_next(out.logits[:, -1].float(), rows, active)  # [B]
        for i, tok in enumerate(tokens):
            if not active[i]:
                continue
            budget[i] -= 1
            if tok in eos_ids or on_token(i, tok):
                active[i], reasons[i] = False, "stop"
            elif budget[i] <= 0:
                active[i] = False
        if not any(active):
            break
        step_ids = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]  # [B, 1]
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)  # [B, L + t]
        out = _forward(model, names, input_ids=step_ids, attention_mask=mask, position_ids=next_pos,
                       past_key_values=cache)
        next_pos = next_pos + 1
    return reasons
