"""Device-side DP-SGD is tested by its distributions, in both engines (one at a time and packed), and one at a
time in both clipping paths (opacus hooks and ghost clipping).

Noise: an adapter whose LoRA A and B are both zero has an exactly zero loss gradient (dL/dB = g (A x)^T = 0,
dL/dA = B^T g x^T = 0), and lr = 0 keeps it there, so the gradient handed to AdamW at every step is the
DP noise alone: N(0, (sigma C)^2) / E[B] per coordinate, E[B] = int(N q) with q = 1 / ceil(N / batch)
(opacus' "mean" reduction over the expected batch). It is read with torch's public global optimizer
step pre-hook, no hook in fedtune. Sampling: the batch sizes that reach the model follow Binomial(N, q),
empty batches included (those are noise-only steps and never reach the model).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fedtune.adapters import create_adapter, get_adapter_state
from fedtune.data import build_client_data
from fedtune.federation.seeds import Seeds, task_streams
from fedtune.models import load_base_model
from fedtune.models.tokenizer import ByteEncoder
from fedtune.packed import train_packed
from fedtune.packed.sampling import DeviceBatches
from fedtune.privacy import PrivacyLedger
from fedtune.training import train_local
from fedtune.types import ClientTask
from tests.conftest import make_config
from tests.unit.privacy.stats import (
    ALPHA,
    binomial_count_pvalue,
    binomial_gof_pvalue,
    gaussian_shape_pvalue,
    gaussian_std_pvalue,
    mean_zero_pvalue,
)

SIGMA, CLIP = 0.8, 0.5


def _as(mode: str, task: ClientTask) -> ClientTask:
    """The task as a simulation runs it, or as a deployed device does (its secret AES-CTR streams)."""
    if mode == "simulated":
        return task
    return dataclasses.replace(task, streams=task_streams(Seeds.secret(), task.server_round, task.seed))


MODES = pytest.mark.parametrize("mode", ["simulated", "deployed"])


@pytest.fixture(scope="module")
def setup():
    cfg = make_config(adapter={"target_modules": ["q_proj", "v_proj", "o_proj"]},
                      privacy={"enabled": True, "noise_multiplier": SIGMA, "max_grad_norm": CLIP})
    base, _ = load_base_model(cfg.model)
    model = create_adapter(base, cfg.adapter, seed=0)
    datas = build_client_data(cfg.data, ByteEncoder(), seed=0)
    zero = {k: torch.zeros_like(v) for k, v in get_adapter_state(model).items()}
    return cfg, model, datas, zero


def _rate_and_expected_batch(num_train: int, batch_size: int) -> tuple[float, int]:
    q = 1.0 / math.ceil(num_train / min(batch_size, num_train))  # one Poisson "epoch" = len(loader) steps
    return q, int(num_train * q)


class _AdamWGrads:
    """Every gradient AdamW is asked to apply, per step (torch's global optimizer pre-hook)."""

    def __init__(self):
        self.steps: list[list[torch.Tensor]] = []

    def __enter__(self):
        def hook(opt, args, kwargs):
            if isinstance(opt, torch.optim.AdamW):
                self.steps.append([p.grad.detach().clone() for g in opt.param_groups for p in g["params"]])

        self._handle = register_optimizer_step_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def _check_gaussian(x: np.ndarray, std: float, what: str) -> None:
    assert gaussian_std_pvalue(x, std) > ALPHA, f"{what}: empirical std {x.std():.4g}, expected {std:.4g}"
    assert mean_zero_pvalue(x, std) > ALPHA, f"{what}: mean {x.mean():.3g} is not 0"
    assert gaussian_shape_pvalue(x, std) > ALPHA, f"{what}: not Gaussian"


@MODES
@pytest.mark.parametrize("clipping", ["hooks", "ghost"])
def test_train_local_noise_is_sigma_c_over_expected_batch(setup, clipping, mode):
    cfg, model, datas, zero = setup
    client, steps = datas[0], 5
    q, ebs = _rate_and_expected_batch(client.num_train, 4)
    privacy = cfg.privacy.model_copy(update={"clipping": clipping})
    with _AdamWGrads() as seen:
        train_local(model, zero, client, _as(mode, ClientTask(1, steps, 4, 0.0, seed=3)), privacy,
                    PrivacyLedger("u"))
    assert len(seen.steps) == steps  # every step is a DP step, empty Poisson batches too
    per_step = np.stack([torch.cat([g.flatten() for g in s]).double().numpy() for s in seen.steps])  # [S, P]
    assert per_step.shape[1] > 1000
    _check_gaussian(per_step, SIGMA * CLIP / ebs, "train_local noise")
    corr = np.corrcoef(per_step)[np.triu_indices(steps, 1)]
    assert np.abs(corr).max() < 0.15  # a fresh draw each step (|r| ~ 0.024 for independent draws)


@MODES
def test_packed_noise_is_each_devices_sigma_c_over_its_expected_batch(setup, mode):
    cfg, model, datas, zero = setup
    steps, sizes = 4, [1, 3, 5]
    tasks = [_as(mode, ClientTask(1, steps, b, 0.0, seed=20 + i)) for i, b in enumerate(sizes)]
    with _AdamWGrads() as seen:
        train_packed(model, [zero] * 3, datas, tasks, cfg.privacy, [PrivacyLedger(d.user_id) for d in datas])
    assert len(seen.steps) == steps
    rows = []
    for k, (data, b) in enumerate(zip(datas, sizes)):
        _, ebs = _rate_and_expected_batch(data.num_train, b)
        x = np.stack([torch.cat([g[k].flatten() for g in s]).double().numpy() for s in seen.steps])  # [S, P]
        _check_gaussian(x, SIGMA * CLIP / ebs, f"packed device {k} (E[B]={ebs})")
        rows.append(x.ravel() * ebs)
    assert np.abs(np.corrcoef(rows)[np.triu_indices(3, 1)]).max() < 0.05  # devices' noises are independent


@MODES
@pytest.mark.parametrize("clipping", ["hooks", pytest.param("ghost", marks=pytest.mark.slow)])  # same DPDataLoader
def test_train_local_batches_follow_binomial_n_q(setup, clipping, mode):
    cfg, model, datas, zero = setup
    client, steps, batch = datas[1], 80, 8  # q = 1/7: Binomial(50, 1/7), against fixed batches of 8 (and 2)
    q, _ = _rate_and_expected_batch(client.num_train, batch)
    seen: list[int] = []
    privacy = cfg.privacy.model_copy(update={"clipping": clipping})
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    try:
        train_local(model, zero, client, _as(mode, ClientTask(1, steps, batch, 0.0, seed=5)), privacy,
                    PrivacyLedger("u"))
    finally:
        hook.remove()
    assert len(seen) <= steps and min(seen) > 0
    sizes = seen + [0] * (steps - len(seen))  # an empty batch is a noise-only step: no forward
    assert binomial_gof_pvalue(sizes, client.num_train, q) > ALPHA, np.bincount(sizes)
    empty = (1 - q) ** client.num_train
    assert binomial_count_pvalue(steps - len(seen), steps, empty) > ALPHA
    assert max(seen) != min(seen)  # not fixed-size


@MODES
@pytest.mark.parametrize("batch_size", [1, 4])
def test_packed_device_batches_follow_binomial_n_q(setup, batch_size, mode):
    _, _, datas, _ = setup
    data, draws = datas[0], 4000
    q, _ = _rate_and_expected_batch(data.num_train, batch_size)
    stream = DeviceBatches(data, _as(mode, ClientTask(1, draws, batch_size, 0.0, seed=7)), dp=True)
    sizes = [stream.next().shape[0] for _ in range(draws)]
    assert stream.sample_rate == pytest.approx(q)
    assert binomial_gof_pvalue(sizes, data.num_train, q) > ALPHA, np.bincount(sizes)
    empty = (1 - q) ** data.num_train
    assert binomial_count_pvalue(sizes.count(0), draws, empty) > ALPHA
    assert sizes.count(0) > 0  # empty batches occur (about 2% of draws here)


def test_micro_batched_noise_is_sigma_c_over_the_expected_logical_batch(setup):
    """Virtual batches: a Poisson logical batch of E[B] = 13 in micro-batches of at most 4 sequences gets its
    noise once per LOGICAL step, N(0, (sigma C)^2) / E[B_logical], and the accountant one step per logical step."""
    cfg, model, datas, zero = setup
    client, steps, batch, micro = datas[0], 5, 16, 4
    q, ebs = _rate_and_expected_batch(client.num_train, batch)
    assert ebs > micro  # the logical batches are split
    seen_sizes: list[int] = []
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda m, a: seen_sizes.append(a[0].shape[0]))
    ledger = PrivacyLedger("u")
    try:
        with _AdamWGrads() as seen:
            train_local(model, zero, client, ClientTask(1, steps, batch, 0.0, seed=3), cfg.privacy, ledger,
                        physical_batch_size=micro)
    finally:
        hook.remove()
    assert len(seen.steps) == steps and ledger.steps == steps  # one step (and one noise draw) per logical batch
    assert max(seen_sizes) <= micro and len(seen_sizes) > steps  # every forward is a micro-batch
    per_step = np.stack([torch.cat([g.flatten() for g in s]).double().numpy() for s in seen.steps])  # [S, P]
    _check_gaussian(per_step, SIGMA * CLIP / ebs, "micro-batched noise")
    assert np.abs(np.corrcoef(per_step)[np.triu_indices(steps, 1)]).max() < 0.15


@pytest.mark.parametrize("dp", [True, False])
def test_micro_batches_give_the_same_update_as_the_whole_batch(setup, dp):
    """Same Poisson batches, same per-sample clipping, same noise draw: only the summation order differs
    (float rounding, which AdamW's normalisation can lift to ~1e-6 of updates ~1e-2)."""
    cfg, model, datas, zero = setup
    gen = torch.Generator().manual_seed(9)
    start = {k: 0.05 * torch.randn(v.shape, generator=gen) for k, v in zero.items()}  # A, B != 0: gradients flow
    task = ClientTask(1, 3, 12, 0.01, seed=4, noise_seed=5)
    privacy = cfg.privacy if dp else None
    whole = train_local(model, start, datas[1], task, privacy, PrivacyLedger("a") if dp else None)
    split = train_local(model, start, datas[1], task, privacy, PrivacyLedger("b") if dp else None,
                        physical_batch_size=5)
    assert whole.train_loss == pytest.approx(split.train_loss, rel=1e-5)
    diff = max((whole.adapter[k] - split.adapter[k]).abs().max().item() for k in start)
    assert diff < 2e-5, diff
    assert any(not torch.allclose(whole.adapter[k], start[k]) for k in start)  # it trained
