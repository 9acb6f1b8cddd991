"""The benchmark's privacy settings side by side: one worker process per GPU, a queue of settings.

``run_benchmark`` (``fedtune.personalization.benchmark``) runs its settings one after another on one device by
default. With several workers (``workers`` > 1, or several visible GPUs and ``device`` cuda) it hands each
setting to a worker process instead (torch multiprocessing, ``spawn``):

  - worker i owns one GPU: ``CUDA_VISIBLE_DEVICES`` is set to that GPU before the worker touches CUDA, so the
    setting runs on ``cuda`` there, the i-th visible GPU of the parent (``cuda:i`` in the report); on the CPU
    every worker runs on ``cpu`` with its share of the cores;
  - the settings wait in one queue; a worker takes the next when it finishes one, so three settings on two GPUs
    run as two, then one;
  - every setting starts from the parent's ``initial`` adapter (the seeded start the sequential run uses) and
    calls the same ``run_setting``, so each setting's result is the one the sequential run gives;
  - results come back in the order of ``settings``; the caller assembles the report exactly as it does after a
    sequential run (``benchmark.md``, ``benchmark.json``, the DP-SGD vs user-level comparison line).

A worker that raises, or dies without a word (killed for memory, a crash), ends the whole run with one
``SettingFailed`` naming the setting, the device and the cause; the other workers are stopped, nothing waits.
"""

from __future__ import annotations

import os
import queue
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

POLL_SECONDS = 2.0


class SettingFailed(RuntimeError):
    """A setting's worker raised or died; the message names the setting, its device and the cause."""


@dataclass(frozen=True)
class Slot:
    """Where one worker runs: ``visible`` is its CUDA_VISIBLE_DEVICES (None on the CPU)."""

    label: str  # what the report calls the device: cuda:0, cuda:1, cpu
    device: str  # what the worker passes to run_setting: cuda or cpu
    visible: str | None = None
    threads: int | None = None  # CPU workers: torch threads each (the cores shared between them)


def visible_gpus() -> list[str]:
    """The parent's visible GPUs, as CUDA_VISIBLE_DEVICES entries (ids or UUIDs), in cuda:i order."""
    import torch

    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None and env.strip():
        ids = [x.strip() for x in env.split(",") if x.strip()]
        return ids[: torch.cuda.device_count()] if torch.cuda.is_available() else []
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def plan_slots(device: str, workers: int | None, n_settings: int, gpus: list[str] | None = None) -> list[Slot]:
    """The worker slots for ``n_settings`` settings; [] means run them one after another in this process.
    ``workers`` None: one per visible GPU on cuda (capped by the settings), sequential on the CPU."""
    if n_settings < 2 or workers == 1:
        return []
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be a positive number of processes, got {workers}")
    if device.startswith("cuda"):
        gpus = visible_gpus() if gpus is None else gpus
        if workers is not None and workers > len(gpus):
            raise ValueError(f"{workers} workers asked for, but {len(gpus)} GPU(s) are visible: one worker per "
                             f"GPU; pass --gpus {max(1, len(gpus))} or fewer")
        n = min(workers or len(gpus), n_settings)
        if n < 2:
            return []
        return [Slot(f"cuda:{i}", "cuda", gpus[i]) for i in range(n)]
    if workers is None:
        return []
    n = min(workers, n_settings)
    return [Slot("cpu", device, None, max(1, (os.cpu_count() or 1) // n)) for _ in range(n)]


def _worker(slot: Slot, job: dict, tasks, results) -> None:
    """One worker: take settings off ``tasks`` until the sentinel, put ("done"|"error"|"msg", ...) on ``results``."""
    if slot.visible is not None:  # before anything touches CUDA in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = slot.visible
    import torch

    if slot.threads is not None:
        torch.set_num_threads(slot.threads)
    from fedtune.personalization.benchmark import run_setting
    from fedtune.personalization.settings import DIRS, setting_name

    while True:
        item = tasks.get()
        if item is None:
            return
        index, dp = item
        name = str(dp)
        try:
            name = setting_name(dp)
            result = run_setting(job["cfg"], job["clients"], Path(job["out"]) / DIRS[name], dp, slot.device,
                                 lambda msg: results.put(("msg", f"[{name} on {slot.label}] {msg}")),
                                 job["pack"], job["initial"])
            results.put(("done", index, {**result, "device": slot.label}))
        except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises
            results.put(("error", index, f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
            return


def run_parallel(cfg, clients, out: Path, settings: tuple, slots: list[Slot], pack: int, initial,
                 progress: Callable[[str], None] | None = None) -> list[dict]:
    """Every setting's ``run_setting`` result, in the order of ``settings``, computed by ``slots`` workers."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    for item in enumerate(settings):
        tasks.put(item)
    for _ in slots:
        tasks.put(None)
    job = {"cfg": cfg, "clients": clients, "out": str(out), "pack": pack, "initial": initial}
    procs = [ctx.Process(target=_worker, args=(slot, job, tasks, results), name=f"fedtune-setting-{i}")
             for i, slot in enumerate(slots)]
    parent_visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        for slot, p in zip(slots, procs):  # the child inherits its GPU before it imports anything
            if slot.visible is not None:
                os.environ["CUDA_VISIBLE_DEVICES"] = slot.visible
            p.start()
    finally:
        if parent_visible is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = parent_visible
    if progress:
        progress(f"{len(settings)} settings on {len(slots)} workers ({', '.join(s.label for s in slots)})")
    done: dict[int, dict] = {}
    try:
        while len(done) < len(settings):
            try:
                kind, *rest = results.get(timeout=POLL_SECONDS)
            except queue.Empty:
                dead = [(s, p) for s, p in zip(slots, procs) if p.exitcode not in (None, 0)]
                if dead:
                    s, p = dead[0]
                    raise SettingFailed(f"the worker on {s.label} died (exit code {p.exitcode}) before reporting; "
                                        f"settings finished: {sorted(str(settings[i]) for i in done)}; "
                                        "if it ran out of memory, lower --pack") from None
                if all(p.exitcode is not None for p in procs):
                    raise SettingFailed(f"every worker exited but {len(settings) - len(done)} setting(s) did "
                                        "not report") from None
                continue
            if kind == "msg":
                if progress:
                    progress(rest[0])
            elif kind == "done":
                done[rest[0]] = rest[1]
            else:
                index, detail = rest
                raise SettingFailed(f"the {settings[index]} setting failed in its worker: {detail}")
    finally:
        for p in procs:
            if p.is_alive() and len(done) < len(settings):
                p.terminate()
        for p in procs:
            p.join(timeout=30)
    return [done[i] for i in range(len(settings))]
