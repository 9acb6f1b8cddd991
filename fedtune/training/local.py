"""One device's local training: (model, adapter state, data, task, privacy) -> ClientUpdate.

The model is the worker's cached base with its adapter attached; the incoming adapter state fully
overwrites the trainable tensors, so nothing leaks from the previous client that used the worker.
"""

from __future__ import annotations

import logging
import math

import torch

from fedtune.adapters import get_adapter_state, set_adapter_state
from fedtune.config import PrivacyConfig
from fedtune.privacy.dpsgd import make_private
from fedtune.training.attention import training_attention
from fedtune.training.checkpointing import set_gradient_checkpointing
from fedtune.training.loss import causal_lm_loss
from fedtune.training.memory import release_freed_heap
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.types import AdapterState, ClientData, ClientTask, ClientUpdate

log = logging.getLogger(__name__)


def _batches(loader, steps: int):
    """Yield exactly ``steps`` batches, cycling the loader."""
    done = 0
    while done < steps:
        for (batch,) in loader:
            yield batch
            done += 1
            if done == steps:
                return


def _logical_step(model, optimizer, x: torch.Tensor, device, loss_chunk_tokens: int | None, micro: int | None,
                  dp: bool) -> torch.Tensor:
    """One optimizer step on the logical batch ``x`` [B, T], in micro-batches of at most ``micro`` sequences;
    returns its mean loss. Under DP every micro-batch's per-sample gradients are clipped and summed by opacus
    (``signal_skip_step``: no noise, no step, no accountant step until the last one), then noise is added once
    to the sum and divided by the expected logical batch: the same step as the whole batch at once. Without
    DP the micro-batch losses are weighted by their share of the batch and their gradients accumulate."""
    parts = x.split(micro) if micro else (x,)
    total = torch.zeros((), device=device)
    for i, part in enumerate(parts):
        part = part.to(device)  # [b, T]
        with training_attention(device):
            loss = causal_lm_loss(model, part, loss_chunk_tokens)  # opacus' hooks sit on model's layers
        share = part.shape[0] / x.shape[0]
        if dp:
            optimizer.signal_skip_step(do_skip=i < len(parts) - 1)
            loss.backward()
            optimizer.step()  # clip + accumulate; on the last micro-batch: noise, scale, step, accountant
            optimizer.zero_grad(set_to_none=True)  # keeps opacus' summed_grad while the step is skipped
        else:
            (loss * share if len(parts) > 1 else loss).backward()
        total = total + loss.detach() * share
    if not dp:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return total


def train_local(
    model,
    adapter: AdapterState,
    data: ClientData,
    task: ClientTask,
    privacy: PrivacyConfig | None = None,
    ledger: PrivacyLedger | None = None,
    planned_steps: int | None = None,
    weight_decay: float = 0.0,
    loss_chunk_tokens: int | None = None,
    gradient_checkpointing: bool = False,
    checkpoint_every_n_layers: int = 1,
    physical_batch_size: int | None = None,
) -> ClientUpdate:
    """Train the adapter for ``task.local_steps`` steps; with ``privacy.enabled``, by DP-SGD.

    ``loss_chunk_tokens`` and ``gradient_checkpointing`` trade nothing / one extra forward for memory
    (``fedtune.training.loss``, ``fedtune.training.checkpointing``); the result is the same.
    ``checkpoint_every_n_layers`` > 1 checkpoints only every n-th decoder layer (less recompute, more memory).
    ``physical_batch_size`` splits each logical batch (``task.batch_size``; Poisson under DP) into micro-batches
    of at most that many sequences with gradient accumulation (``_logical_step``): memory of the micro-batch,
    the DP step of the logical batch.
    """
    if physical_batch_size is not None and physical_batch_size < 1:
        raise ValueError(f"physical_batch_size must be a positive number of sequences, got {physical_batch_size}")
    if data.num_train == 0:
        raise ValueError(f"client {data.user_id} has no training chunks")
    dp = privacy is not None and privacy.enabled
    if dp and ledger is None:
        raise ValueError("DP training needs the client's privacy ledger (its accountant history)")
    set_adapter_state(model, adapter)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable adapter parameters")
    set_gradient_checkpointing(model, gradient_checkpointing, checkpoint_every_n_layers)
    model.train()
    optimizer = torch.optim.AdamW(params, lr=task.lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(task.seed)
    dataset = torch.utils.data.TensorDataset(data.train)
    batch_size = min(task.batch_size, data.num_train)
    # fixed-size batches without DP; with DP opacus replaces this by Poisson sampling (rate B/N)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen,
                                         drop_last=not dp)
    private = None
    if dp:
        private = make_private(model, optimizer, loader, privacy, ledger,
                               planned_steps or task.local_steps, task.noise_seed, task.streams)
        optimizer, loader = private.optimizer, private.loader
    device = params[0].device
    losses, tokens = [], 0
    try:
        for x in _batches(loader, task.local_steps):
            if x.shape[0] == 0:
                private.noise_only_step()  # an empty Poisson batch is still a DP step: noise only
                continue
            loss = _logical_step(model, optimizer, x, device, loss_chunk_tokens, physical_batch_size, dp)  # x: [B, T]
            losses.append(loss)  # read back once at the end: no device sync per step
            tokens += x.numel()
    finally:
        if private is not None:
            private.close(ledger, task.server_round)
    train_loss = torch.stack(losses).double().mean().item() if losses else math.nan
    if device.type == "cpu":  # a long-lived worker would otherwise keep this call's peak heap for good
        release_freed_heap()
    epsilon = ledger.epsilon(privacy.delta) if dp else None
    metrics = {"noise_multiplier": private.noise_multiplier, "sample_rate": private.sample_rate} if dp else {}
    return ClientUpdate(
        adapter=get_adapter_state(model),
        num_examples=data.num_train,
        train_loss=train_loss,
        epsilon=epsilon,
        delta=privacy.delta if dp else None,
        steps=task.local_steps,
        tokens=tokens,
        metrics=metrics,
        noise_generator=getattr(private, "noise_generator", None) if dp else None,
    )
