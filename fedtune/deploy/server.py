"""``fedtune server start``: a SuperLink with TLS and node authentication, and one fedtune run on it.

  1. Prepare the run directory (resolved config, the server's held-out evaluation data:
     ``fedtune.data.prepare_run_data``). A run directory that already holds a checkpoint is resumed: the
     ServerApp starts at the round after it.
  2. Start ``flower-superlink`` (our child; its log is flower/superlink.log) and wait until it listens.
  3. Write a private FLWR_HOME whose ``fedtune`` connection trusts the CA; register every authorized
     SuperNode public key (node authentication: keys not registered are refused).
  4. Submit the run (``flwr run``) with ``deployment-nodes`` = how many devices must join before round 1;
     follow its ``flwr log`` stream until Flower reports it finished (``flwr run`` exits 0 even for a failed
     run; the status is read when the stream ends, not every poll: ``fedtune.deploy.follow``).
  5. Stop the SuperLink and what it started, by PID.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedtune.config import ExperimentConfig
from fedtune.deploy.follow import follow_run, start_log_stream
from fedtune.deploy.processes import flower_env, reachable, start, stop_tree, wait_listening
from fedtune.deploy.superlink import (
    FlowerCommandFailed, SuperLinkSpec, register_supernode, run_status, submit_run, superlink_command,
    write_connection,
)
from fedtune.workspace import RunDir

log = logging.getLogger(__name__)


class ServerFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class ServerRun:
    run_id: str
    status: str
    seconds: float
    registered: int


def authorized_keys(path: Path | None) -> list[Path]:
    """A directory of ``*.pub`` SuperNode keys, or one ``.pub`` file."""
    if path is None:
        return []
    path = Path(path)
    if path.is_file():
        return [path]
    keys = sorted(path.glob("*.pub")) if path.is_dir() else []
    if not keys:
        raise ServerFailed(f"--authorized-keys: no SuperNode public keys (*.pub) at {path}; make them with "
                           "`fedtune certs supernode NAME` or drop --auth")
    return keys


def start_server(cfg: ExperimentConfig, run: RunDir, spec: SuperLinkSpec, *, keys: list[Path], min_nodes: int,
                 on_poll: Callable[[], None] | None = None, poll_seconds: float = 1.0,
                 timeout: float = 24 * 3600, status_seconds: float = 60.0) -> ServerRun:
    """Steps 2-5 (the caller did step 1); raise ServerFailed with Flower's reason when the run fails.

    The run is followed through its ``flwr log`` stream (``fedtune.deploy.follow``): ``on_poll`` runs
    every ``poll_seconds`` in this process, the status (a ``flwr ls`` process) is read when the stream
    ends and otherwise every ``status_seconds``."""
    from fedtune.flower.simulation import stage_app

    if reachable(spec.host if spec.host not in ("0.0.0.0", "::") else "127.0.0.1", spec.port, timeout=1):
        raise ServerFailed(f"--port: {spec.address} is already in use (another SuperLink?); stop it or pick "
                           "another port")
    home = run.flower / "deploy-home"
    env = flower_env(home)
    write_connection(home, spec)
    t0 = time.monotonic()
    proc = start(superlink_command(spec), env, run.flower / "superlink.log", cwd=run.root)
    try:
        if not wait_listening(spec.host if spec.host not in ("0.0.0.0", "::") else "127.0.0.1", spec.port, proc):
            tail = (run.flower / "superlink.log").read_text()[-1500:]
            raise ServerFailed(f"the SuperLink did not start on {spec.address}:\n{tail}")
        registered = 0
        for key in keys if spec.auth else []:
            registered += register_supernode(key, env) is not None
        # the config travels inside the run too: a device that cannot read config-path uses it
        app = stage_app(run, run.config, extra={"deployment-nodes": int(min_nodes),
                                                "config-yaml": run.config.read_text()})
        run_id = submit_run(app, env, run.root)
        run.append_event({"event": "deployment_run", "run_id": run_id, "superlink": spec.address,
                          "registered_keys": registered})

        def check() -> None:
            if time.monotonic() - t0 > timeout:
                raise ServerFailed(f"run {run_id} exceeded {timeout:.0f}s")
            if proc.poll() is not None:
                raise ServerFailed(f"the SuperLink exited (code {proc.returncode}); see {run.flower / 'superlink.log'}")

        with open(run.flower / "flower.log", "ab") as out:
            done = follow_run(run_id, env, run.root, out, poll_seconds=poll_seconds, status_seconds=status_seconds,
                              on_poll=on_poll, check=check, start_stream=start_log_stream, read_status=run_status)
        status = done.status
        if status != "finished:completed":
            raise ServerFailed(f"Flower run {run_id} ended {status}: {done.details} (log: {run.flower / 'flower.log'})")
        return ServerRun(run_id, status, time.monotonic() - t0, registered)
    except FlowerCommandFailed as err:
        raise ServerFailed(str(err)) from None
    finally:
        stop_tree(proc.pid)
