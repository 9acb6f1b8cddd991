"""Per-user model selection on the device's own data: which model should THIS user run?

Each device, after the federation, without touching its test chunks:
  1. holds out a validation slice of its *training* chunks (the tail of its already shuffled chunks);
     a device with too few chunks for a slice of ``personalization.validation_min_chunks`` keeps the global
     adapter (``Choice.reason`` says why): tokens of one chunk share their context, so one chunk says little
     about the next, and the per-token spread of step 6 underestimates that noise;
  2. scores the global adapter on that slice;
  3. fine-tunes the global adapter on the rest of its training chunks in segments up to each k of
     ``personalization.finetune_grid`` (DP-SGD continuing its own ledger, noise calibrated to what is left of
     its budget: ``fedtune.privacy.device_budget``), scoring after each k and stopping early once the score
     gets worse;
  4. scores interpolations α·personal + (1-α)·global of the best fine-tuned adapter and the global one, for α
     in ``personalization.alpha_grid`` (weight-space mixing of the two adapters, WiSE-FT style);
  5. with ``personalization.dual_adapters``: trains a private LoRA next to the frozen global one (FedDPA-style,
     ``fedtune.personalization.dual``) and scores the output mix α·private + (1-α)·global for α in
     ``alpha_grid`` + ``dual_train_alpha``; its DP-SGD steps share the device's personal budget with step 3;
  6. keeps the candidate with the lowest validation loss (ties go to the global adapter, then the simpler),
     but leaves the global adapter for it only if its gain is above the slice's own noise: the mean per-token
     loss difference to the global adapter on the slice, in paired standard errors (``significance``), must
     reach ``personalization.min_gain_z``. A one-chunk slice scores a model on ~100 tokens; a "gain" there is
     often noise, and a user whose test chunks disagree ends up worse than global. The threshold can be
     chosen on the tuning users (``tune_min_gain_zs``: ``fedtune.personalization.tuning``).
The choice and its score are the device's own state (``SelectionStore``); nothing is sent to the server.
Selection reads only the device's training data and the model stays on the device, so it releases nothing
beyond the DP-SGD steps its ledger already counts.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from fedtune.adapters import set_adapter_state
from fedtune.config import ExperimentConfig, PrivacyConfig
from fedtune.personalization.dual import applied
from fedtune.privacy.device_budget import (
    BudgetExceeded,
    DeviceTooSmall,
    calibrate,
    check_trainable,
    loader_sample_rate,
)
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.training import token_losses, train_local
from fedtune.types import AdapterState, ClientData, ClientTask
from fedtune.workspace import safe_filename

MIN_FIT_CHUNKS = 2  # DP-SGD needs at least two examples to train on


@dataclass(frozen=True)
class Choice:
    """One device's selected model and how it was chosen (device-local state)."""

    user: str
    candidate: str  # "global", "finetune", "mix" (weight space) or "dual" (dual adapters, output space)
    steps: int  # local fine-tuning steps behind the chosen adapter (0 for global)
    alpha: float  # weight of the fine-tuned / private adapter (0 = global, 1 = fine-tuned)
    val_loss: float | None  # the chosen model's validation loss; None without a validation slice
    global_val_loss: float | None
    validation_chunks: int
    scores: dict  # candidate label -> validation loss
    epsilon: float | None  # the device's ε after selection (None without DP)
    reason: str = ""  # why the global adapter was kept, if it was
    # the best candidate's validation gain over global in paired standard errors (``significance``), whether or
    # not it reached ``min_gain_z``; None without a search
    gain_z: float | None = None
    # the same gain in standard errors over the slice's chunks (``significance(..., chunks)``): recorded for
    # study next to ``gain_z``, not used for the choice
    gain_chunk_z: float | None = None

    @property
    def label(self) -> str:
        return {"global": "global", "finetune": f"finetune@{self.steps}",
                "mix": f"mix@{self.alpha:g}/k{self.steps}", "dual": f"dual@{self.alpha:g}/k{self.steps}"}[self.candidate]


def split_validation(data: ClientData, fraction: float, max_chunks: int, min_chunks: int = 1
                     ) -> tuple[ClientData, torch.Tensor] | None:
    """(data to fit on, validation chunks) from the TRAINING chunks only; None if too small for a slice of at
    least ``min_chunks`` that leaves ``MIN_FIT_CHUNKS`` to fit on."""
    n = data.num_train
    v = min(max_chunks, max(1, round(n * fraction)))
    if v < min_chunks or n - v < MIN_FIT_CHUNKS:
        return None
    fit = ClientData(user_id=data.user_id, train=data.train[: n - v], heldout=data.heldout[:0])
    return fit, data.train[n - v:]


def mix(personal: AdapterState, global_state: AdapterState, alpha: float) -> AdapterState:
    """α·personal + (1-α)·global, tensor by tensor."""
    return {k: alpha * personal[k] + (1 - alpha) * global_state[k] for k in global_state}


def personal_privacy(cfg: ExperimentConfig, fit: ClientData, steps: int, ledger: PrivacyLedger | None) -> PrivacyConfig:
    """The DP-SGD setting of this device's personal steps: noise calibrated so that the ledger's history plus
    ``steps`` more steps stays within the device's budget (``privacy.device_epsilon_budget``, else
    ``privacy.target_epsilon``; the federation's noise is calibrated to ``target_epsilon`` over all rounds, so
    a budget above it is what is left for personalization). Raises ``DeviceTooSmall``."""
    p = cfg.privacy
    budget = p.device_epsilon_budget or p.target_epsilon
    if not p.enabled or budget is None:
        return p
    q = loader_sample_rate(fit.num_train, cfg.train.batch_size)
    history = tuple(ledger.history) if ledger is not None else ()
    try:
        sigma = calibrate(q, steps, budget, p.delta, p.accountant, history)
    except BudgetExceeded as err:
        raise DeviceTooSmall(str(err)) from None
    check_trainable(fit.num_train, q, sigma, p.max_noise_to_batch, f"epsilon <= {budget} with "
                    f"{steps} personal steps after the federation")
    return p.model_copy(update={"noise_multiplier": sigma, "target_epsilon": None})


def significance(global_tokens: torch.Tensor, tokens: torch.Tensor, chunks: int = 0) -> float:
    """The mean per-token loss gain of a candidate over the global adapter on the same validation tokens, in
    standard errors of that mean (paired: token by token). inf for a gain without spread; 0 without a gain.
    With ``chunks`` (the slice's chunk count; equal-length chunks, in order) the units are the chunks' mean
    gains instead of single tokens (a cluster-robust error: tokens of one chunk share their context, so their
    gains are not independent); 0 for a one-chunk slice, which has no spread between chunks to measure."""
    diff = global_tokens - tokens
    if chunks:
        if chunks < 2:
            return 0.0
        diff = diff.reshape(chunks, -1).mean(dim=1)
    gain = float(diff.mean())
    spread = float(diff.std()) if diff.numel() > 1 else 0.0
    if gain <= 0:
        return 0.0
    return math.inf if spread == 0 else gain / (spread / math.sqrt(diff.numel()))


def _val(model, adapter: AdapterState, val: torch.Tensor, batch: int) -> float:
    """The validation loss: the mean of the per-token losses ``significance`` compares (one summation for all)."""
    set_adapter_state(model, adapter)
    return float(token_losses(model, val, batch).mean())


@dataclass
class _Device:
    """One device's selection in progress."""

    data: ClientData
    ledger: PrivacyLedger | None
    seed: int
    keep: Choice
    fit: ClientData | None = None
    val: torch.Tensor | None = None
    privacy: PrivacyConfig | None = None
    state: AdapterState | None = None
    prev: float = math.inf
    global_tokens: torch.Tensor | None = None  # the global adapter's per-token losses on the validation slice
    best: tuple[float, int, AdapterState] | None = None  # (validation loss, steps, adapter) of the best FT
    active: bool = True
    private: AdapterState | None = None  # the dual adapter's private LoRA, when trained packed


def _train_group(model, devs: list[_Device], steps: int, segment: int, cfg: ExperimentConfig, total: int,
                 pack: int) -> None:
    """``steps`` more DP-SGD steps for every device in ``devs`` (packed ``pack`` at a time), in place."""
    lr = cfg.personalization.finetune_lr or cfg.train.lr
    tasks = [ClientTask(server_round=0, local_steps=steps, batch_size=cfg.train.batch_size, lr=lr,
                        seed=(d.seed + 7919 * segment) % (2**31)) for d in devs]
    if pack <= 1:
        for d, task in zip(devs, tasks):
            d.state = train_local(model, d.state, d.fit, task, d.privacy, d.ledger, planned_steps=total,
                                  weight_decay=cfg.train.weight_decay,
                                  physical_batch_size=cfg.train.physical_batch_size).adapter
        return
    from fedtune.packed import train_packed

    dp = cfg.privacy.enabled
    for i in range(0, len(devs), pack):
        group = devs[i:i + pack]
        updates = train_packed(model, [d.state for d in group], [d.fit for d in group], tasks[i:i + pack],
                               cfg.privacy.model_copy(update={"target_epsilon": None}) if dp else cfg.privacy,
                               [d.ledger for d in group] if dp else None, planned_steps=total,
                               weight_decay=cfg.train.weight_decay,
                               noise_multipliers=[d.privacy.noise_multiplier for d in group] if dp else None)
        for d, u in zip(group, updates):
            d.state = u.adapter


def select_models(model, global_state: AdapterState, datas: list[ClientData], cfg: ExperimentConfig,
                  ledgers: list[PrivacyLedger | None], seeds: list[int], pack: int = 1
                  ) -> list[tuple[AdapterState, Choice]]:
    """Steps 1-5 of the module docstring for each device (the k-step segments trained ``pack`` devices at a
    time on the packed engine when ``pack`` > 1; each device's result is its own either way)."""
    per, dp, bs = cfg.personalization, cfg.privacy.enabled, cfg.train.eval_batch_size
    grid = sorted(set(per.finetune_grid))
    devs = []
    for data, ledger, seed in zip(datas, ledgers, seeds):
        eps = (ledger.epsilon(cfg.privacy.delta) if ledger is not None and ledger.history else 0.0) if dp else None
        keep = Choice(user=data.user_id, candidate="global", steps=0, alpha=0.0, val_loss=None,
                      global_val_loss=None, validation_chunks=0, scores={}, epsilon=eps)
        d = _Device(data, ledger, seed, keep, state=global_state)
        devs.append(d)
        split = split_validation(data, per.validation_fraction, per.validation_max_chunks, per.validation_min_chunks)
        if split is None:
            d.keep, d.active = replace(keep, reason=f"{data.num_train} training chunks: too few to hold out a "
                                                    f"validation slice of at least {per.validation_min_chunks} "
                                                    f"(personalization.validation_min_chunks) and keep "
                                                    f"{MIN_FIT_CHUNKS} to train on"), False
            continue
        d.fit, d.val = split
        set_adapter_state(model, global_state)
        d.global_tokens = token_losses(model, d.val, bs)
        d.prev = float(d.global_tokens.mean())
        d.keep = replace(keep, val_loss=d.prev, global_val_loss=d.prev, validation_chunks=int(d.val.shape[0]),
                         scores={"global": d.prev})
        try:  # one calibration for every personal step: the search's and the dual adapter's
            d.privacy = personal_privacy(cfg, d.fit, grid[-1] + dual_budget_steps(cfg), ledger)
        except DeviceTooSmall as err:
            d.keep, d.active = replace(d.keep, reason=str(err)), False
    done = 0
    for i, k in enumerate(grid):
        active = [d for d in devs if d.active]
        if not active:
            break
        _train_group(model, active, k - done, i, cfg, grid[-1] + dual_budget_steps(cfg), pack)
        done = k
        for d in active:
            loss = _val(model, d.state, d.val, bs)
            d.keep.scores[f"finetune@{k}"] = loss
            if d.best is None or loss < d.best[0]:
                d.best = (loss, k, d.state)
            if loss > d.prev:  # early stopping: the validation loss got worse
                d.active = False
            d.prev = loss
    if per.dual_adapters and pack > 1:
        _train_duals_packed(model, [d for d in devs if d.best is not None], global_state, cfg, pack)
    return [_choose(model, d, global_state, cfg) for d in devs]


def _dual_task(d: _Device, cfg: ExperimentConfig, ft_steps: int) -> ClientTask:
    per = cfg.personalization
    return ClientTask(server_round=0, local_steps=per.dual_steps or ft_steps, batch_size=cfg.train.batch_size,
                      lr=per.finetune_lr or cfg.train.lr, seed=(d.seed + 104729) % (2**31))


def _train_duals_packed(model, devs: list[_Device], global_state: AdapterState, cfg: ExperimentConfig,
                        pack: int) -> None:
    """Every device's private dual LoRA, ``pack`` at a time, grouped by step count (each the one it trains alone:
    same task, ledger and noise; ``fedtune.personalization.dual.train_private_packed``)."""
    from fedtune.personalization.dual import train_private_packed

    groups: dict[int, list[tuple[_Device, ClientTask]]] = {}
    for d in devs:
        task = _dual_task(d, cfg, d.best[1])
        groups.setdefault(task.local_steps, []).append((d, task))
    for _, group in sorted(groups.items()):
        privates = train_private_packed(model, global_state, [d.fit for d, _ in group], [t for _, t in group],
                                        [d.privacy for d, _ in group], [d.ledger for d, _ in group],
                                        cfg.personalization.dual_train_alpha, pack, cfg.train.weight_decay)
        for (d, _), private in zip(group, privates):
            d.private = private


def dual_budget_steps(cfg: ExperimentConfig) -> int:
    """The personal DP-SGD steps set aside for the dual adapter (0 without it): ``dual_steps``, else the
    grid's largest k (the search's best k, which it trains, is at most that)."""
    per = cfg.personalization
    return (per.dual_steps or max(per.finetune_grid)) if per.dual_adapters else 0


def _dual_candidates(model, d: _Device, global_state: AdapterState, cfg: ExperimentConfig, ft_steps: int
                     ) -> tuple[int, list[tuple]]:
    """(steps, candidates) of the dual adapter: the private LoRA trained on the fit chunks next to the frozen
    global one, then scored on the validation slice at each α (``fedtune.personalization.dual``)."""
    from fedtune.personalization.dual import DualAdapters, dual_losses, train_private

    per = cfg.personalization
    task = _dual_task(d, cfg, ft_steps)
    private = d.private
    if private is None:  # one device at a time (``_train_duals_packed`` trains them packed)
        private = train_private(model, global_state, d.fit, task, d.privacy, d.ledger, per.dual_train_alpha,
                                planned_steps=task.local_steps, weight_decay=cfg.train.weight_decay,
                                physical_batch_size=cfg.train.physical_batch_size)
    alphas = sorted(set(per.alpha_grid) | {per.dual_train_alpha})
    cands = []
    for a, loss in dual_losses(model, global_state, private, alphas, d.val, cfg.train.eval_batch_size).items():
        d.keep.scores[f"dual@{a:g}"] = loss
        cands.append((loss, 3, "dual", a, DualAdapters(global_state, private, a)))
    return task.local_steps, cands


def _choose(model, d: _Device, global_state: AdapterState, cfg: ExperimentConfig) -> tuple[AdapterState, Choice]:
    """The device's pick (step 6); for ``dual`` the returned model is a ``DualAdapters`` (``dual.applied`` runs
    it)."""
    if d.best is None:  # no search: the device keeps the global adapter (``Choice.reason`` says why)
        return global_state, d.keep
    ft_loss, ft_steps, ft_state = d.best
    scores = d.keep.scores
    cands = [(scores["global"], 0, "global", 0.0, global_state), (ft_loss, 1, "finetune", 1.0, ft_state)]
    for a in sorted(set(cfg.personalization.alpha_grid)):
        mixed = mix(ft_state, global_state, a)
        loss = _val(model, mixed, d.val, cfg.train.eval_batch_size)
        scores[f"mix@{a:g}"] = loss
        cands.append((loss, 2, "mix", a, mixed))
    dual_steps = 0
    if cfg.personalization.dual_adapters:
        dual_steps, dual = _dual_candidates(model, d, global_state, cfg, ft_steps)
        cands += dual
    loss, _, cand, alpha, chosen = min(cands, key=lambda c: (c[0], c[1]))
    eps = d.ledger.epsilon(cfg.privacy.delta) if cfg.privacy.enabled and d.ledger is not None else None
    steps = {"global": 0, "dual": dual_steps}.get(cand, ft_steps)
    pick = replace(d.keep, candidate=cand, steps=steps, alpha=alpha, val_loss=loss, scores=scores, epsilon=eps)
    if cand == "global":
        return chosen, replace(pick, gain_z=0.0, gain_chunk_z=0.0)
    with applied(model, chosen):
        tokens = token_losses(model, d.val, cfg.train.eval_batch_size)
    z, zc = significance(d.global_tokens, tokens), significance(d.global_tokens, tokens, int(d.val.shape[0]))
    need = cfg.personalization.min_gain_z
    if z >= need:
        return chosen, replace(pick, gain_z=z, gain_chunk_z=zc)
    why = (f"{pick.label}'s validation gain over global ({d.keep.global_val_loss - loss:.4f} nats/token on "
           f"{d.global_tokens.numel()} tokens) is {z:.2f} standard errors, below personalization.min_gain_z={need:g}")
    return global_state, replace(d.keep, epsilon=eps, scores=scores, gain_z=z, gain_chunk_z=zc, reason=why)


def select_model(model, global_state: AdapterState, data: ClientData, cfg: ExperimentConfig,
                 ledger: PrivacyLedger | None, seed: int) -> tuple[AdapterState, Choice]:
    """One device's selection (``select_models`` for a fleet of one)."""
    return select_models(model, global_state, [data], cfg, [ledger], [seed])[0]


class SelectionStore:
    """Each device's ``Choice``, one JSON file per device in its own state directory (never sent)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def save(self, choice: Choice) -> None:
        path = self.directory / f"{safe_filename(choice.user)}.json"
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(choice), f)
        os.replace(tmp, path)

    def load(self, user: str) -> Choice | None:
        path = self.directory / f"{safe_filename(user)}.json"
        return Choice(**json.loads(path.read_text())) if path.is_file() else None
