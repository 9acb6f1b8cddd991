"""Follow a Flower run to its end without spawning a process per poll.

Reading a run's status means ``flwr ls``: a Python process that imports flwr (~1-2.4 s of CPU on a small
machine). Polling it every second took a third of a core from the devices on a 2-core box
(docs/benchmarks.md). Instead, one ``flwr log RUN_ID`` process streams the run's log for the whole run
and exits when the run finishes; the status is read once then, and otherwise once every
``status_seconds`` as a safety net (a stream that ends while the run is still going is restarted, and
then the status is read at most every 5 s). The simulation launcher (``fedtune.flower.simulation``) and
``fedtune server start`` (``fedtune.deploy.server``) both follow their runs with ``follow_run``.
"""

from __future__ import annotations

import logging
import resource
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedtune.deploy.processes import flower_exe
from fedtune.deploy.superlink import run_status

log = logging.getLogger(__name__)

StreamStarter = Callable[[str, dict, Path, object], subprocess.Popen]
StatusReader = Callable[[str, dict, Path], tuple[str, str]]


@dataclass(frozen=True)
class Followed:
    status: str  # Flower's final status, e.g. ``finished:completed``
    details: str
    status_calls: int  # `flwr ls` processes spawned to follow the run
    status_cpu_seconds: float  # their CPU time
    streams: int  # `flwr log` processes started (1 unless the stream broke off)


def start_log_stream(run_id: str, env: dict, cwd: Path, log_file) -> subprocess.Popen:
    """``flwr log RUN_ID``: streams the run's log into ``log_file`` and exits when the run finishes."""
    return subprocess.Popen([flower_exe("flwr"), "log", run_id], env=env, cwd=cwd, stdout=log_file,
                            stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen) -> None:
    try:
        proc.wait(0.5)
    except subprocess.TimeoutExpired:
        proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def follow_run(run_id: str, env: dict, cwd: Path, log_file, *, poll_seconds: float = 1.0,
               status_seconds: float = 60.0, on_poll: Callable[[], None] | None = None,
               check: Callable[[], None] | None = None, start_stream: StreamStarter = start_log_stream,
               read_status: StatusReader = run_status) -> Followed:
    """Wait until Flower reports run ``run_id`` finished; return its status and what following it cost.

    Every ``poll_seconds`` (or as soon as the stream ends) ``check()`` runs (it raises to give up: a
    timeout, a SuperLink that died) and then ``on_poll()`` (progress, in this process). The stream process
    is stopped before returning or raising."""
    calls, cpu, streams = 0, 0.0, 1
    stream = start_stream(run_id, env, cwd, log_file)
    status, details = "pending", ""
    last, end_gap = time.monotonic(), 0.0  # the stream's first end is checked at once
    try:
        while not status.startswith("finished"):
            try:  # wakes as soon as the stream ends (the run finished), else after poll_seconds
                stream.wait(poll_seconds)
            except subprocess.TimeoutExpired:
                pass
            if check:
                check()
            if on_poll:
                on_poll()
            ended = stream.poll() is not None
            since = time.monotonic() - last
            if (ended and since >= end_gap) or since >= status_seconds:
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                status, details = read_status(run_id, env, cwd)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the reaped `flwr ls` child
                calls += 1
                cpu += (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
                last = time.monotonic()
                if ended and not status.startswith("finished"):
                    log.warning("the log stream of run %s ended while the run is %s; following it again",
                                run_id, status)
                    end_gap = min(5.0, status_seconds)  # a stream that keeps breaking: one query per 5 s
                    stream = start_stream(run_id, env, cwd, log_file)
                    streams += 1
        if on_poll:
            on_poll()
        log.info("followed run %s with %d status queries (%.1f s CPU)", run_id, calls, cpu)
        return Followed(status, details, calls, cpu, streams)
    finally:
        _stop(stream)
