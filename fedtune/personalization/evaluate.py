"""Per-user evaluation: every user's own held-out data, under each personalization method.

    base        the base model, adapter disabled
    global      the federation's final global adapter, as is
    finetune    the global adapter fine-tuned on the user's own training data for ``finetune_steps``
                (DP-SGD with the run's privacy settings, continuing the device's own privacy ledger)
    personalized  the model the device selected on a validation slice of its own training chunks: global,
                global + k local steps, a global/fine-tuned mix or, with ``dual_adapters``, a private LoRA
                next to the frozen global one (``fedtune.personalization.select``)
    split       the split run's shared part + the device's private part (``personalization.split``)
    local_only  a fresh adapter trained only on the user's data (no federation), the baseline

Each user is evaluated on the first ``eval_max_chunks`` of their held-out chunks; the numbers are
deterministic for a seed (fine-tuning and local-only training are seeded per user and method).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace
from typing import Callable

from fedtune.adapters import get_adapter_state, set_adapter_state
from fedtune.adapters.split import initial_private, merge
from fedtune.config import ExperimentConfig
from fedtune.personalization.dual import applied
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.training import evaluate_chunks, train_local
from fedtune.types import AdapterState, ClientData, ClientTask

METHODS = ("base", "global", "finetune", "personalized", "split", "local_only")


@dataclass(frozen=True)
class UserResult:
    user: str
    method: str
    loss: float
    perplexity: float
    accuracy: float
    tokens: int
    train_steps: int  # local steps this method spent on the user's device at evaluation time
    epsilon: float | None  # the device's sample-level epsilon under this method (None without DP)
    choice: str = ""  # personalized: the selected candidate (e.g. finetune@8, mix@0.5/k8, global)
    # personalized: the best candidate's validation gain over global in standard errors, kept or not
    # (``fedtune.personalization.select.significance``; the tuning of ``min_gain_z`` reads it)
    gain_z: float | None = None
    gain_chunk_z: float | None = None  # the same gain in standard errors over validation chunks (for study)

    def row(self) -> dict:
        return asdict(self)


@dataclass
class Sources:
    """What the methods start from. ``initial`` is the seeded fresh adapter (all trainable tensors)."""

    initial: AdapterState
    n_users: int = 1  # the federation's population (sets the local-only baseline's default steps)
    global_state: AdapterState | None = None  # whole adapter (shared + the global private init)
    split_shared: AdapterState | None = None  # the split run's shared part
    split_name: str = "none"
    private_for: Callable[[str], AdapterState | None] = lambda user: None
    ledger_for: Callable[[str], PrivacyLedger | None] = lambda user: None
    choices: object | None = None  # a SelectionStore: where each device keeps its selected model's choice


def _seed(cfg: ExperimentConfig, user: str, method: str) -> int:
    from fedtune.federation.seeds import Seeds  # every stream derives from the run's seeds by name

    return Seeds.simulated(cfg.seed).derive("eval.finetune", method, user)


def local_only_steps(cfg: ExperimentConfig, n_users: int) -> int:
    """The local-only baseline's steps: configured, else what a device of the federation trains on average
    (expected rounds it is sampled in x local steps) plus the fine-tuning steps of the global+FT method."""
    per = cfg.personalization
    if per.local_only_steps:
        return per.local_only_steps
    share = min(1.0, cfg.federation.clients_per_round / max(1, n_users))
    return math.ceil(cfg.federation.rounds * share) * cfg.train.local_steps + per.finetune_steps


def _task(cfg: ExperimentConfig, data: ClientData, method: str, steps: int) -> ClientTask:
    lr = (cfg.personalization.finetune_lr or cfg.train.lr) if method == "finetune" else cfg.train.lr
    return ClientTask(server_round=0, local_steps=steps, batch_size=cfg.train.batch_size, lr=lr,
                      seed=_seed(cfg, data.user_id, method))


def _start(method: str, data: ClientData, src: Sources, cfg: ExperimentConfig):
    """(starting adapter, steps, the ledger to continue) of a method that trains on the device."""
    dp = cfg.privacy.enabled
    if method == "finetune":
        ledger = src.ledger_for(data.user_id) if dp else None
        own = copy.deepcopy(ledger) if ledger is not None else (PrivacyLedger(data.user_id, cfg.privacy.accountant)
                                                                 if dp else None)
        return src.global_state, cfg.personalization.finetune_steps, own
    fresh = PrivacyLedger(data.user_id, cfg.privacy.accountant) if dp else None
    return src.initial, local_only_steps(cfg, src.n_users), fresh


def _privacy(cfg: ExperimentConfig, data: ClientData, steps: int, ledger: PrivacyLedger | None):
    """The device's DP-SGD setting for ``steps`` personal steps within its budget, or None if it cannot train
    (too small, or its budget is spent: it keeps what it has; ``fedtune.personalization.select``)."""
    from fedtune.personalization.select import personal_privacy
    from fedtune.privacy.device_budget import DeviceTooSmall

    try:
        return personal_privacy(cfg, data, steps, ledger)
    except DeviceTooSmall:
        return None


def _spent_by(ledger: PrivacyLedger | None, cfg: ExperimentConfig) -> float | None:
    return (ledger.epsilon(cfg.privacy.delta) if ledger is not None and ledger.history else 0.0) \
        if cfg.privacy.enabled else None


def _train(model, data: ClientData, cfg: ExperimentConfig, method: str, src: Sources) -> tuple[int, float | None]:
    start, steps, ledger = _start(method, data, src, cfg)
    privacy = _privacy(cfg, data, steps, ledger)
    if privacy is None:
        set_adapter_state(model, start)
        return 0, _spent_by(ledger, cfg)
    update = train_local(model, start, data, _task(cfg, data, method, steps), privacy, ledger,
                         planned_steps=steps, weight_decay=cfg.train.weight_decay)
    set_adapter_state(model, update.adapter)
    return steps, update.epsilon


def train_packed_methods(model, clients: list[ClientData], src: Sources, cfg: ExperimentConfig, methods,
                         pack: int) -> dict[tuple[str, str], tuple[AdapterState, int, float | None]]:
    """Fine-tuning and local-only training of every user, ``pack`` users at a time on the packed engine:
    {(user, method): (adapter, steps, epsilon)}, the same as training each user alone."""
    from fedtune.packed import train_packed

    dp = cfg.privacy.enabled
    out = {}
    for method in [m for m in ("finetune", "local_only") if m in methods]:
        if method == "finetune" and src.global_state is None:
            continue
        users = []
        for d in [c for c in clients if c.heldout.shape[0] > 0]:
            start, steps, ledger = _start(method, d, src, cfg)
            privacy = _privacy(cfg, d, steps, ledger)
            if privacy is None:  # cannot train within its budget: keeps its starting adapter
                out[d.user_id, method] = (start, 0, _spent_by(ledger, cfg))
            else:
                users.append((d, start, steps, ledger, privacy))
        for i in range(0, len(users), pack):
            group = users[i:i + pack]
            steps = group[0][2]
            updates = train_packed(model, [g[1] for g in group], [g[0] for g in group],
                                   [_task(cfg, g[0], method, steps) for g in group],
                                   cfg.privacy.model_copy(update={"target_epsilon": None}),
                                   [g[3] for g in group] if dp else None, planned_steps=steps,
                                   weight_decay=cfg.train.weight_decay,
                                   noise_multipliers=[g[4].noise_multiplier for g in group] if dp else None)
            for g, u in zip(group, updates):
                out[g[0].user_id, method] = (u.adapter, steps, u.epsilon)
    return out


def evaluate_user(model, data: ClientData, method: str, src: Sources, cfg: ExperimentConfig,
                  trained: dict | None = None) -> UserResult | None:
    """One user under one method; None when the method does not apply (e.g. split without a split run).
    ``trained`` holds adapters already trained for (user, method) (``train_packed_methods``)."""
    heldout = data.heldout[: cfg.personalization.eval_max_chunks]
    if heldout.shape[0] == 0:
        return None
    dp = cfg.privacy.enabled
    steps, epsilon = 0, None
    if method == "base":
        with model.disable_adapter():
            res = evaluate_chunks(model, heldout, cfg.train.eval_batch_size)
        return _result(data, method, res, 0, 0.0 if dp else None)
    if method == "global":
        if src.global_state is None:
            return None
        set_adapter_state(model, src.global_state)
        epsilon = _spent(data, src, cfg)
    elif method == "split":
        if src.split_shared is None:
            return None
        private = src.private_for(data.user_id)
        set_adapter_state(model, merge(src.split_shared, private if private is not None
                                       else initial_private(src.initial, src.split_name)))
        epsilon = _spent(data, src, cfg)
    elif method == "personalized":
        if src.global_state is None:
            return None
        if trained is not None and (data.user_id, method) in trained:
            adapter, choice = trained[data.user_id, method]
        else:
            adapter, choice = personalize(model, data, src, cfg, src.choices)
        with applied(model, adapter):  # one adapter state, or dual adapters (``fedtune.personalization.dual``)
            res = evaluate_chunks(model, heldout, cfg.train.eval_batch_size)
        return replace(_result(data, method, res, choice.steps, choice.epsilon), choice=choice.label,
                       gain_z=choice.gain_z, gain_chunk_z=choice.gain_chunk_z)
    elif method in ("finetune", "local_only"):
        if method == "finetune" and src.global_state is None:
            return None
        if trained is not None and (data.user_id, method) in trained:
            adapter, steps, epsilon = trained[data.user_id, method]
            set_adapter_state(model, adapter)
        else:
            steps, epsilon = _train(model, data, cfg, method, src)
    else:
        raise ValueError(f"unknown personalization method {method!r}; expected one of {METHODS}")
    res = evaluate_chunks(model, heldout, cfg.train.eval_batch_size)
    return _result(data, method, res, steps, epsilon)


def _ledger_copy(data: ClientData, src: Sources, cfg: ExperimentConfig) -> PrivacyLedger | None:
    if not cfg.privacy.enabled:
        return None
    own = src.ledger_for(data.user_id)
    return copy.deepcopy(own) if own is not None else PrivacyLedger(data.user_id, cfg.privacy.accountant)


def personalize_all(model, clients: list[ClientData], src: Sources, cfg: ExperimentConfig, pack: int) -> dict:
    """``personalize`` for every user, the fine-tuning segments ``pack`` users at a time (packed engine):
    {(user, "personalized"): (adapter, choice)}."""
    from fedtune.personalization.select import select_models

    picked = select_models(model, src.global_state, clients, cfg, [_ledger_copy(c, src, cfg) for c in clients],
                           [_seed(cfg, c.user_id, "select") for c in clients], pack=pack)
    out = {}
    for c, (adapter, choice) in zip(clients, picked):
        if src.choices is not None:
            src.choices.save(choice)
        out[c.user_id, "personalized"] = (adapter, choice)
    return out


def personalize(model, data: ClientData, src: Sources, cfg: ExperimentConfig, store=None):
    """The device's own model selection (``fedtune.personalization.select``), continuing a copy of its ledger:
    (adapter, ``Choice``); the choice is saved to ``store`` (device-local) when given."""
    from fedtune.personalization.select import select_model

    adapter, choice = select_model(model, src.global_state, data, cfg, _ledger_copy(data, src, cfg),
                                   _seed(cfg, data.user_id, "select"))
    if store is not None:
        store.save(choice)
    return adapter, choice


def _spent(data: ClientData, src: Sources, cfg: ExperimentConfig) -> float | None:
    """The device's sample-level epsilon from the federation (its ledger); None without DP."""
    if not cfg.privacy.enabled:
        return None
    ledger = src.ledger_for(data.user_id)
    return ledger.epsilon(cfg.privacy.delta) if ledger is not None and ledger.history else 0.0


def _result(data: ClientData, method: str, res, steps: int, epsilon: float | None) -> UserResult:
    return UserResult(user=data.user_id, method=method, loss=res.loss, perplexity=res.perplexity,
                      accuracy=res.accuracy, tokens=res.tokens, train_steps=steps, epsilon=epsilon)


def evaluate_users(model, clients: list[ClientData], src: Sources, cfg: ExperimentConfig,
                   methods: list[str] | tuple[str, ...] = METHODS, progress=None, pack: int = 1) -> list[UserResult]:
    """Every user under every method that applies; ``progress(done, total, user)`` after each user.
    ``pack`` > 1 trains the fine-tuned and local-only adapters that many users at a time (packed engine)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown personalization methods {unknown}; expected some of {list(METHODS)}")
    start = get_adapter_state(model)
    out: list[UserResult] = []
    try:
        trained = train_packed_methods(model, clients, src, cfg, methods, pack) if pack > 1 else None
        if pack > 1 and "personalized" in methods and src.global_state is not None:
            trained.update(personalize_all(model, [c for c in clients if c.heldout.shape[0] > 0], src, cfg, pack))
        for i, data in enumerate(clients):
            for method in methods:
                r = evaluate_user(model, data, method, src, cfg, trained)
                if r is not None:
                    out.append(r)
            if progress is not None:
                progress(i + 1, len(clients), data.user_id)
    finally:
        set_adapter_state(model, start)
    return out
