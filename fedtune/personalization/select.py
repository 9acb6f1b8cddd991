"""Per-user model selection on the device's own data: which model should THIS user run?

Each device, after the federation, without touching its test chunks:
  1. holds out a validation slice of its *training* chunks (the tail of its already shuffled chunks);
     a device with too few chunks for a slice keeps the global adapter (``Choice.reason`` says why);
  2. scores the global adapter on that slice;
  3. fine-tunes the global adapter on the rest of its training chunks in segments up to each k of
     ``personalization.finetune_grid`` (DP-SGD continuing its own ledger, noise calibrated to what is left of
     its budget: ``fedtune.privacy.device_budget``), scoring after each k and stopping early once the score
     gets worse;
  4. scores interpolations α·personal + (1-α)·global of the best fine-tuned adapter and the global one, for α
     in ``personalization.alpha_grid`` (weight-space mixing of the two adapters, WiSE-FT style);
  5. keeps the candidate with the lowest validation loss (ties go to the global adapter).
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
from fedtune.privacy.device_budget import BudgetExceeded, DeviceTooSmall, calibrate, check_trainable
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.training import evaluate_chunks, train_local
from fedtune.types import AdapterState, ClientData, ClientTask
from fedtune.workspace import safe_filename

MIN_FIT_CHUNKS = 2  # DP-SGD needs at least two examples to train on


@dataclass(frozen=True)
class Choice:
    """One device's selected model and how it was chosen (device-local state)."""

    user: str
    candidate: str  # "global", "finetune" or "mix"
    steps: int  # local fine-tuning steps behind the chosen adapter (0 for global)
    alpha: float  # weight of the fine-tuned adapter (0 = global, 1 = fine-tuned)
    val_loss: float | None  # the chosen model's validation loss; None without a validation slice
    global_val_loss: float | None
    validation_chunks: int
    scores: dict  # candidate label -> validation loss
    epsilon: float | None  # the device's ε after selection (None without DP)
    reason: str = ""  # why the global adapter was kept without a search, if it was

    @property
    def label(self) -> str:
        return {"global": "global", "finetune": f"finetune@{self.steps}",
                "mix": f"mix@{self.alpha:g}/k{self.steps}"}[self.candidate]


def split_validation(data: ClientData, fraction: float, max_chunks: int) -> tuple[ClientData, torch.Tensor] | None:
    """(data to fit on, validation chunks) from the TRAINING chunks only; None if too small for a slice."""
    n = data.num_train
    v = min(max_chunks, max(1, round(n * fraction)))
    if n - v < MIN_FIT_CHUNKS:
        return None
    fit = ClientData(user_id=data.user_id, train=data.train[: n - v], heldout=data.heldout[:0])
    return fit, data.train[n - v:]


def mix(personal: AdapterState, global_state: AdapterState, alpha: float) -> AdapterState:
    """α·personal + (1-α)·global, tensor by tensor."""
    return {k: alpha * personal[k] + (1 - alpha) * global_state[k] for k in global_state}


def _loader_rate(num_examples: int, batch_size: int) -> float:
    """The Poisson rate opacus uses for train_local's loader (1 / number of batches)."""
    return 1.0 / math.ceil(num_examples / min(batch_size, num_examples))


def personal_privacy(cfg: ExperimentConfig, fit: ClientData, steps: int, ledger: PrivacyLedger | None) -> PrivacyConfig:
    """The DP-SGD setting of this device's personal steps: with ``privacy.target_epsilon``, noise calibrated
    so that the ledger's history plus ``steps`` more steps stays within the target. Raises ``DeviceTooSmall``."""
    p = cfg.privacy
    if not p.enabled or p.target_epsilon is None:
        return p
    q = _loader_rate(fit.num_train, cfg.train.batch_size)
    history = tuple(ledger.history) if ledger is not None else ()
    try:
        sigma = calibrate(q, steps, p.target_epsilon, p.delta, p.accountant, history)
    except BudgetExceeded as err:
        raise DeviceTooSmall(str(err)) from None
    check_trainable(fit.num_train, q, sigma, p.max_noise_to_batch, f"epsilon <= {p.target_epsilon} with "
                    f"{steps} personal steps after the federation")
    return p.model_copy(update={"noise_multiplier": sigma, "target_epsilon": None})


def _val(model, adapter: AdapterState, val: torch.Tensor, batch: int) -> float:
    set_adapter_state(model, adapter)
    return evaluate_chunks(model, val, batch).loss


def select_model(model, global_state: AdapterState, data: ClientData, cfg: ExperimentConfig,
                 ledger: PrivacyLedger | None, seed: int) -> tuple[AdapterState, Choice]:
    """Run steps 1-5 of the module docstring for one device; returns (chosen adapter, choice)."""
    per, dp = cfg.personalization, cfg.privacy.enabled
    eps_now = (ledger.epsilon(cfg.privacy.delta) if ledger is not None and ledger.history else 0.0) if dp else None
    keep = Choice(user=data.user_id, candidate="global", steps=0, alpha=0.0, val_loss=None, global_val_loss=None,
                  validation_chunks=0, scores={}, epsilon=eps_now)
    split = split_validation(data, per.validation_fraction, per.validation_max_chunks)
    if split is None:
        return global_state, replace(keep, reason=f"{data.num_train} training chunks: too few to hold out a "
                                                  f"validation slice and keep {MIN_FIT_CHUNKS} to train on")
    fit, val = split
    bs = cfg.train.eval_batch_size
    g_loss = _val(model, global_state, val, bs)
    scores = {"global": g_loss}
    keep = replace(keep, val_loss=g_loss, global_val_loss=g_loss, validation_chunks=int(val.shape[0]), scores=scores)
    grid = sorted(set(per.finetune_grid))
    try:
        privacy = personal_privacy(cfg, fit, grid[-1], ledger)
    except DeviceTooSmall as err:
        return global_state, replace(keep, reason=str(err))
    lr = per.finetune_lr or cfg.train.lr
    state, done, prev = global_state, 0, g_loss
    best_ft: tuple[float, int, AdapterState] | None = None
    for i, k in enumerate(grid):
        task = ClientTask(server_round=0, local_steps=k - done, batch_size=cfg.train.batch_size, lr=lr,
                          seed=(seed + 7919 * i) % (2**31))
        update = train_local(model, state, fit, task, privacy, ledger, planned_steps=grid[-1],
                             weight_decay=cfg.train.weight_decay)
        state, done = update.adapter, k
        loss = evaluate_chunks(model, val, bs).loss  # train_local left `state` on the model
        scores[f"finetune@{k}"] = loss
        if best_ft is None or loss < best_ft[0]:
            best_ft = (loss, k, state)
        if loss > prev:  # early stopping: the validation loss got worse
            break
        prev = loss
    ft_loss, ft_steps, ft_state = best_ft
    cands = [(g_loss, 0, "global", 0.0, global_state), (ft_loss, 1, "finetune", 1.0, ft_state)]
    for a in sorted(set(per.alpha_grid)):
        mixed = mix(ft_state, global_state, a)
        loss = _val(model, mixed, val, bs)
        scores[f"mix@{a:g}"] = loss
        cands.append((loss, 2, "mix", a, mixed))
    loss, _, cand, alpha, chosen = min(cands, key=lambda c: (c[0], c[1]))
    eps = ledger.epsilon(cfg.privacy.delta) if dp and ledger is not None else None
    return chosen, replace(keep, candidate=cand, steps=0 if cand == "global" else ft_steps, alpha=alpha,
                           val_loss=loss, scores=scores, epsilon=eps)


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
