"""Run an experiment on Flower's simulation engine (Ray backend) through ``flwr run``.

The launcher stages a tiny Flower app in the run directory (a pyproject.toml whose components are
``fedtune.flower.apps:server_app`` / ``:client_app``), points a private FLWR_HOME at a private
SuperLink port, submits the run, follows it until Flower reports it finished, and then stops the
detached SuperLink it started, by PID. ``flwr run`` exits 0 even when a run fails, so the run's
status is read back with ``flwr ls`` (once the ``flwr log`` stream ends, not every poll) and a failure
raises ``SimulationFailed`` with Flower's reason.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedtune.config import ExperimentConfig
from fedtune.deploy.follow import follow_run, start_log_stream
from fedtune.deploy.superlink import flwr, run_status
from fedtune.workspace import RunDir

log = logging.getLogger(__name__)

OFFLINE_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # else flwr installs CUDA torch per run
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore",
}


class SimulationFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class SimulationHandle:
    run_id: str
    status: str
    details: str
    seconds: float
    status_calls: int = 0  # `flwr ls` processes spawned to follow the run
    status_cpu_seconds: float = 0.0  # their CPU time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


CLIENT_APP = "fedtune.flower.apps:client_app"


def stage_app(run: RunDir, config_path: Path, extra: dict[str, int | str] | None = None,
              clientapp: str = CLIENT_APP) -> Path:
    """The Flower app directory of a run; ``extra`` adds run-config keys (e.g. ``deployment-nodes``),
    ``clientapp`` swaps the ClientApp (benchmarks compare others on the same workload)."""
    app = run.flower / "app"
    app.mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(f"""[project]
name = "fedtune-run"
version = "1.0.0"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedtune"

[tool.flwr.app.components]
serverapp = "fedtune.flower.apps:server_app"
clientapp = "{clientapp}"

[tool.flwr.app.config]
config-path = {json.dumps(str(config_path))}
run-dir = {json.dumps(str(run.root))}
""" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in (extra or {}).items()))
    return app


def flower_env(run: RunDir, port: int, ray_address: str = "") -> dict[str, str]:
    home = run.flower / "home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    env = dict(os.environ, **OFFLINE_ENV)
    # flwr starts `flower-superlink` etc. by name: make sure this interpreter's scripts are found even
    # when the virtual environment is not activated (e.g. `.venv/bin/fedtune ...`)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(home)
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(port)
    # ray.init() in Flower's Ray backend joins the given cluster; without one, "local" makes it start
    # its own instead of attaching to whatever `ray start` cluster this machine last knew of
    env["RAY_ADDRESS"] = ray_address or "local"
    return env


def federation_config(cfg: ExperimentConfig, num_nodes: int) -> str:
    sim = cfg.simulation
    out = (f"num-supernodes={num_nodes} client-resources-num-cpus={sim.num_cpus_per_client} "
           f"client-resources-num-gpus={sim.num_gpus_per_client}")
    if not sim.ray_address:  # a local Ray of our own size; an existing cluster brings its own resources
        out += f" init-args-num-cpus={sim.num_cpus_per_client * sim.max_concurrent_clients}"
    return out


def _superlink_pid(port: int) -> int | None:
    import psutil

    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            return int(conn.pid)
    return None


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def stop_superlink(port: int, timeout: float = 15.0) -> None:
    """Stop the SuperLink listening on ``port`` (ours), and what it left behind, by PID."""
    import psutil

    pid = _superlink_pid(port)
    if pid is None:
        return
    try:
        proc = psutil.Process(pid)
        children = proc.children(recursive=True)
        groups = {_pgid(c.pid) for c in children} - {os.getpgid(0), None}
        proc.terminate()
        proc.wait(timeout)
    except psutil.NoSuchProcess:
        return
    except psutil.TimeoutExpired:
        proc.kill()
    for pgid in groups:  # superexec's group: flwr-simulation and Ray helpers
        try:
            os.killpg(pgid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    for c in children:
        try:
            c.wait(5)
        except (psutil.NoSuchProcess, psutil.TimeoutExpired):
            try:
                c.kill()
            except psutil.NoSuchProcess:
                pass


_start_follower = start_log_stream  # the `flwr log` stream (a module name, so tests can stand in for it)


def run_simulation(cfg: ExperimentConfig, run: RunDir, num_nodes: int,
                   on_poll: Callable[[], None] | None = None, poll_seconds: float = 1.0,
                   timeout: float = 6 * 3600, clientapp: str = CLIENT_APP,
                   status_seconds: float = 60.0) -> SimulationHandle:
    """Submit the run, follow it to the end, stop the SuperLink; raise SimulationFailed on failure.

    Following costs no process per poll: the ``flwr log`` stream (one process for the whole run) ends
    when the run finishes, and only then is the status read with ``flwr ls`` (a Python process that
    imports flwr, ~2.4 s of CPU). ``on_poll`` runs in this process every ``poll_seconds``; the status is
    also read every ``status_seconds`` in case the stream broke off, and a broken stream is restarted.
    ``clientapp`` names another ClientApp object (``module:attr``) for benchmarks against a baseline."""
    port = _free_port()
    env = flower_env(run, port, cfg.simulation.ray_address)
    app = stage_app(run, run.config, clientapp=clientapp)
    start = time.monotonic()
    log_file = open(run.flower / "flower.log", "w")
    try:
        out = flwr(["run", str(app), "--format", "json", "--federation-config",
                     federation_config(cfg, num_nodes)], env, run.root)
        try:
            run_id = str(json.loads(out.stdout)["run-id"])
        except (ValueError, KeyError):
            raise SimulationFailed(f"flwr run did not start the run:\n{(out.stdout + out.stderr)[-2000:]}") from None

        def check() -> None:
            if time.monotonic() - start > timeout:
                flwr(["stop", run_id], env, run.root)
                raise SimulationFailed(f"run {run_id} exceeded {timeout:.0f}s and was stopped")

        done = follow_run(run_id, env, run.root, log_file, poll_seconds=poll_seconds, status_seconds=status_seconds,
                          on_poll=on_poll, check=check, start_stream=_start_follower, read_status=run_status)
        handle = SimulationHandle(run_id, done.status, done.details, time.monotonic() - start,
                                  done.status_calls, done.status_cpu_seconds)
        if done.status != "finished:completed":
            raise SimulationFailed(f"Flower run {run_id} ended {done.status}: {done.details}\n"
                                   f"(full log: {run.flower / 'flower.log'})")
        return handle
    finally:
        log_file.close()
        stop_superlink(port)
