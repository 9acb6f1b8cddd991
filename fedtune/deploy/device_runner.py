"""Keep one device in the federation: its SuperNode (rejoined when the SuperLink restarts or drops it) and,
by default, its warm ClientApp process (fedtune/flower/warm_runtime.py), which outlives SuperNode restarts so
the base model stays loaded.

Used by ``fedtune device join`` (blocking, in the foreground) and by ``fedtune.device.join`` (in a thread of
an app). Every process it starts is stopped by its PID.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from fedtune.deploy.processes import flower_env, stop_tree
from fedtune.deploy.supernode import (
    DeviceJoin, join_problems, supernode_command, warm_runtime_command, with_runtime_port,
)
from fedtune.errors import UserError

log = logging.getLogger(__name__)
REFUSED_MARKERS = ("Exit Code: 305", "[code: 2004]")  # Flower's "node authentication failed"


def checked_join(join: DeviceJoin, check_reachable: bool = True) -> DeviceJoin:
    """The join with a fixed Runtime API port, or a UserError naming the first problem (and how many more)."""
    problems = join_problems(join, check_reachable=check_reachable)
    if problems:
        raise UserError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    state = Path(join.state_dir) if join.state_dir else Path.home() / ".fedtune" / "device"
    if state.exists() and not state.is_dir():
        raise UserError(f"--state-dir: {state} is a file; give a directory for this device's state")
    return with_runtime_port(join)


@dataclass
class DeviceRunner:
    join: DeviceJoin  # from checked_join
    on_status: object = None  # callable(str): a line for people (the CLI prints it)
    refusal_retries: int = 2  # the server may still be registering keys: ask again shortly
    max_backoff: float = 60.0

    def __post_init__(self):
        self.state = Path(self.join.state_dir or Path.home() / ".fedtune" / "device").absolute()
        self.state.mkdir(parents=True, exist_ok=True)
        self.env = flower_env(self.state / "flwr-home")
        self.env["FEDTUNE_DEVICE_HOME"] = str(self.state)  # the device's run context lives in its state dir
        self.supernode: subprocess.Popen | None = None
        self.runtime: subprocess.Popen | None = None
        self.stopping = threading.Event()

    @property
    def supernode_log(self) -> Path:
        return self.state / "supernode.log"

    @property
    def clientapp_log(self) -> Path:
        return self.state / "clientapp.log"

    def _say(self, line: str) -> None:
        log.info(line)
        if callable(self.on_status):
            self.on_status(line)

    def _ensure_runtime(self) -> None:
        if self.join.warm and (self.runtime is None or self.runtime.poll() is not None):
            with open(self.clientapp_log, "ab") as out:
                self.runtime = subprocess.Popen(warm_runtime_command(self.join, os.getpid()), env=self.env,
                                                stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        """Ask the running loop to end (from a signal handler or another thread)."""
        self.stopping.set()
        if self.supernode is not None and self.supernode.poll() is None:
            self.supernode.terminate()

    def run(self) -> None:
        """Block until stop(); raise UserError when the SuperLink refuses this device's key."""
        backoff, refusals = 2.0, 0
        try:
            while not self.stopping.is_set():
                self._ensure_runtime()
                start = self.supernode_log.stat().st_size if self.supernode_log.exists() else 0
                with open(self.supernode_log, "ab") as out:
                    self.supernode = subprocess.Popen(supernode_command(self.join), env=self.env, stdout=out,
                                                      stderr=subprocess.STDOUT)
                rc = self.supernode.wait()
                if self.stopping.is_set():
                    return
                with open(self.supernode_log, "rb") as f:
                    f.seek(start)
                    text = f.read().decode(errors="replace")
                if any(m in text for m in REFUSED_MARKERS):
                    if refusals < self.refusal_retries:
                        refusals += 1
                        self.stopping.wait(5)
                        continue
                    j = self.join
                    raise UserError(
                        f"the SuperLink at {j.superlink} refused this device: its key is not registered there (node "
                        f"authentication); give the operator {j.auth_key}.pub" if j.auth_key else
                        f"the SuperLink at {j.superlink} refused this device: it requires node authentication "
                        "(--auth-key)")
                self._say(f"the SuperNode exited (code {rc}); rejoining in {backoff:.0f}s")
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)
        finally:
            if self.supernode is not None and self.supernode.poll() is None:
                stop_tree(self.supernode.pid)
            if self.runtime is not None:
                stop_tree(self.runtime.pid)
