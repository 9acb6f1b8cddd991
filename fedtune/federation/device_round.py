"""A device's side of a round, Flower-free: DeviceState -> train (one device or a packed group) -> encode.

1. ``DeviceState`` is what a device keeps between rounds, in one directory: its privacy ledger
   (``ledgers/``), the private part of a split adapter (``private/``), its int8 upload residuals
   (``residuals/``) and, on a deployed device, the last round it trained per run (``rounds.json``).
   Its ``seeds`` are the device's random streams: secret (OS randomness, fresh each round) on a deployed
   device, the run's simulated seeds in a simulation.
2. ``admit`` refuses, on a deployed device, a round that is not newer than the last one it trained for
   this run (a server replaying a round would get fresh noise on the same data otherwise, and learn from
   the difference). Before any training a device may decline the round (``Declined``, with the short
   ``reason`` every backend counts in ``clients_declined``, never as a failure, and records in a
   simulation's events): one too small to train within its per-device DP budget (``check_sit_out``)
   declines with ``too_small`` (``DeviceSitsOut``), one whose own sample-level ε has reached
   ``privacy.device_epsilon_budget`` with ``budget_spent`` (``DeviceBudgetSpent``).
3. ``train_one`` / ``train_group`` run ``device_round`` / ``device_round_group`` (the split adapter's
   private part is restored and kept on the device) with the device's two independent streams
   (``task.sampling``, ``task.noise``; AES-256-CTR CSPRNG streams on a deployed device,
   ``fedtune.privacy.csprng``), then save each ledger and encode each upload under
   ``federation.upload`` (int8 keeps its error-feedback residual in the state).

The plain and the packed ClientApps (``fedtune.flower``) and the in-process backend all call these.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedtune.federation.seeds import Seeds, task_seeds, task_streams
from fedtune.federation.task import TaskPlan
from fedtune.types import AdapterState, ClientData, ClientUpdate

log = logging.getLogger(__name__)


class Declined(RuntimeError):
    """A device declines the round before training: a deliberate choice, counted apart from failures.

    ``reason`` is the short code the server counts (``clients_declined``); the message (the device's data
    size, its ε) stays on the device: its log, and a simulation's events. ``train_one`` raises it,
    ``train_group`` returns it in place of the device.
    """

    reason = "declined"


class DeviceBudgetSpent(Declined):
    """A device whose own sample-level ε has reached ``privacy.device_epsilon_budget`` no longer trains."""

    reason = "budget_spent"


class DeviceSitsOut(Declined):
    """A device too small to train within its per-device DP budget declines the round before training."""

    reason = "too_small"


def check_sit_out(cfg, data: ClientData, batch_size: int) -> None:
    """Raise :class:`DeviceSitsOut` if this device, with its ``data`` and its task's ``batch_size``, cannot train
    within ``privacy.target_epsilon`` over the run's planned steps: the same check ``make_private`` makes
    (``fedtune.privacy.device_budget.sit_out_reason``), made before any model, ledger or data loader is touched."""
    from fedtune.privacy.device_budget import sit_out_reason

    p = cfg.privacy
    if not p.enabled:
        return
    why = sit_out_reason(data.num_train, batch_size, _train_kwargs(cfg)["planned_steps"], p.target_epsilon,
                         p.delta, p.accountant, p.max_noise_to_batch)
    if why is not None:
        raise DeviceSitsOut(why)


def declined_event(server_round: int, device: int | str, user: str, err: Declined) -> dict:
    """A simulation's event for a device that declined (``events.jsonl``; the report names its user)."""
    return {"event": "client_declined", "round": server_round, "device": device, "user": user,
            "reason": err.reason, "detail": str(err)}


class StaleRound(RuntimeError):
    """A deployed device was asked to train a round it already trained (or an older one) for this run."""


@dataclass(frozen=True)
class DeviceState:
    root: Path  # the device's state directory (a simulation keeps every virtual device's under one root)
    seeds: Seeds
    deployed: bool = False

    @classmethod
    def simulated(cls, root: str | Path, run_seed: int) -> "DeviceState":
        return cls(Path(root), Seeds.simulated(run_seed), deployed=False)

    @classmethod
    def deployed_device(cls, root: str | Path) -> "DeviceState":
        """A real device: secret streams from the OS, drawn now (one state object per round)."""
        return cls(Path(root), Seeds.secret(), deployed=True)

    @property
    def ledgers(self):
        from fedtune.privacy import LedgerStore

        return LedgerStore(self.root / "ledgers")

    @property
    def private(self):
        from fedtune.personalization.store import PrivateStateStore

        return PrivateStateStore(self.root / "private")

    @property
    def residuals(self):
        from fedtune.compression import ResidualStore

        return ResidualStore(self.root / "residuals")

    # -- 2. admission --------------------------------------------------------------------------------
    def admit_round(self, run_id: str, server_round: int) -> None:
        """A deployed device trains each round of a run at most once, in increasing order (persisted)."""
        if not self.deployed:
            return
        path = self.root / "rounds.json"
        seen = json.loads(path.read_text()) if path.is_file() else {}
        last = int(seen.get(str(run_id), 0))
        if server_round <= last:
            raise StaleRound(f"server-round {server_round} is not newer than round {last} this device already "
                             f"trained for run {run_id}; a device never trains a round twice")
        seen[str(run_id)] = server_round
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(seen))
        os.replace(tmp, path)

    def ledger(self, key: str, privacy):
        """The device's ledger (None without DP); raises DeviceBudgetSpent past its own budget."""
        if not privacy.enabled:
            return None
        ledger = self.ledgers.load(key, privacy.accountant)
        budget = privacy.device_epsilon_budget
        if budget is not None and ledger.epsilon(privacy.delta) >= budget:
            raise DeviceBudgetSpent(f"device {key} has spent its sample-level budget (epsilon "
                                    f"{ledger.epsilon(privacy.delta):.3f} >= {budget}); it no longer trains")
        return ledger

    def training_task(self, plan: TaskPlan, device: int | str):
        """The plan with this device's own sampling and noise streams (never from the server): on a deployed
        device the AES-CTR streams of its secret seeds, in a simulation seeds for torch generators."""
        sampling, noise = task_seeds(self.seeds, plan.server_round, device)
        return plan.training_task(sampling, noise, task_streams(self.seeds, plan.server_round, device))

    # -- 3. encode -----------------------------------------------------------------------------------
    def encode(self, key: str, update: AdapterState, sent: AdapterState, scheme: str) -> dict:
        from fedtune.compression import encode_update

        residual = self.residuals.load(key) if scheme == "int8" else None
        payload, new_residual = encode_update(update, sent, scheme, residual)
        if scheme == "int8":
            self.residuals.save(key, new_residual)
        return payload


@dataclass(frozen=True)
class Trained:
    key: str
    update: ClientUpdate
    payload: dict  # the encoded upload (name -> tensor)


def _train_kwargs(cfg) -> dict:
    t = cfg.train
    return dict(planned_steps=cfg.federation.rounds * t.local_steps, weight_decay=t.weight_decay)


def train_one(model, state: DeviceState, cfg, incoming: AdapterState, data: ClientData, plan: TaskPlan,
              key: str, device: int | str, physical_batch_size: int | None = None) -> Trained:
    """One device's round: sit-out check -> ledger -> device_round (split-aware) -> save ledger -> encode.
    ``physical_batch_size``: the device's micro-batch cap (a deployed device's memory profile,
    ``fedtune.deploy.device.device_micro_batch``); default ``train.physical_batch_size``. Raises :class:`Declined` before training: ``DeviceSitsOut`` (too small for its budget) or
    ``DeviceBudgetSpent`` (its budget spent)."""
    from fedtune.personalization.device import device_round

    task = state.training_task(plan, device)
    check_sit_out(cfg, data, task.batch_size)
    ledger = state.ledger(key, cfg.privacy)
    t = cfg.train
    update = device_round(model, incoming, data, task, cfg.privacy, ledger,
                          split=cfg.personalization.split, store=state.private, device_key=key,
                          loss_chunk_tokens=t.loss_chunk_tokens, gradient_checkpointing=t.gradient_checkpointing,
                          checkpoint_every_n_layers=t.checkpoint_every_n_layers,
                          physical_batch_size=physical_batch_size or t.physical_batch_size, **_train_kwargs(cfg))
    if ledger is not None:
        state.ledgers.save(ledger)
        log.info("device %s, round %d: DP-SGD noise and batches from %s", key, plan.server_round,
                 update.noise_generator)
    return Trained(key, update, state.encode(key, update.adapter, incoming, cfg.federation.upload))


def train_group(model, state: DeviceState, cfg, incoming: Sequence[AdapterState], datas: Sequence[ClientData],
                plans: Sequence[TaskPlan], keys: Sequence[str], devices: Sequence[int | str]
                ) -> list[Trained | Declined]:
    """A packed group's round (``fedtune.packed`` via ``device_round_group``); a device that declines (too
    small for its budget, or its budget spent) comes back as its :class:`Declined` in its place."""
    from fedtune.personalization.device import device_round_group

    out: list[Trained | Declined | None] = []
    ready = []
    for i, key in enumerate(keys):
        try:
            check_sit_out(cfg, datas[i], plans[i].batch_size)
            ledger = state.ledger(key, cfg.privacy)
        except Declined as err:
            out.append(err)
            continue
        out.append(None)
        ready.append((i, ledger))
    if ready:
        idx = [i for i, _ in ready]
        ledgers = [ledger for _, ledger in ready] if cfg.privacy.enabled else None
        updates = device_round_group(  # one global adapter per group (the server groups same-rank devices)
            model, incoming[idx[0]], [datas[i] for i in idx], [state.training_task(plans[i], devices[i]) for i in idx],
            cfg.privacy, ledgers, split=cfg.personalization.split, store=state.private,
            device_keys=[keys[i] for i in idx], **_train_kwargs(cfg),
            # the packed engine's forward chunks (sequences of the whole group) bound memory the same way; it
            # adds each device's noise once per step whatever the chunking
            micro_batch=cfg.simulation.packed_micro_batch or cfg.train.physical_batch_size)
        for (i, ledger), update in zip(ready, updates):
            if ledger is not None:
                state.ledgers.save(ledger)
            out[i] = Trained(keys[i], update, state.encode(keys[i], update.adapter, incoming[i],
                                                           cfg.federation.upload))
    return out  # type: ignore[return-value]
