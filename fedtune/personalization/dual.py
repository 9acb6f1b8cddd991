"""FedDPA-style dual adapters on one device: the frozen global LoRA and a private LoRA, side by side.

Both are peft adapters on the same modules, both active; their outputs are mixed per user:

    h = W x + α · s B_p A_p x + (1 - α) · s B_g A_g x          # s = lora_alpha / r, per layer

  - ``default`` (the model's own, trainable adapter) holds the PRIVATE part during dual training, so
    ``train_local`` (DP-SGD, the device's ledger) trains it unchanged and its state keys are the usual ones;
  - ``dual_global`` is a second, frozen adapter holding the global state for as long as the context is open;
  - the mix is peft's per-adapter ``scaling``: α·s on ``default``, (1 - α)·s on ``dual_global``. At α = 0 the
    private branch is multiplied by zero and the output is the global model's, bit for bit.

The private adapter starts as a copy of the global one (so at any α the model starts as the global model),
is trained at ``personalization.dual_train_alpha`` with the global branch frozen, and α is chosen per user on
the validation slice (``fedtune.personalization.select``). Everything here runs on the device and is undone
when the context closes (the model's adapters, scalings and ``requires_grad`` flags as they were): the private
adapter and α are device state only and never reach an upload.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from fedtune.adapters import set_adapter_state
from fedtune.training import evaluate_chunks
from fedtune.types import AdapterState

FROZEN = "dual_global"


@dataclass(frozen=True)
class DualAdapters:
    """A device's dual-adapter model: the global state, its private state and its mixing weight α."""

    global_state: AdapterState
    private: AdapterState
    alpha: float


def _lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise ValueError("dual adapters need a LoRA adapter (adapter.method lora or ffa_lora); this model has no "
                         "LoRA layers: set personalization.dual_adapters: false")
    return layers


@contextmanager
def dual_model(model, global_state: AdapterState, alpha: float) -> Iterator[Callable[[float], None]]:
    """Within the context: ``global_state`` frozen in a second adapter at weight 1 - α, the model's own
    (trainable) adapter at weight α. The caller loads the private state (``set_adapter_state``); the context
    yields a function that sets another α without rebuilding the second adapter."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"the dual-adapter mixing weight must lie in [0, 1], got {alpha}")
    layers = _lora_layers(model)
    set_adapter_state(model, global_state)  # the frozen branch is a copy of the global adapter
    flags = {id(p): p.requires_grad for p in model.parameters()}
    scales = [dict(m.scaling) for m in layers]
    model.add_adapter(FROZEN, copy.deepcopy(model.peft_config["default"]))
    try:
        with torch.no_grad():
            for m in layers:
                for part in ("lora_A", "lora_B"):
                    getattr(m, part)[FROZEN].weight.copy_(getattr(m, part)["default"].weight)
        model.base_model.set_adapter(["default", FROZEN])
        for p in model.parameters():  # peft turned on every active adapter's grads: restore, freeze the copy
            p.requires_grad_(flags.get(id(p), False))

        def set_alpha(a: float) -> None:
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"the dual-adapter mixing weight must lie in [0, 1], got {a}")
            for m, s in zip(layers, scales):
                m.scaling["default"] = a * s["default"]
                m.scaling[FROZEN] = (1.0 - a) * s["default"]

        set_alpha(alpha)
        yield set_alpha
    finally:
        model.base_model.set_adapter("default")
        model.delete_adapter(FROZEN)
        for m, s in zip(layers, scales):
            m.scaling.clear()
            m.scaling.update(s)
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), False))


@contextmanager
def applied(model, chosen: AdapterState | DualAdapters) -> Iterator[None]:
    """The model running ``chosen``: one adapter state, or a dual-adapter model (undone on exit)."""
    if not isinstance(chosen, DualAdapters):
        set_adapter_state(model, chosen)
        yield
        return
    with dual_model(model, chosen.global_state, chosen.alpha):
        set_adapter_state(model, chosen.private)
        yield


def dual_loss(model, dual: DualAdapters, chunks: torch.Tensor, batch_size: int) -> float:
    with applied(model, dual):
        return evaluate_chunks(model, chunks, batch_size).loss


def dual_losses(model, global_state: AdapterState, private: AdapterState, alphas: list[float],
                chunks: torch.Tensor, batch_size: int) -> dict[float, float]:
    """{α: loss of the dual model at α on ``chunks``}: ``dual_loss`` for each α, the adapters set up once."""
    out = {}
    with dual_model(model, global_state, alphas[0]) as set_alpha:
        set_adapter_state(model, private)
        for a in alphas:
            set_alpha(a)
            out[a] = evaluate_chunks(model, chunks, batch_size).loss
    return out


def train_private(model, global_state: AdapterState, fit, task, privacy, ledger, alpha: float, **train_kwargs
                  ) -> AdapterState:
    """The private adapter after ``task.local_steps`` steps of ``train_local`` (DP-SGD on ``ledger`` when
    ``privacy`` is on) at mixing weight ``alpha``, the global branch frozen; it starts as the global state."""
    from fedtune.training import train_local

    with dual_model(model, global_state, alpha):
        return train_local(model, global_state, fit, task, privacy, ledger, **train_kwargs).adapter


def train_private_packed(model, global_state: AdapterState, fits: list, tasks: list, privacies: list, ledgers: list,
                         alpha: float, pack: int, weight_decay: float = 0.0) -> list[AdapterState]:
    """``train_private`` for many devices, ``pack`` at a time on the packed engine: the global branch, the same
    for every device, is a frozen branch of the packed layers (``fedtune.packed.FrozenBranch``; it never touches
    the base weights, so a quantized base works as it does alone) and each device trains its own private LoRA
    with its own sampling, clipping, noise (``privacies[i].noise_multiplier``) and ledger. Every task must have
    the same ``local_steps`` (group devices by steps first). One private state per device, in order."""
    from fedtune.packed import FrozenBranch, train_packed

    if len({t.local_steps for t in tasks}) > 1:
        raise ValueError("packed dual training needs one step count per group; group devices by local_steps")
    dp = bool(privacies) and privacies[0].enabled
    out: list[AdapterState] = []
    for i in range(0, len(fits), pack):
        n = len(fits[i:i + pack])
        updates = train_packed(model, [global_state] * n, fits[i:i + pack], tasks[i:i + pack],
                               privacies[0].model_copy(update={"target_epsilon": None}) if dp else privacies[0],
                               ledgers[i:i + pack] if dp else None, planned_steps=tasks[i].local_steps,
                               weight_decay=weight_decay,
                               noise_multipliers=[p.noise_multiplier for p in privacies[i:i + pack]] if dp else None,
                               frozen=FrozenBranch(global_state, alpha))
        out += [u.adapter for u in updates]
    return out
