"""An in-process federation for benchmarks: the same device and server code as the Flower apps, in one loop.

Flower's simulation engine (``fedtune simulate``) is the way to run fleets; this loop exists for benchmark
recipes that must run where Ray cannot (the GPU machine here has no Ray) or that compare many methods on
one model in one process. It writes the same run directory as ``fedtune simulate`` (prepared data,
``adapters/round-N``, ``state/private``, ``state/ledgers``, ``checkpoint.json``, ``metrics.jsonl``), so
``fedtune evaluate`` reads either.

One round:
  1. sample a seeded cohort of users (as ``AdapterFedAvg.sample``: ``clients_per_round`` of them);
  2. each device runs ``device_round`` with its own seeded task, privacy ledger and private part (exactly
     what the ClientApp runs; the task seed follows ``client_app.task_from_config``);
  3. every update is validated against the shared global adapter, then averaged weighted by examples
     (FedAvg; only the shared part exists on the server);
  4. the global adapter of the round is saved (shared part + the private part's init) with its record.
"""

from __future__ import annotations

import json
import logging
import os
import random
import statistics
import time

from fedtune.adapters import get_adapter_state, set_adapter_state
from fedtune.adapters.split import initial_private, merge, shared_part
from fedtune.aggregation import validate_update, weighted_average
from fedtune.config import ExperimentConfig, dump_config
from fedtune.data import save_client_data
from fedtune.personalization.device import device_round, device_round_group
from fedtune.personalization.store import PrivateStateStore
from fedtune.privacy.device_budget import sit_out_reason
from fedtune.privacy.ledger import LedgerStore
from fedtune.recording import save_adapter
from fedtune.training import evaluate_chunks
from fedtune.types import ClientData, ClientTask, RoundResult
from fedtune.workspace import RunDir

log = logging.getLogger(__name__)


def cohort(seed: int, server_round: int, n_users: int, per_round: int) -> list[int]:
    rng = random.Random(seed * 1_000_003 + server_round)
    return sorted(rng.sample(range(n_users), min(per_round, n_users)))


def task_seed(seed: int, server_round: int, device: int) -> int:
    return (seed * 1_000_003 + server_round * 10_007 + device) % (2**31)


def _pooled_heldout(clients: list[ClientData], limit: int):
    import torch

    chunks, depth = [], 0
    while len(chunks) < limit and any(depth < c.heldout.shape[0] for c in clients):
        chunks += [c.heldout[depth] for c in clients if depth < c.heldout.shape[0]]
        depth += 1
    return torch.stack(chunks[:limit])


def _groups(members: list[int], size: int) -> list[list[int]]:
    size = max(1, size)
    return [members[i:i + size] for i in range(0, len(members), size)]


def federate(cfg: ExperimentConfig, model, clients: list[ClientData], run: RunDir, initial=None,
             progress=None, pack: int = 1) -> list[dict]:
    """Run ``cfg.federation.rounds`` rounds in this process; returns the metrics records (also in the run dir).

    ``initial`` is the starting adapter (default: the model's current one; pass the seeded init when the
    model has trained before in this process). ``pack`` > 1 trains up to that many devices at once with the
    packed engine (``fedtune.packed``; LoRA only), which gives the same updates much faster on a GPU.
    """
    dump_config(cfg, run.config)
    save_client_data(clients, run.data)
    split, dp = cfg.personalization.split, cfg.privacy.enabled
    full = initial if initial is not None else get_adapter_state(model)
    shared, private_init = shared_part(full, split), initial_private(full, split)
    store, ledgers = PrivateStateStore(run.private), LedgerStore(run.ledgers)
    heldout = _pooled_heldout(clients, cfg.train.eval_max_chunks)
    records = [_record(cfg, model, run, merge(shared, private_init), heldout, 0, [], 0.0)]
    max_examples = max(c.num_train for c in clients)
    sat_out: dict[str, str] = {}  # user -> why the device is too small to train within its budget
    for r in range(1, cfg.federation.rounds + 1):
        t0 = time.perf_counter()
        updates, weights, losses, eps = [], [], [], []
        members = cohort(cfg.seed, r, len(clients), cfg.federation.clients_per_round)
        members = [i for i in members if not _sits_out(cfg, clients[i], sat_out)]
        for group in _groups(members, pack):
            datas = [clients[i] for i in group]
            tasks = [ClientTask(server_round=r, local_steps=cfg.train.local_steps, batch_size=cfg.train.batch_size,
                                lr=cfg.train.lr, seed=task_seed(cfg.seed, r, i)) for i in group]
            group_ledgers = [ledgers.load(d.user_id, cfg.privacy.accountant) for d in datas] if dp else None
            kwargs = dict(split=split, store=store, planned_steps=cfg.federation.rounds * cfg.train.local_steps,
                          weight_decay=cfg.train.weight_decay)
            if pack > 1:  # the packed engine: the same updates as one device at a time
                group_updates = device_round_group(model, shared, datas, tasks, cfg.privacy, group_ledgers,
                                                   device_keys=[d.user_id for d in datas], **kwargs)
            else:
                group_updates = [device_round(model, shared, datas[0], tasks[0], cfg.privacy,
                                              group_ledgers[0] if dp else None, device_key=datas[0].user_id,
                                              **kwargs)]
            for data, upd, ledger in zip(datas, group_updates, group_ledgers or [None] * len(datas)):
                if ledger is not None:
                    ledgers.save(ledger)
                validate_update(upd.adapter, shared, upd.num_examples, max_examples)
                updates.append(upd.adapter)
                weights.append(float(upd.num_examples))
                losses.append(upd.train_loss)
                if upd.epsilon is not None:
                    eps.append(upd.epsilon)
                if progress is not None:
                    progress(r, data.user_id, upd)
        if len(updates) >= cfg.federation.min_clients:
            shared = weighted_average(updates, weights)
        records.append(_record(cfg, model, run, merge(shared, private_init), heldout, r, losses,
                               time.perf_counter() - t0, max(eps) if eps else None, len(updates)))
    (run.root / "sat_out.json").write_text(json.dumps({u: why for u, why in sat_out.items() if why}, indent=1))
    return records


def _sits_out(cfg: ExperimentConfig, data: ClientData, sat_out: dict[str, str]) -> bool:
    """A device too small to train within its per-device budget sits out (logged once, kept in ``sat_out``)."""
    if not cfg.privacy.enabled:
        return False
    if data.user_id not in sat_out:
        p = cfg.privacy
        reason = sit_out_reason(data.num_train, cfg.train.batch_size, cfg.federation.rounds * cfg.train.local_steps,
                                p.target_epsilon, p.delta, p.accountant, p.max_noise_to_batch)
        sat_out[data.user_id] = reason or ""
        if reason:
            log.warning("device %s sits out: %s", data.user_id, reason)
    return bool(sat_out[data.user_id])


def _record(cfg, model, run: RunDir, state, heldout, server_round: int, losses: list[float], seconds: float,
            epsilon: float | None = None, clients: int = 0) -> dict:
    set_adapter_state(model, state)
    res = evaluate_chunks(model, heldout, cfg.train.eval_batch_size)
    result = RoundResult(round=server_round, clients_sampled=clients, clients_succeeded=clients,
                         train_loss=statistics.fmean(losses) if losses else None, eval_loss=res.loss,
                         eval_perplexity=res.perplexity, upload_bytes=0, wall_seconds=round(seconds, 3),
                         epsilon=epsilon if cfg.privacy.enabled else None,
                         delta=cfg.privacy.delta if cfg.privacy.enabled else None,
                         extra={"eval_accuracy": res.accuracy, "engine": "in-process"})
    save_adapter(model, run.adapter(server_round), result, cfg)
    run.append_metrics(result.to_record())
    tmp = run.root / "checkpoint.json.tmp"
    tmp.write_text(json.dumps({"round": server_round, "adapter": f"adapters/round-{server_round}"}))
    os.replace(tmp, run.root / "checkpoint.json")
    return result.to_record()
