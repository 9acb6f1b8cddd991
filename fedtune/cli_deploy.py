"""`fedtune server start`, `fedtune device join`, `fedtune certs`: thin wrappers over Flower's deployment.

Every user error (bad config, missing file, unreachable SuperLink, refused key) is one line and exit code 2.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from fedtune.cli_errors import new_app

console = Console(highlight=False, soft_wrap=True)
server_app = new_app(help="Run the federated server for real devices (Flower SuperLink, TLS, node auth).")
certs_app = new_app(help="Make a local CA, a SuperLink certificate and SuperNode keys (for tests and trials).")


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
    from fedtune.data import prepare_run_data
    from fedtune.deploy.server import ServerFailed, authorized_keys as read_keys, start_server
    from fedtune.deploy.superlink import SuperLinkSpec
    from fedtune.workspace import RunDir, check_run_root

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
    check_run_root(out, resume=True)  # the same --out resumes; anything else there is refused
    resuming = (out / "checkpoint.json").is_file()
    if (out / "config.yaml").is_file():
        before, now = load_config(out / "config.yaml").to_dict(), cfg.to_dict()
        before["federation"].pop("rounds"), now["federation"].pop("rounds")
        if before != now:
            _fail(f"{config}: differs from the config {out} was started with ({out / 'config.yaml'}) in more than "
                  "federation.rounds; restart with the same config or choose another --out")
    prepared = None if (out / "data" / "index.json").is_file() else prepare_run_data(cfg)  # refuses bad data
    run = RunDir.create(out)  # every check passed: only now is anything written
    dump_config(cfg, run.config)
    if prepared is not None:
        from fedtune.data import save_client_data

        save_client_data(prepared.clients, run.data)
        if prepared.dropped:
            console.print(f"[yellow]warning:[/yellow] server evaluation data: {prepared.dropped_note()}")
            run.append_event({"event": "users_dropped", "users": list(prepared.dropped),
                              "seq_len": cfg.data.seq_len, "reason": "no full training chunk"})
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
                insecure: bool = typer.Option(False, "--insecure", help="no TLS (loopback trials only)"),
                warm: bool = typer.Option(True, "--warm/--no-warm",
                                          help="one long-lived ClientApp process for all rounds (the model loads "
                                               "once) / Flower's fresh process per round")) -> None:
    """Join the federation as a Flower SuperNode; trains in the rounds it is picked for while eligible.

    By default one long-lived ClientApp process serves every round (the base model loads once per device);
    --no-warm falls back to Flower's fresh ClientApp process per round."""
    from fedtune.deploy.device_runner import DeviceRunner, checked_join
    from fedtune.deploy.supernode import DeviceJoin

    if not insecure and root_certificates is None:
        _fail("--root-certificates: TLS needs the CA certificate (ca.crt from the server operator), or pass "
              "--insecure for a loopback trial")
    join = checked_join(DeviceJoin(superlink=superlink, data_path=data, profile=profile,
                                   root_certificates=root_certificates, auth_key=auth_key, eligibility=eligibility,
                                   device_id=device_id or data.stem, state_dir=state_dir, insecure=insecure,
                                   warm=warm))
    runner = DeviceRunner(join, on_status=console.print)
    console.print(f"joining {superlink} as {join.device_id} (profile {profile or '-'}, eligibility {eligibility}, "
                  f"{'one warm ClientApp process' if warm else 'a ClientApp process per round'}); log: "
                  f"{runner.supernode_log}")
    signal.signal(signal.SIGTERM, lambda *_: runner.stop())
    try:
        runner.run()
    except KeyboardInterrupt:
        runner.stop()
