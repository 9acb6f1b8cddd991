"""A device's side of a round, Flower-free: DeviceState -> train (one device or a packed group) -> encode.

1. ``DeviceState`` is what a device keeps between rounds, in one directory: its privacy ledger
   (``ledgers/``), the private part of a split adapter (``private/``), its int8 upload residuals
   (``residuals/``) and, on a deployed device, the last round it trained per run (``rounds.json``).
   Its ``seeds`` are the device's random streams: secret (OS randomness, fresh each round) on a deployed
   device, the run's simulated seeds in a simulation.
2. ``admit`` refuses a device whose own sample-level budget is spent and, on a deployed device, a round
   that is not newer than the last one it trained for this run (a server replaying a round would get
   fresh noise on the same data otherwise, and learn from the difference).
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


class DeviceBudgetSpent(RuntimeError):
    """A device whose own privacy budget is spent declines the round (a failed reply the round survives)."""


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
              key: str, device: int | str) -> Trained:
    """One device's round: ledger -> device_round (split-aware) -> save ledger -> encode."""
    from fedtune.personalization.device import device_round

    ledger = state.ledger(key, cfg.privacy)
    t = cfg.train
    update = device_round(model, incoming, data, state.training_task(plan, device), cfg.privacy, ledger,
                          split=cfg.personalization.split, store=state.private, device_key=key,
                          loss_chunk_tokens=t.loss_chunk_tokens, gradient_checkpointing=t.gradient_checkpointing,
                          checkpoint_every_n_layers=t.checkpoint_every_n_layers, **_train_kwargs(cfg))
    if ledger is not None:
        state.ledgers.save(ledger)
        log.info("device %s, round %d: DP-SGD noise and batches from %s", key, plan.server_round,
                 update.noise_generator)
    return Trained(key, update, state.encode(key, update.adapter, incoming, cfg.federation.upload))


def train_group(model, state: DeviceState, cfg, incoming: Sequence[AdapterState], datas: Sequence[ClientData],
                plans: Sequence[TaskPlan], keys: Sequence[str], devices: Sequence[int | str]
                ) -> list[Trained | DeviceBudgetSpent]:
    """A packed group's round (``fedtune.packed`` via ``device_round_group``); a device past its budget
    comes back as its ``DeviceBudgetSpent`` in its place."""
    from fedtune.personalization.device import device_round_group

    out: list[Trained | DeviceBudgetSpent | None] = []
    ready = []
    for i, key in enumerate(keys):
        try:
            ledger = state.ledger(key, cfg.privacy)
        except DeviceBudgetSpent as err:
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
            device_keys=[keys[i] for i in idx], micro_batch=cfg.simulation.packed_micro_batch, **_train_kwargs(cfg))
        for (i, ledger), update in zip(ready, updates):
            if ledger is not None:
                state.ledgers.save(ledger)
            out[i] = Trained(keys[i], update, state.encode(keys[i], update.adapter, incoming[i],
                                                           cfg.federation.upload))
    return out  # type: ignore[return-value]
