"""``fedtune device join``: a Flower SuperNode for this device, with its profile, data and eligibility.

The device's settings travel in the SuperNode's node config (``--node-config``), where the ClientApp reads
them (fedtune/flower/device.py): ``data-path``, ``profile``, ``eligibility``, ``device-id``, ``state-dir``.
Flower 1.41's SuperNode flags used here: ``--superlink HOST:PORT``, ``--root-certificates CA.crt`` (TLS; or
``--insecure``), ``--auth-supernode-private-key KEY`` (node authentication: an OpenSSH EC key whose public
half the server registered), ``--node-config``, and ``--port``, the SuperNode's own local Runtime API port
(default 9094: several SuperNodes on one host need one port each).
"""

from __future__ import annotations

import json
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from fedtune.deploy.eligibility import create_policy
from fedtune.data.tables import SUFFIXES as DATA_SUFFIXES
from fedtune.deploy.processes import flower_exe, reachable, split_address

@dataclass(frozen=True)
class DeviceJoin:
    superlink: str  # HOST:PORT of the SuperLink
    data_path: Path
    profile: str = ""
    root_certificates: Path | None = None  # None with insecure
    auth_key: Path | None = None  # the SuperNode's private key (node authentication)
    eligibility: str = "always"
    device_id: str = ""
    state_dir: Path | None = None
    insecure: bool = False
    runtime_port: int = 0  # 0: a free one
    # one long-lived ClientApp process for every round (the base model loads once; Flower's --isolation
    # process + fedtune.flower.warm_runtime) instead of Flower's fresh flwr-clientapp process per round
    warm: bool = True

    def node_config(self) -> str:
        items = {"data-path": str(Path(self.data_path).absolute()), "profile": self.profile,
                 "eligibility": self.eligibility, "device-id": self.device_id,
                 "state-dir": str(Path(self.state_dir).absolute()) if self.state_dir else ""}
        return " ".join(f"{k}={json.dumps(v)}" for k, v in items.items())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def join_problems(join: DeviceJoin, catalog: Path | None = None, check_reachable: bool = True) -> list[str]:
    """Everything wrong with a join request, each naming its flag and the fix (empty: good to go)."""
    from fedtune.fleet.profiles import DEFAULT_CATALOG_DIR, load_catalog

    p: list[str] = []
    data = Path(join.data_path)
    if data.is_dir():
        p.append(f"--data: {data} is a directory; give this device's .jsonl, .csv or .parquet file")
    elif not data.is_file():
        p.append(f"--data: file not found: {data}")
    elif data.suffix.lower() not in DATA_SUFFIXES:
        p.append(f"--data: {data.name} is not a .jsonl, .csv or .parquet file")
    if join.profile:
        profiles = load_catalog(catalog or DEFAULT_CATALOG_DIR)
        if join.profile not in profiles:
            p.append(f"--profile: unknown device profile {join.profile!r}; choose one of {sorted(profiles)}")
    try:
        create_policy(join.eligibility)
    except ValueError as err:
        p.append(f"--eligibility: {err}")
    if join.insecure and join.root_certificates:
        p.append("--insecure and --root-certificates exclude each other; drop --insecure to use TLS")
    if not join.insecure and join.root_certificates and not Path(join.root_certificates).is_file():
        p.append(f"--root-certificates: file not found: {join.root_certificates}")
    if join.auth_key and not Path(join.auth_key).is_file():
        p.append(f"--auth-key: file not found: {join.auth_key}")
    try:
        host, port = split_address(join.superlink)
    except ValueError as err:
        p.append(f"--superlink: {err}")
    else:
        if check_reachable and not p and not reachable(host, port):
            p.append(f"--superlink: cannot reach {join.superlink} (nothing listens there, or a firewall "
                     "blocks it); check the address and that `fedtune server start` is running")
    return p


def supernode_command(join: DeviceJoin) -> list[str]:
    cmd = [flower_exe("flower-supernode"), "--superlink", join.superlink, "--node-config", join.node_config(),
           "--port", str(join.runtime_port or _free_port()), "--max-retries", "20", "--max-wait-time", "600"]
    if join.warm:
        cmd += ["--isolation", "process"]  # the SuperNode serves its Runtime API; warm_runtime runs the tasks
    if join.insecure:
        cmd.append("--insecure")
    elif join.root_certificates:
        cmd += ["--root-certificates", str(join.root_certificates)]
    if join.auth_key:
        cmd += ["--auth-supernode-private-key", str(join.auth_key)]
    return cmd


def with_runtime_port(join: DeviceJoin) -> DeviceJoin:
    """The join with its SuperNode's Runtime API port fixed (kept across SuperNode restarts, so the warm
    runtime that polls it keeps running, and its model stays loaded, while the SuperNode rejoins)."""
    import dataclasses

    return join if join.runtime_port else dataclasses.replace(join, runtime_port=_free_port())


def warm_runtime_command(join: DeviceJoin, parent_pid: int) -> list[str]:
    """The device's long-lived ClientApp process (fedtune/flower/warm_runtime.py) for its SuperNode."""
    if not join.runtime_port:
        raise ValueError("fix the Runtime API port first (with_runtime_port)")
    return [sys.executable, "-m", "fedtune.flower.warm_runtime", "--runtime-api-address",
            f"127.0.0.1:{join.runtime_port}", "--parent-pid", str(parent_pid)]
