"""The packed fleet engine: K virtual devices train at once on one model, each with its own adapter,
AdamW state, data, Poisson sampling, clipping and noise, and each returns the update it would have
returned training alone (``fedtune.training.train_local``).

One round of a group, as data:
  1. Borrow the worker's peft LoRA model as a packed model (``packed_lora``): every LoRA linear becomes
     a packed layer with A [K, r, in] and B [K, out, r] around the same shared base layer.
  2. Load device k's incoming adapter into slot k; one AdamW over the stacked tensors (AdamW is
     elementwise, so slot k follows exactly device k's own AdamW).
  3. Each step, draw every device's batch from its own seeded stream (``DeviceBatches``) and concatenate
     them into one batch [N, T] with the device of each sample; forward and backward in micro-batches.
  4. Without DP each sample's loss is weighted by 1 / (its device's batch size), so the gradient of
     slot k is device k's mean-loss gradient. With DP the packed layers keep exact per-sample
     gradients; each device clips, sums, adds its own seeded noise and divides by its expected batch
     size (``grad_sample``), and its accountant takes the step (empty batches are noise-only steps).
  5. Return K ClientUpdates keyed like ``get_adapter_state``; each ledger gets the round's history.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from fedtune.config import PrivacyConfig
from fedtune.packed.grad_sample import DeviceNoise, clipped_sums, noised_grads
from fedtune.packed.model import FrozenBranch, PackedModel, packed_lora
from fedtune.packed.sampling import DeviceBatches
from fedtune.privacy.csprng import as_stream
from fedtune.privacy.dpsgd import resolve_noise
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.training.attention import training_attention
from fedtune.types import AdapterState, ClientData, ClientTask, ClientUpdate


def _check_group(adapters, datas, tasks, dp: bool, ledgers) -> None:
    k = len(adapters)
    if k == 0 or len(datas) != k or len(tasks) != k:
        raise ValueError(f"a packed group needs one adapter, data and task per device; got {len(adapters)} "
                         f"adapters, {len(datas)} data, {len(tasks)} tasks")
    if dp and (ledgers is None or len(ledgers) != k):
        raise ValueError(f"DP training needs each device's privacy ledger: {k} devices, "
                         f"{0 if ledgers is None else len(ledgers)} ledgers")
    for name in ("local_steps", "lr", "server_round"):
        values = sorted({getattr(t, name) for t in tasks})
        if len(values) > 1:
            raise ValueError(f"devices packed into one group must share task.{name}; got {values}: "
                             f"group devices by {name} before packing")


def _per_sample_loss(lm, x: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence (what HF's loss averages over a batch). [n]"""
    logits = lm(input_ids=x, use_cache=False).logits  # [n, T, V]
    n, t, v = logits.shape
    tok = F.cross_entropy(logits[:, :-1].float().reshape(-1, v), x[:, 1:].reshape(-1), reduction="none")
    return tok.view(n, t - 1).mean(1)  # [n]


def _forward_backward(pm: PackedModel, x: torch.Tensor, dev: torch.Tensor, weight: torch.Tensor,
                      micro_batch: int | None) -> torch.Tensor:
    """Backward of sum_i weight_i * loss_i over the packed batch, in micro-batches; returns loss_i [N]."""
    n = x.shape[0]
    step = micro_batch or n
    losses = []
    for s in range(0, n, step):
        pm.batch.dev = dev[s:s + step]
        with training_attention(x.device):
            loss = _per_sample_loss(pm.lm, x[s:s + step])  # [n_mb]
        (loss * weight[s:s + step]).sum().backward()
        losses.append(loss.detach())
    pm.batch.dev = None
    return torch.cat(losses)


def train_packed(
    model,
    adapters: Sequence[AdapterState],
    datas: Sequence[ClientData],
    tasks: Sequence[ClientTask],
    privacy: PrivacyConfig | None = None,
    ledgers: Sequence[PrivacyLedger] | None = None,
    planned_steps: int | None = None,
    weight_decay: float = 0.0,
    micro_batch: int | None = None,
    noise_multipliers: Sequence[float] | None = None,
    frozen: FrozenBranch | None = None,
) -> list[ClientUpdate]:
    """Train K devices packed on ``model`` (the worker's peft LoRA model); one ClientUpdate per device.
    ``noise_multipliers`` (one per device) replace ``privacy``'s noise when each device was calibrated apart
    (``fedtune.personalization.select``: what is left of each device's own budget). ``frozen``: a LoRA branch
    shared by all K, frozen beside the ones they train (dual adapters, ``fedtune.personalization.dual``); only
    the devices' own branches have gradients, so clipping, noise and accounting are per device as without it."""
    dp = privacy is not None and privacy.enabled
    _check_group(adapters, datas, tasks, dp, ledgers)
    if micro_batch is not None and micro_batch < 1:
        raise ValueError(f"micro_batch must be a positive number of sequences, got {micro_batch}")
    k_dev, steps, lr = len(adapters), tasks[0].local_steps, tasks[0].lr
    streams = [DeviceBatches(d, t, dp) for d, t in zip(datas, tasks)]
    with packed_lora(model, k_dev, frozen) as pm:
        pm.load(list(adapters))
        params = [p for _, p in pm.params_in_order()]
        device = params[0].device
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        pm.lm.train()
        pm.batch.per_sample = dp
        noise, accountants = [], []
        if dp:
            from opacus.accountants import create_accountant

            for k, (s, t, ledger) in enumerate(zip(streams, tasks, ledgers)):
                if t.streams is not None:  # a deployed device: its secret CSPRNG noise stream
                    gen = t.streams[1]
                else:  # a simulation: a torch generator, apart from the sampler's
                    gen = torch.Generator(device=device)
                    gen.manual_seed(t.noise_seed)
                sigma = (float(noise_multipliers[k]) if noise_multipliers is not None
                         else resolve_noise(privacy, s.sample_rate, planned_steps or steps))
                noise.append(DeviceNoise(sigma, s.expected_batch_size, gen))
                acc = create_accountant(privacy.accountant)
                acc.history = [tuple(h) for h in ledger.history]
                accountants.append(acc)
        loss_sum = torch.zeros(k_dev, dtype=torch.float64)  # per device: sum of step losses
        loss_steps = torch.zeros(k_dev, dtype=torch.float64)
        tokens = [0] * k_dev
        for _ in range(steps):
            xs = [s.next() for s in streams]  # K x [b_k, T]
            sizes = torch.tensor([x.shape[0] for x in xs])  # [K]
            dev = torch.repeat_interleave(torch.arange(k_dev), sizes)  # [N]
            if dev.numel() > 0:
                x = torch.cat(xs).to(device)  # [N, T]
                w = torch.ones(dev.shape[0]) if dp else 1.0 / sizes[dev].double()
                losses = _forward_backward(pm, x, dev.to(device), w.to(device, torch.float32), micro_batch)
                per_dev = torch.zeros(k_dev, dtype=torch.float64).index_add_(0, dev, losses.double().cpu())
                has = sizes > 0
                loss_sum[has] += per_dev[has] / sizes[has]
                loss_steps[has] += 1
                for k, x_k in enumerate(xs):
                    tokens[k] += x_k.numel()
            if dp:
                _private_grads(pm, params, noise, privacy.max_grad_norm, k_dev)
                for acc, n, s in zip(accountants, noise, streams):
                    acc.step(noise_multiplier=n.noise_multiplier, sample_rate=s.sample_rate)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        states = pm.states()
    updates = []
    for k in range(k_dev):
        epsilon = delta = None
        metrics: dict[str, float] = {}
        if dp:
            ledgers[k].history = [tuple(h) for h in accountants[k].history]
            ledgers[k].rounds.append(tasks[k].server_round)
            epsilon, delta = ledgers[k].epsilon(privacy.delta), privacy.delta
            metrics = {"noise_multiplier": noise[k].noise_multiplier, "sample_rate": streams[k].sample_rate}
        train_loss = float(loss_sum[k] / loss_steps[k]) if loss_steps[k] > 0 else math.nan
        updates.append(ClientUpdate(adapter=states[k], num_examples=datas[k].num_train, train_loss=train_loss,
                                    epsilon=epsilon, delta=delta, steps=steps, tokens=tokens[k], metrics=metrics,
                                    noise_generator=as_stream(noise[k].generator).name if dp else None))
    return updates


def _private_grads(pm: PackedModel, params: list[torch.nn.Parameter], noise: list[DeviceNoise],
                   max_grad_norm: float, k_dev: int) -> None:
    """Set each stacked parameter's .grad to every device's clipped, noised, scaled gradient."""
    samples = []
    for layer in pm.layers.values():
        if layer.grad_samples:
            dev, ps_A, ps_B = layer.take_grad_samples()
            samples += [(dev, ps_A), (dev, ps_B)]
        else:  # every device's Poisson batch was empty: a noise-only step
            empty = torch.zeros(0, dtype=torch.long, device=layer.lora_A.device)
            samples += [(empty, layer.lora_A.new_zeros((0, *layer.lora_A.shape[1:]))),
                        (empty, layer.lora_B.new_zeros((0, *layer.lora_B.shape[1:])))]
    sums = clipped_sums(samples, k_dev, max_grad_norm)
    for p, g in zip(params, noised_grads(sums, noise, max_grad_norm)):
        p.grad = g
