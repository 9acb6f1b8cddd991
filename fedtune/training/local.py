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
) -> ClientUpdate:
    """Train the adapter for ``task.local_steps`` steps; with ``privacy.enabled``, by DP-SGD.

    ``loss_chunk_tokens`` and ``gradient_checkpointing`` trade nothing / one extra forward for memory
    (``fedtune.training.loss``, ``fedtune.training.checkpointing``); the result is the same.
    ``checkpoint_every_n_layers`` > 1 checkpoints only every n-th decoder layer (less recompute, more memory).
    """
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
                               planned_steps or task.local_steps, task.noise_seed)
        optimizer, loader = private.optimizer, private.loader
    device = params[0].device
    losses, tokens = [], 0
    try:
        for x in _batches(loader, task.local_steps):
            if x.shape[0] == 0:
                private.noise_only_step()  # an empty Poisson batch is still a DP step: noise only
                continue
            x = x.to(device)  # [B, T]
            with training_attention(device):
                loss = causal_lm_loss(model, x, loss_chunk_tokens)  # opacus' hooks sit on model's layers
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())  # read back once at the end: no device sync per step
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
    )
