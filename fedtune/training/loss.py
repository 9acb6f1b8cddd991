"""The causal-LM training loss, optionally without ever materializing the full-vocabulary logits.

``causal_lm_loss(model, x, chunk_tokens)`` is the mean next-token NLL of ``x`` (what
``model(input_ids=x, labels=x).loss`` returns). With ``chunk_tokens`` set, the decoder's last hidden
states go through ``fused_linear_cross_entropy``: the output projection, the softmax and the loss are
computed ``chunk_tokens`` rows at a time, and each chunk's gradient with respect to the hidden states
is computed right there in the forward pass, so neither the [B*T, V] fp32 logits nor their gradient
exist at once (at V=128,256 and 8 x 1024 tokens that is 4 GiB each). It costs the same two matmuls per
chunk as the unfused loss (forward and input gradient) and nothing is recomputed.

The output projection must be frozen (LoRA never targets lm_head here): its weight gradient is not
computed, and opacus would not see it. A trainable lm_head, or a prompt-tuning model (whose forward
prepends virtual tokens), falls back to the unfused loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, y_i) / n over rows i, chunk by chunk; backward returns the saved dL/dh."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int):
        # hidden [N, D], weight [V, D] (frozen), target [N]
        n = (target != IGNORE_INDEX).sum().clamp(min=1)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        acc = torch.promote_types(hidden.dtype, torch.float32)  # bf16 compute, fp32 (or fp64) softmax
        total = torch.zeros((), device=hidden.device, dtype=acc)
        for i in range(0, hidden.shape[0], chunk):
            h, y = hidden[i : i + chunk], target[i : i + chunk]  # [c, D], [c]
            logits = (h @ weight.t()).to(acc)  # [c, V]
            keep = y != IGNORE_INDEX
            safe = torch.where(keep, y, 0)
            lse = torch.logsumexp(logits, dim=-1)  # [c]
            picked = logits.gather(1, safe[:, None]).squeeze(1)  # [c]
            total += ((lse - picked) * keep).sum()
            if grad_hidden is not None:
                # dCE/dlogits = softmax - onehot, in place over the chunk's logits
                probs = logits.sub_(lse[:, None]).exp_()  # [c, V]
                probs.scatter_add_(1, safe[:, None], -torch.ones_like(probs[:, :1]))
                probs.mul_((keep / n)[:, None])
                grad_hidden[i : i + chunk] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)  # [c, D]
        ctx.save_for_backward(grad_hidden)
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_out.to(grad_hidden.dtype), None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                               chunk_tokens: int) -> torch.Tensor:
    """Mean CE of ``hidden @ weight.T`` against ``target`` (ignore -100), ``chunk_tokens`` rows at a time."""
    if weight.requires_grad:
        raise ValueError("fused_linear_cross_entropy needs a frozen output projection (lm_head)")
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be > 0, got {chunk_tokens}")
    return _FusedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, target.reshape(-1),
                                          int(chunk_tokens))


def _causal_parts(model):
    """(decoder, lm_head) of a PeftModel / HF causal LM when the fused loss applies to it, else None."""
    peft_config = getattr(model, "peft_config", None)
    if peft_config:
        active = peft_config.get(getattr(model, "active_adapter", "default"))
        if active is not None and getattr(active, "is_prompt_learning", False):
            return None
        model = model.get_base_model()
    decoder, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if decoder is None or not isinstance(head, torch.nn.Linear) or head.bias is not None or head.weight.requires_grad:
        return None
    return decoder, head


def causal_lm_loss(model, x: torch.Tensor, chunk_tokens: int | None = None) -> torch.Tensor:
    """Mean next-token NLL of ``x`` [B, T]; fused and chunked when ``chunk_tokens`` is set and applies."""
    parts = _causal_parts(model) if chunk_tokens else None
    if parts is None:
        return model(input_ids=x, labels=x).loss
    decoder, head = parts
    hidden = decoder(input_ids=x).last_hidden_state  # [B, T, D]
    return fused_linear_cross_entropy(hidden[:, :-1], head.weight, x[:, 1:], chunk_tokens)
