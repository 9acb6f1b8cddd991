"""Flower 1.41's SuperLink for a deployment: its command line, the `flwr` connection, SuperNode keys, runs.

What Flower 1.41 actually has (read from its installed source; earlier docs differ):
  * one HTTPS endpoint (``--host``/``--port``, default 127.0.0.1:8000) serves the Fleet API (SuperNodes),
    the Control API (``flwr run``/``ls``/``supernode register``) and the Runtime API (the ServerApp);
    ``--fleet-api-address`` / ``--control-api-address`` are deprecated;
  * TLS: ``--ssl-ca-certfile --ssl-certfile --ssl-keyfile`` (all three), or ``--insecure``;
  * node authentication: ``--enable-supernode-auth``; then SuperNodes cannot register themselves: each
    public key is registered through the Control API (``flwr supernode register KEY.pub CONNECTION``),
    and a SuperNode whose key is unknown is refused at activation (it exits with code 305);
    ``--auth-list-public-keys`` is deprecated;
  * ``flwr`` reads connections from ``$FLWR_HOME/config.toml``: ``[superlink.<name>]`` with ``address``
    and ``root-certificates`` (or ``insecure = true``).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fedtune.deploy.certs import CertPaths
from fedtune.deploy.processes import flower_exe

CONNECTION = "fedtune"


@dataclass(frozen=True)
class SuperLinkSpec:
    host: str = "127.0.0.1"
    port: int = 9092
    certs: CertPaths | None = None  # None: --insecure (loopback trials only)
    auth: bool = True  # --enable-supernode-auth: only registered SuperNode keys may join
    database: Path | None = None  # None: in memory

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class FlowerCommandFailed(RuntimeError):
    pass


def superlink_command(spec: SuperLinkSpec) -> list[str]:
    cmd = [flower_exe("flower-superlink"), "--host", spec.host, "--port", str(spec.port),
           "--disable-runtime-dependency-installation"]
    if spec.certs is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(spec.certs.ca_cert), "--ssl-certfile", str(spec.certs.server_cert),
                "--ssl-keyfile", str(spec.certs.server_key)]
    if spec.auth:
        cmd.append("--enable-supernode-auth")
    if spec.database is not None:
        cmd += ["--database", str(spec.database)]
    return cmd


def write_connection(home: Path, spec: SuperLinkSpec, client_host: str | None = None) -> None:
    """``$FLWR_HOME/config.toml`` with one connection, ``fedtune``, the default."""
    host = client_host or ("127.0.0.1" if spec.host in ("0.0.0.0", "::") else spec.host)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f"address = {json.dumps(f'{host}:{spec.port}')}"]
    lines.append(f"root-certificates = {json.dumps(str(spec.certs.ca_cert))}" if spec.certs else "insecure = true")
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def flwr(args: list[str], env: dict, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([flower_exe("flwr"), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def register_supernode(public_key: Path, env: dict) -> int | None:
    """Register one SuperNode public key; its node id, or None if the SuperLink already knows the key."""
    out = flwr(["supernode", "register", str(public_key), CONNECTION, "--format", "json"], env)
    try:
        reply = json.loads(out.stdout)
    except ValueError:
        reply = {}
    if reply.get("success"):
        return int(reply["node-id"])
    text = out.stdout + out.stderr
    if "already" in text.lower():
        return None
    raise FlowerCommandFailed(f"flwr supernode register {public_key.name} failed: {text.strip()[-400:]}")


def submit_run(app: Path, env: dict, cwd: Path) -> str:
    out = flwr(["run", str(app), CONNECTION, "--format", "json"], env, cwd)
    try:
        return str(json.loads(out.stdout)["run-id"])
    except (ValueError, KeyError):
        raise FlowerCommandFailed(f"flwr run did not start the run: {(out.stdout + out.stderr).strip()[-1500:]}"
                                  ) from None


def run_status(run_id: str, env: dict, cwd: Path) -> tuple[str, str]:
    out = flwr(["ls", "--run-id", run_id, "--format", "json"], env, cwd)
    try:
        run = json.loads(out.stdout)["runs"][0]
        return run["status"], run.get("status-details", "")
    except (ValueError, KeyError, IndexError):
        return "unknown", (out.stdout + out.stderr)[-500:]
