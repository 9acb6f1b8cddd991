"""Start a Flower process with its own log; stop it and everything it started, by PID (never by name)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil


def flower_exe(name: str) -> str:
    """A Flower console script of this interpreter's environment (``flower-superlink``, ``flwr``, ...)."""
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.exists() else name


def start(cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)


def stop_tree(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM the process and all its descendants, wait, then SIGKILL what is left."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, e.g. 127.0.0.1:9092, got {address!r}")
    return host.strip("[]"), int(port)


def reachable(host: str, port: int, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_listening(host: str, port: int, proc: subprocess.Popen | None = None, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        if reachable(host, port, timeout=1.0):
            return True
        time.sleep(0.2)
    return False


def flower_env(home: Path) -> dict[str, str]:
    """This environment plus Flower's offline switches and a private FLWR_HOME."""
    from fedtune.flower.simulation import OFFLINE_ENV

    env = dict(os.environ, **OFFLINE_ENV)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_HOME"] = str(home)
    home.mkdir(parents=True, exist_ok=True)
    return env
