"""Capability plans: quantization by memory, rank by tier, steps by deadline."""

from __future__ import annotations

import math

import pytest

from fedtune.fleet import load_catalog, plan_device

CATALOG = load_catalog()
SMOL = dict(model_params=135_000_000, base_bytes_fp32=540_000_000)
BIG = dict(model_params=1_200_000_000, base_bytes_fp32=4_800_000_000)  # a 1B-class model


def _plan(name, *, deadline_s=None, max_local_steps=50, global_rank=16, lora_alpha=32.0,
          adapter_bytes_per_rank=50_000, seq_len=128, model=SMOL):
    return plan_device(CATALOG[name], **model, seq_len=seq_len, max_local_steps=max_local_steps,
                       deadline_s=deadline_s, adapter_bytes_per_rank=adapter_bytes_per_rank,
                       global_rank=global_rank, lora_alpha=lora_alpha)


def test_small_phone_gets_nf4_and_rank_4():
    plan = _plan("phone-low", model=BIG)
    assert plan.quantization == "nf4"
    assert plan.rank == 4
    assert plan.can_participate


def test_desktop_gets_full_precision_and_its_rank():
    plan = _plan("desktop-24gb", model=BIG)
    assert plan.quantization == "none"
    assert plan.rank == CATALOG["desktop-24gb"].lora_rank == 16
    assert _plan("desktop-24gb", global_rank=8).rank == 8  # never above the global rank


def test_quantization_thresholds():
    p = CATALOG["laptop-8gb"]  # 7 GiB
    mem = p.memory_bytes
    kw = dict(model_params=1, seq_len=1, max_local_steps=1, deadline_s=None, adapter_bytes_per_rank=1,
              global_rank=8, lora_alpha=16)
    assert plan_device(p, base_bytes_fp32=mem // 4, **kw).quantization == "none"
    assert plan_device(p, base_bytes_fp32=mem // 4 + 8, **kw).quantization == "int8"
    assert plan_device(p, base_bytes_fp32=int(mem / 1.5 * 4), **kw).quantization == "int8"
    assert plan_device(p, base_bytes_fp32=int(mem / 1.5 * 4) + 8, **kw).quantization == "nf4"
    too_big = plan_device(p, base_bytes_fp32=int(mem / 1.5 * 8) + 16, **kw)
    assert not too_big.can_participate and "nf4" in too_big.reason and too_big.local_steps == 0


def test_step_time_and_bytes_follow_the_formulas():
    p = CATALOG["phone-high"]
    plan = _plan("phone-high", model=BIG, adapter_bytes_per_rank=1000)
    assert plan.tokens_per_step == p.batch_size * 128
    assert plan.step_seconds == pytest.approx(p.batch_size * 128 / (p.train_tokens_per_s * 135e6 / 1.2e9))
    assert plan.download_bytes == plan.upload_bytes == 1000 * plan.rank
    assert plan.download_seconds == pytest.approx(1000 * plan.rank * 8 / (p.download_mbps * 1e6))


def test_local_steps_shrink_with_the_deadline():
    free = _plan("phone-high", max_local_steps=50)
    assert free.local_steps == 50
    steps = [_plan("phone-high", deadline_s=d).local_steps for d in (1000, 60, 20, 5)]
    assert steps == sorted(steps, reverse=True) and steps[0] > steps[-1]
    p = _plan("phone-high", deadline_s=60)
    assert p.local_steps == min(50, math.floor((60 - p.download_seconds - p.upload_seconds) / p.step_seconds))
    assert p.expected_seconds <= 60


def test_download_alone_past_the_deadline_cannot_participate():
    # 10 MB per rank x 4 at 20 Mbps = 16 s of download against a 10 s deadline
    plan = _plan("phone-low", deadline_s=10, adapter_bytes_per_rank=10_000_000)
    assert plan.download_seconds > 10
    assert plan.local_steps == 0 and not plan.can_participate
    assert "deadline" in plan.reason


def test_alpha_scaling_keeps_the_lora_scale():
    scales = {_plan(n).alpha / _plan(n).rank for n in CATALOG}
    assert len({round(s, 12) for s in scales}) == 1
    assert scales.pop() == pytest.approx(32.0 / 16)
    assert _plan("phone-low").alpha == pytest.approx(8.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="model_params.*deadline_s"):
        _plan("phone-low", model=dict(model_params=0, base_bytes_fp32=1), deadline_s=-1)
