"""What one device of a profile can do in a round: quantization, LoRA rank, batch, steps before the deadline.

Pure arithmetic over a DeviceProfile and a few model numbers; it never loads a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from fedtune.fleet.profiles import DeviceProfile

Quantization = Literal["none", "int8", "nf4"]

# Memory a training run needs, as a multiple of the base weights' size in that precision. The weights are
# frozen under LoRA, so the headroom pays for activations, their saved copies for backward, per-sample
# gradients of the adapter (DP-SGD) and the allocator; it is larger for fp32 because its activations are.
FP32_HEADROOM = 4.0   # "none": memory >= 4.0 x fp32 weight bytes
INT8_HEADROOM = 1.5   # "int8": memory >= 1.5 x int8 weight bytes (= fp32 bytes / 4)
NF4_HEADROOM = 1.5    # "nf4":  memory >= 1.5 x nf4 weight bytes  (= fp32 bytes / 8); else cannot participate
BYTES_RATIO = {"none": 1.0, "int8": 1 / 4, "nf4": 1 / 8}


@dataclass(frozen=True)
class DevicePlan:
    """One device's round, planned at its nominal speed (the clock adds per-round slowdown later)."""

    profile: str
    quantization: Quantization
    rank: int
    alpha: float
    batch_size: int
    tokens_per_step: int
    tokens_per_s: float
    step_seconds: float
    download_bytes: int
    upload_bytes: int
    download_seconds: float
    upload_seconds: float
    local_steps: int
    can_participate: bool
    reason: str = ""  # why the device cannot participate; "" when it can

    @property
    def expected_seconds(self) -> float:
        """Nominal round time: download + local_steps x step_seconds + upload."""
        return self.download_seconds + self.local_steps * self.step_seconds + self.upload_seconds


def choose_quantization(memory_bytes: int, base_bytes_fp32: int) -> Quantization | None:
    """The least aggressive precision that fits (None when not even nf4 does); thresholds above."""
    if memory_bytes >= FP32_HEADROOM * base_bytes_fp32:
        return "none"
    if memory_bytes >= INT8_HEADROOM * base_bytes_fp32 * BYTES_RATIO["int8"]:
        return "int8"
    if memory_bytes >= NF4_HEADROOM * base_bytes_fp32 * BYTES_RATIO["nf4"]:
        return "nf4"
    return None


def transfer_seconds(num_bytes: int, mbps: float) -> float:
    """Seconds to move ``num_bytes`` at ``mbps`` megabits (1e6 bits) per second."""
    return num_bytes * 8 / (mbps * 1e6)


def plan_device(
    profile: DeviceProfile,
    *,
    model_params: int,
    base_bytes_fp32: int,
    seq_len: int,
    max_local_steps: int,
    deadline_s: float | None,
    adapter_bytes_per_rank: int,
    global_rank: int,
    lora_alpha: float,
) -> DevicePlan:
    """Plan one device's round.

    1. quantization: "none" if M >= 4.0 * W, "int8" if M >= 1.5 * W/4, "nf4" if M >= 1.5 * W/8, where
       M = memory_gb * 2**30 and W = base_bytes_fp32; below that the device cannot participate
       (quantization is then reported as "nf4").
    2. rank = min(profile.lora_rank, global_rank); alpha = lora_alpha * rank / global_rank, so the LoRA
       scale alpha / rank equals lora_alpha / global_rank on every tier.
    3. tokens_per_step = batch_size * seq_len; tokens_per_s = train_tokens_per_s * 135e6 / model_params;
       step_seconds = tokens_per_step / tokens_per_s.
    4. download_bytes = upload_bytes = adapter_bytes_per_rank * rank;
       download_seconds = download_bytes * 8 / (download_mbps * 1e6), likewise upload.
    5. local_steps = max_local_steps if deadline_s is None, else
       min(max_local_steps, floor((deadline_s - download_seconds - upload_seconds) / step_seconds)),
       at least 0; can_participate = local_steps >= 1 (and the model fits in memory).
    """
    problems = []
    for name, value in (("model_params", model_params), ("base_bytes_fp32", base_bytes_fp32),
                        ("seq_len", seq_len), ("max_local_steps", max_local_steps),
                        ("adapter_bytes_per_rank", adapter_bytes_per_rank), ("global_rank", global_rank),
                        ("lora_alpha", lora_alpha)):
        if not value > 0:
            problems.append(f"{name} must be positive, got {value!r}")
    if deadline_s is not None and not deadline_s > 0:
        problems.append(f"deadline_s must be positive or None (no deadline), got {deadline_s!r}")
    if problems:
        raise ValueError("plan_device: " + "; ".join(problems))

    quant = choose_quantization(profile.memory_bytes, base_bytes_fp32)
    rank = min(profile.lora_rank, global_rank)
    alpha = lora_alpha * rank / global_rank
    tokens_per_step = profile.batch_size * seq_len
    tps = profile.tokens_per_s(model_params)
    step_s = tokens_per_step / tps
    adapter_bytes = adapter_bytes_per_rank * rank
    down_s = transfer_seconds(adapter_bytes, profile.download_mbps)
    up_s = transfer_seconds(adapter_bytes, profile.upload_mbps)

    if deadline_s is None:
        steps = max_local_steps
    else:
        budget = deadline_s - down_s - up_s
        steps = max(0, min(max_local_steps, math.floor(budget / step_s))) if budget > 0 else 0

    reason = ""
    if quant is None:
        reason = (f"{profile.memory_gb} GiB cannot hold an nf4 base of {base_bytes_fp32 / 8 / 2**30:.2f} GiB "
                  f"with {NF4_HEADROOM}x headroom")
    elif steps < 1:
        reason = (f"not one step fits the {deadline_s} s deadline (download {down_s:.1f} s + upload "
                  f"{up_s:.1f} s + one step {step_s:.1f} s)")
    return DevicePlan(
        profile=profile.name,
        quantization=quant or "nf4",
        rank=rank,
        alpha=alpha,
        batch_size=profile.batch_size,
        tokens_per_step=tokens_per_step,
        tokens_per_s=tps,
        step_seconds=step_s,
        download_bytes=adapter_bytes,
        upload_bytes=adapter_bytes,
        download_seconds=down_s,
        upload_seconds=up_s,
        local_steps=steps if quant is not None else 0,
        can_participate=not reason,
        reason=reason,
    )
