"""The in-process backend: the engine's round in one Python loop, for where Ray does not fit.

The GPU benchmarks, the personalization recipe and the canary audit run here; ``fedtune simulate`` runs
the same engine through Flower (``fedtune.flower``). Both backends share every part of the round: seeds,
sampler, task plans, the device round (state, streams, ledgers, private parts, upload encoding), reply
validation, the aggregation pipeline and the privacy trail that labels the result. This loop writes the
same run directory as ``fedtune simulate`` (``config.yaml``, prepared data, ``adapters/round-N`` with its
``fedtune.json``, ``state/``, ``checkpoint.json``, ``metrics.jsonl``), so ``fedtune evaluate`` reads either.

One round (numbered as in ``fedtune.federation``'s package docstring):
  1. the sampler picks the cohort from the run's ``cohort`` stream (uniform; Poisson under user-level DP);
  2. each device gets its ``TaskPlan``; ``train_one`` / ``train_group`` (``pack`` > 1: the packed engine)
     runs it with the device's own state and streams and encodes its upload;
  3. each upload is decoded and validated against the adapter sent (``accept_reply``);
  4. the pipeline aggregates (user-level DP-FedAvg | FedAvg | median | trimmed mean); under
     ``privacy.secure_aggregation`` the replies first go through SecAgg+ (``secure_round``) and the
     pipeline gets their unmasked sum and tensor-free replies only;
  5. the recorder evaluates the global adapter on the pooled held-out set, saves it with the label the
     privacy trail derives from what ran, and appends the round's record and checkpoint.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from fedtune.adapters import get_adapter_state
from fedtune.adapters.split import initial_private, shared_part
from fedtune.aggregation import UpdateRejected
from fedtune.config import ExperimentConfig, dump_config
from fedtune.federation.concurrent import ConcurrentDevices, resolve_workers
from fedtune.federation.device_round import (
    Declined, DeviceState, declined_event, train_group, train_one,
)
from fedtune.federation.heldout import pooled_heldout
from fedtune.federation.recorder import Recorder, RoundStats, new_trail
from fedtune.federation.replies import accept_reply
from fedtune.federation.server import build_server
from fedtune.federation.task import plan_task
from fedtune.federation.virtual_device import ledger_key, partition_of
from fedtune.types import ClientData
from fedtune.workspace import RunDir

log = logging.getLogger(__name__)


def _groups(members: list[int], size: int) -> list[list[int]]:
    size = max(1, size)
    return [members[i:i + size] for i in range(0, len(members), size)]


def _metrics(cfg, update, device: int, rank: int, partition: int, seconds: float) -> dict:
    from fedtune.federation.reply_figures import reply_figures, resolve

    return reply_figures(update, resolve(cfg.federation.reply_figures, deployed=False), device=device, rank=rank,
                         partition=partition, seconds=seconds)


def _bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


@dataclass
class _Cohort:
    """The round's device work: who, with which plan, sent what, checked against what."""

    devices: list[int]
    plans: list
    sent: list  # the adapter each device gets
    references: list  # what its reply must match


@dataclass(frozen=True)
class _Job:
    """One training call: a packed group, or a single device (``pack`` = 1)."""

    group: list[int]  # indices into the cohort
    plans: list
    devices: list[int]
    fleet: list  # the fleet's simulated device for each, or None
    datas: list
    keys: list[str]
    sent: list


def _train_job(cfg, state: DeviceState, pack: int):
    """The call that trains a job on a model: its results (a ``Trained`` or ``Declined`` per device) and its
    wall seconds (a packed group's devices share them)."""
    def train(model, job: _Job) -> tuple[list, float]:
        started = time.perf_counter()
        if pack > 1:
            results = train_group(model, state, cfg, job.sent, job.datas, job.plans, job.keys, job.devices)
        else:
            try:
                results = [train_one(model, state, cfg, job.sent[0], job.datas[0], job.plans[0], job.keys[0],
                                     job.devices[0])]
            except Declined as err:
                results = [err]
        return results, time.perf_counter() - started

    return train


def _train_cohort(cfg, state: DeviceState, clients, cohort: _Cohort, model_for, limits, pack, progress,
                  stats: RoundStats, dropped: list[int], fleet=None, note=None,
                  runner: ConcurrentDevices | None = None) -> dict[int, tuple]:
    """Train every device of the cohort (packed groups share rank and quantization; ``runner`` trains several
    calls side by side); returns device -> (reply, simulated seconds) for the valid replies, counting
    failures, declines (by reason: a device too small for its DP budget sits out, ``too_small``; one whose
    own budget is spent, ``budget_spent``) and rejections in ``stats`` and the fleet's dropouts in
    ``dropped``; ``note(event)`` gets each decline's event (its user, reason and detail)."""
    out: dict[int, tuple] = {}
    by_tier: dict[tuple, list[int]] = {}
    for j, plan in enumerate(cohort.plans):
        by_tier.setdefault((plan.rank, plan.quantization), []).append(j)
    jobs: list[tuple] = []
    for members in by_tier.values():
        for group in _groups(members, pack):
            plans = [cohort.plans[j] for j in group]
            devs = [cohort.devices[j] for j in group]
            fdevs = [fleet(d) for d in devs] if fleet else [None] * len(devs)
            keep = [k for k, f in enumerate(fdevs) if f is None or not f.drops_out(plans[k].server_round)]
            stats.failed += len(group) - len(keep)
            dropped.extend(devs[k] for k in range(len(devs)) if k not in keep)
            if not keep:
                continue
            group, plans, devs, fdevs = ([x[k] for k in keep] for x in (group, plans, devs, fdevs))
            datas = [clients[partition_of(d, len(clients))] for d in devs]
            keys = [ledger_key(d, partition_of(d, len(clients)), c.user_id) for c, d in zip(datas, devs)]
            jobs.append((model_for(plans[0]), _Job(group, plans, devs, fdevs, datas, keys,
                                                   [cohort.sent[j] for j in group])))
    runner = runner or ConcurrentDevices(1)
    for (_, job), (results, seconds) in zip(jobs, runner.map(_train_job(cfg, state, pack), jobs)):
        for j, d, res, f, plan, data in zip(job.group, job.devices, results, job.fleet, job.plans, job.datas):
            if isinstance(res, Declined):
                stats.declined[res.reason] += 1
                log.info("device %s (%s) declines round %d (%s): %s", d, data.user_id, plan.server_round,
                         res.reason, res)
                if note is not None:
                    note(declined_event(plan.server_round, d, data.user_id, res))
                continue
            stats.upload_bytes += _bytes(res.payload)
            metrics = _metrics(cfg, res.update, d, plan.rank or cfg.adapter.rank, partition_of(d, len(clients)),
                               seconds)
            try:
                reply = accept_reply(res.payload, metrics, sent=cohort.sent[j], reference=cohort.references[j],
                                     limits=limits, device=d)
            except UpdateRejected as err:
                stats.rejected[err.reason] += 1
                continue
            stats.clients.append(metrics)
            sim = f.seconds(plan.server_round, _bytes(cohort.sent[j]), res.update.tokens,
                            _bytes(res.payload)) if f is not None else 0.0
            out[d] = (reply, sim)
            if progress is not None:
                progress(plan.server_round, data.user_id, res.update)
    return out


def _tier_models(cfg, model):
    """The model for a plan: the caller's for the configured rank and quantization, else a cached tier model."""
    from fedtune.adapters.cached import adapter_model

    def model_for(plan):
        if plan.rank in (None, cfg.adapter.rank) and plan.quantization in (None, cfg.model.quantization):
            return model
        model_cfg = cfg.model.model_copy(update={"quantization": plan.quantization or cfg.model.quantization})
        adapter_cfg = cfg.adapter.model_copy(update={"rank": plan.rank, "alpha": plan.alpha or cfg.adapter.alpha})
        device = str(next(model.parameters()).device)
        return adapter_model(model_cfg, adapter_cfg, cfg.seed, device)[0]

    return model_for


def concurrent_workers(cfg: ExperimentConfig, model, pack: int) -> int:
    """Device calls the in-process backend runs side by side: 1 for packed groups, else
    ``simulation.concurrent_devices`` or its default for the model's device (``resolve_workers``)."""
    if pack > 1:
        return 1
    return resolve_workers(cfg.simulation.concurrent_devices, next(model.parameters()).device.type)


def run_inprocess(cfg: ExperimentConfig, model, clients: list[ClientData], run: RunDir, initial=None,
                  progress=None, pack: int | None = None, concurrent: int | None = None) -> list[dict]:
    """Run ``cfg.federation.rounds`` rounds in this process; returns the metrics records (also in the run dir).

    ``initial``: the starting adapter (default: the model's current one). ``pack`` > 1 trains up to that many
    devices at once with the packed engine (default: ``simulation.packed_group_size``); devices of one
    fleet tier are packed together. ``concurrent``: device calls run side by side in threads, each on a replica
    of the model sharing its frozen base (``fedtune.federation.concurrent``; default:
    ``simulation.concurrent_devices``, or torch's thread count on CPU and 1 on a GPU; packed groups run one at a
    time). ``progress(round, user_id, update)`` is called after each device trains, in cohort order.
    """
    from fedtune.data import save_client_data

    pack = cfg.simulation.packed_group_size if pack is None else pack
    workers = concurrent_workers(cfg, model, pack) if concurrent is None else concurrent
    runner = ConcurrentDevices(workers)
    dump_config(cfg, run.config)
    save_client_data(clients, run.data)
    state = DeviceState.simulated(run.root / "state", cfg.seed)
    split = cfg.personalization.split
    full = initial if initial is not None else get_adapter_state(model)
    shared, private_init = shared_part(full, split), initial_private(full, split)
    params = cfg.fleet.simulated_params or sum(p.numel() for p in model.parameters())
    setup = build_server(cfg, shared, users=len(clients), max_train=max(c.num_train for c in clients), params=params)
    seeds, population, sampler, coord, limits = setup.seeds, setup.population, setup.sampler, setup.coord, setup.limits
    pipeline = setup.pipeline(cfg.federation.min_clients)
    user_dp = pipeline.user_dp
    fleet = None
    if coord is not None:
        from fedtune.federation.fleet_device import fleet_device
        from fedtune.federation.fleet_server import FleetServer

        fleet = FleetServer(shared, setup.rule, cfg.fleet.rank_aggregation)
    secure = None
    if cfg.privacy.secure_aggregation.enabled:  # devices mask; the pipeline sees only the unmasked sum
        from fedtune.federation.secure_round import SecureAggregation

        secure = SecureAggregation(cfg.privacy.secure_aggregation, cfg.privacy.user_level.clip_norm if user_dp
                                   else None, float(limits.max_examples), seeds, context=cfg.name.encode())
    trail = new_trail(cfg, seeds.mode, user_dp)
    recorder = Recorder(cfg, run, model, pooled_heldout(clients, cfg.train.eval_max_chunks), trail, private_init,
                        engine="in-process", checkpoint_state=lambda: {
                            "user_ledger": user_dp.dp.ledger.to_dict() if user_dp else None,
                            "clock": coord.clock.to_dict() if coord is not None else None})

    def record(r: int, state, stats: RoundStats) -> dict:
        result = recorder.record(r, state, stats)
        recorder.checkpoint(r)
        return result.to_record()

    records = [record(0, shared, RoundStats())]
    rounds = setup.rounds
    model_for = _tier_models(cfg, model)
    for r in range(1, rounds + 1):
        stats = RoundStats()
        if fleet is not None:
            fleet.new_round()
            devices = coord.cohort(r)
            plans = [coord.task(d, r) for d in devices]
            cohort = _Cohort(devices, plans, [fleet.sent_for(p.rank) for p in plans],
                             [fleet.reference_for(p.rank) for p in plans])
        else:
            devices = sampler.sample(r, population)
            cohort = _Cohort(devices, [plan_task(cfg, r, device=d) for d in devices], [shared] * len(devices),
                             [shared] * len(devices))
        stats.sampled = len(devices)
        dropped: list[int] = []
        done = _train_cohort(cfg, state, clients, cohort, model_for, limits, pack, progress, stats, dropped,
                             fleet=(lambda d: fleet_device(cfg, d, params)) if fleet is not None else None,
                             note=run.append_event, runner=runner)
        if coord is not None:
            accepted = coord.settle(r, {d: s for d, (_, s) in done.items()}, dropped)
            good = [done[d][0] for d in accepted]
            stats.extra = coord.round_record(r)
        else:
            good = [done[d][0] for d in devices if d in done]
        current = fleet.global_adapter() if fleet is not None else shared
        if secure is not None:
            from fedtune.federation.secure_round import metadata_only

            cohort_sum = secure.run(current, good, r)  # the devices' side and the SecAgg+ server
            good = metadata_only(good)
            stats.extra = {f"secagg_{k}": v for k, v in cohort_sum.report.items()
                           if isinstance(v, (int, float, bool, str))}
            result = pipeline.aggregate_secure(current, good, cohort_sum, r)
        else:
            result = pipeline.aggregate(current, good, r)
        if not result.skipped:  # the recorder feeds the privacy trail (once per round)
            if fleet is not None:
                fleet.after(result)
            shared = fleet.global_adapter() if fleet is not None else result.state
        stats.absorb(result, good)
        records.append(record(r, shared, stats))
    return records
