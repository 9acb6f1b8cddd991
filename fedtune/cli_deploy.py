"""`fedtune server start`, `fedtune device join`, `fedtune certs`: thin wrappers over Flower's deployment.

Every user error (bad config, missing file, unreachable SuperLink, refused key) is one line and exit code 2.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

console = Console(highlight=False, soft_wrap=True)
server_app = typer.Typer(add_completion=False, no_args_is_help=True,
                         help="Run the federated server for real devices (Flower SuperLink, TLS, node auth).")
certs_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Make a local CA, a SuperLink certificate and SuperNode keys (for tests and trials).")


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {' '.join(message.split())}")
    raise typer.Exit(2)


def _config(path: Path, overrides: list[str]):
    from fedtune.config import ConfigError, load_config, with_absolute_paths

    try:
        return with_absolute_paths(load_config(path, overrides))
    except ConfigError as err:
        _fail(f"{path}: " + "; ".join(err.problems))


@certs_app.command("ca")
def certs_ca(out: Path = typer.Option(Path("certs"), "--out", help="directory for ca.crt, server.crt/.key"),
             host: list[str] = typer.Option([], "--host", help="SuperLink host name or IP (repeatable); "
                                                               "localhost and 127.0.0.1 are always included"),
             days: int = typer.Option(30, "--days", min=1)) -> None:
    """A test CA and the SuperLink's TLS certificate signed by it."""
    from fedtune.deploy.certs import make_ca_and_server

    paths = make_ca_and_server(out, host, days)
    console.print(f"CA: {paths.ca_cert} (give it to devices: --root-certificates)\n"
                  f"SuperLink: {paths.server_cert}, {paths.server_key}")


@certs_app.command("supernode")
def certs_supernode(names: list[str] = typer.Argument(..., help="one key pair per device name"),
                    out: Path = typer.Option(Path("certs"), "--out")) -> None:
    """SuperNode authentication key pairs (OpenSSH EC P-384); register the .pub on the server."""
    from fedtune.deploy.certs import make_supernode_key

    for name in names:
        try:
            private, public = make_supernode_key(out, name)
        except ValueError as err:
            _fail(str(err))
        console.print(f"{name}: private {private} (stays on the device), public {public} (server: "
                      "--authorized-keys)")


@server_app.command("start")
def server_start(config: Path = typer.Argument(..., help="experiment YAML"),
                 set_: list[str] = typer.Option([], "--set", help="override, e.g. federation.rounds=5"),
                 out: Path = typer.Option(..., "--out", help="run directory; restarting with the same one resumes"),
                 host: str = typer.Option("127.0.0.1", "--host", help="address the SuperLink binds (0.0.0.0: all)"),
                 port: int = typer.Option(9092, "--port", help="the SuperLink's one HTTPS port (Fleet + Control)"),
                 certs: Optional[Path] = typer.Option(None, "--certs", help="directory from `fedtune certs ca`"),
                 insecure: bool = typer.Option(False, "--insecure", help="no TLS (loopback trials only)"),
                 authorized_keys: Optional[Path] = typer.Option(
                     None, "--authorized-keys", help="SuperNode public keys (*.pub dir or file); turns node "
                                                     "authentication on"),
                 min_nodes: Optional[int] = typer.Option(None, "--min-nodes", min=1,
                                                         help="devices that must join before round 1 "
                                                              "(default: federation.clients_per_round)"),
                 verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Start a SuperLink and run the experiment on the devices that join; resume after a crash."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)
    from fedtune.config import dump_config, load_config
    from fedtune.deploy.certs import CertPaths
    from fedtune.deploy.server import ServerFailed, authorized_keys as read_keys, prepare_data, start_server
    from fedtune.deploy.superlink import SuperLinkSpec
    from fedtune.workspace import RunDir

    cfg = _config(config, set_)
    from fedtune.federation.capabilities import refusals

    for problem in refusals(cfg, deployment=True):  # pairs with `deployment` (the config alone passed validate)
        _fail(problem)
    if certs is None and not insecure:
        _fail("--certs: TLS needs the directory from `fedtune certs ca` (or pass --insecure for a loopback trial)")
    paths = CertPaths(certs) if certs is not None and not insecure else None
    if paths is not None and not all(p.is_file() for p in (paths.ca_cert, paths.server_cert, paths.server_key)):
        _fail(f"--certs: {certs} lacks ca.crt, server.crt or server.key; make them with `fedtune certs ca --out {certs}`")
    try:
        keys = read_keys(authorized_keys)
    except ServerFailed as err:
        _fail(str(err))
    run = RunDir.create(out)
    resuming = (run.root / "checkpoint.json").is_file()
    if resuming and run.config.is_file():
        before, now = load_config(run.config).to_dict(), cfg.to_dict()
        before["federation"].pop("rounds"), now["federation"].pop("rounds")
        if before != now:
            _fail(f"{config}: differs from the config {out} was started with ({run.config}) in more than "
                  "federation.rounds; restart with the same config or choose another --out")
    dump_config(cfg, run.config)
    try:
        prepare_data(cfg, run)
    except (ValueError, FileNotFoundError) as err:
        _fail(f"data: {err}")
    # the SuperLink's state (registered keys, node ids) survives a restart: devices keep their node ids
    spec = SuperLinkSpec(host=host, port=port, certs=paths, auth=bool(keys), database=run.flower / "superlink.db")
    nodes = min_nodes or cfg.federation.clients_per_round
    console.print(f"run directory: {run.root}" + (" (resuming from its checkpoint)" if resuming else ""))
    console.print(f"SuperLink on {spec.address} (TLS {'on' if paths else 'OFF'}, node authentication "
                  f"{'on: ' + str(len(keys)) + ' keys' if keys else 'OFF'}); waiting for {nodes} devices")
    from fedtune.cli import _Progress

    progress = _Progress(run, cfg.federation.rounds)
    try:
        done = start_server(cfg, run, spec, keys=keys, min_nodes=nodes, on_poll=progress)
    except ServerFailed as err:
        console.print(f"[red]server failed:[/red] {err}")
        raise typer.Exit(1) from None
    records = run.read_metrics()
    last = records[-1] if records else {}
    console.print(f"done in {done.seconds:.0f}s (Flower run {done.run_id}); round {last.get('round')}: "
                  f"held-out perplexity {last.get('eval_perplexity')}")


def device_join(superlink: str = typer.Option(..., "--superlink", help="the SuperLink's HOST:PORT"),
                profile: str = typer.Option("", "--profile", help="device profile in configs/devices"),
                data: Path = typer.Option(..., "--data", help="this device's own JSONL / CSV / Parquet file"),
                root_certificates: Optional[Path] = typer.Option(None, "--root-certificates",
                                                                 help="the CA that signed the SuperLink's certificate"),
                auth_key: Optional[Path] = typer.Option(None, "--auth-key",
                                                        help="this device's private key (node authentication)"),
                eligibility: str = typer.Option("always", "--eligibility",
                                                help="when to train: always, charging, idle, unmetered, "
                                                     "memory:GB, never; combine with +"),
                device_id: str = typer.Option("", "--device-id", help="stable name (its privacy ledger's key)"),
                state_dir: Path = typer.Option(Path.home() / ".fedtune" / "device", "--state-dir"),
                insecure: bool = typer.Option(False, "--insecure", help="no TLS (loopback trials only)")) -> None:
    """Join the federation as a Flower SuperNode; trains in the rounds it is picked for while eligible."""
    from fedtune.deploy.processes import flower_env
    from fedtune.deploy.supernode import DeviceJoin, join_problems, supernode_command

    if not insecure and root_certificates is None:
        _fail("--root-certificates: TLS needs the CA certificate (ca.crt from the server operator), or pass "
              "--insecure for a loopback trial")
    join = DeviceJoin(superlink=superlink, data_path=data, profile=profile, root_certificates=root_certificates,
                      auth_key=auth_key, eligibility=eligibility, device_id=device_id or data.stem,
                      state_dir=state_dir, insecure=insecure)
    problems = join_problems(join)
    if problems:
        _fail(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / "supernode.log"
    env = flower_env(state_dir / "flwr-home")
    console.print(f"joining {superlink} as {join.device_id} (profile {profile or '-'}, eligibility {eligibility}); "
                  f"log: {log_path}")
    stopping, proc = [], None

    def stop(*_):
        stopping.append(True)
        if proc is not None and proc.poll() is None:
            proc.terminate()

    signal.signal(signal.SIGTERM, stop)
    backoff, refusals = 2.0, 0
    while True:  # a device app keeps its SuperNode up: rejoin when the SuperLink restarts or drops it
        start = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(supernode_command(join), env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            stop()
            rc = proc.wait()
        if stopping:
            sys.exit(0)
        with open(log_path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
        refused = "Exit Code: 305" in text or "[code: 2004]" in text
        if refused and refusals < 2:  # the server may still be registering keys: ask again shortly
            refusals += 1
            time.sleep(5)
            continue
        if refused:
            _fail(f"the SuperLink at {superlink} refused this device: its key is not registered there (node "
                  f"authentication); give the operator {auth_key}.pub" if auth_key else
                  f"the SuperLink at {superlink} refused this device: it requires node authentication (--auth-key)")
        console.print(f"the SuperNode exited (code {rc}); rejoining in {backoff:.0f}s")
        time.sleep(backoff)
        backoff = min(backoff * 2, 60.0)
        if stopping:
            sys.exit(0)
    sys.exit(0)
