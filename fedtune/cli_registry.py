"""`fedtune registry ...`, `fedtune device ...` and `fedtune export ...`: printing over fedtune.registry/export.

Mounted in fedtune/cli.py with ``app.add_typer(registry_app, name="registry")`` etc.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from fedtune.registry.errors import InputError, NotFoundError, RegistryError

console = Console(highlight=False, width=None if os.isatty(1) else 140)
registry_app = typer.Typer(add_completion=False, no_args_is_help=True,
                           help="Signed, versioned adapters: keys, publish, list, promote, rollback, serve.")
device_app = typer.Typer(add_completion=False, no_args_is_help=True,
                         help="A device's side: pull (verify + switch atomically), rollback, status.")
export_app = typer.Typer(add_completion=False, no_args_is_help=True,
                         help="Export an adapter directory for on-device runtimes: peft, merged, gguf-lora, onnx.")

REGISTRY = typer.Option(Path("registry"), "--registry", "-r", envvar="FEDTUNE_REGISTRY",
                        help="registry directory (registry.sqlite + blobs/)")
STATE = typer.Option(Path("device"), "--state", envvar="FEDTUNE_DEVICE_STATE", help="device state directory")
PUBLIC_KEY = typer.Option(..., "--public-key", envvar="FEDTUNE_PUBLIC_KEY",
                          help="trust anchor: the publisher's key (.pub) or a root metadata file")
KEYS = typer.Option(..., "--key", envvar="FEDTUNE_SIGNING_KEY",
                    help="signing key (repeat: a threshold of several keys, and the snapshot and timestamp keys "
                         "when the root gives those roles their own)")
EXPIRES = typer.Option(7.0, "--expires-in", help="days until devices refuse this channel metadata (refresh before)")
_USER_ERRORS = (InputError, NotFoundError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                ValueError)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Library errors become one red line, never a traceback: exit 2 for bad input, 1 for a refusal."""
    try:
        yield
    except _USER_ERRORS as err:
        console.print(f"[red]error:[/red] {err}", soft_wrap=True)
        raise typer.Exit(2) from None
    except RegistryError as err:
        console.print(f"[red]error:[/red] {err}", soft_wrap=True)
        raise typer.Exit(1) from None


def _registry(root: Path, create: bool = False):
    from fedtune.registry import Registry

    if not create and not (root / "registry.sqlite").is_file():
        raise InputError(f"{root}: not a registry (no registry.sqlite); pass --registry DIR or set FEDTUNE_REGISTRY "
                         "(`fedtune registry publish` makes one)")
    return Registry(root)


def _state_dir(state: Path) -> Path:
    if not (state / "device.json").is_file():
        raise InputError(f"{state}: not a device state directory (no device.json); pass --state DIR or set "
                         "FEDTUNE_DEVICE_STATE (`fedtune device pull` makes one)")
    return state


def _signing_keys(paths: list[Path]):
    from fedtune.registry import load_signing_key

    return [load_signing_key(p) for p in paths]


# --- registry ----------------------------------------------------------------------------------------
@registry_app.command()
def keygen(out: Path = typer.Option(Path("fedtune-signing.key"), "--out", help="private key path (.pub beside it)"),
           force: bool = typer.Option(False, "--force", help="overwrite existing key files")) -> None:
    """Make an ed25519 key pair: keep the private key secret, give the .pub to devices."""
    from fedtune.registry import generate_keypair

    with _errors():
        key = generate_keypair(out, overwrite=force)
    console.print(f"private key {out} (mode 600), public key {out.with_suffix('.pub')}, key id {key.key_id}")


@registry_app.command()
def publish(source: Path = typer.Argument(..., help="run directory (or one adapters/round-N directory)"),
            registry: Path = REGISTRY,
            key: Path = typer.Option(..., "--key", envvar="FEDTUNE_SIGNING_KEY", help="private signing key"),
            round_: Optional[int] = typer.Option(None, "--round", help="round to publish (default: the latest)"),
            name: Optional[str] = typer.Option(None, "--name", help="adapter name (default: the run's name)"),
            metric: Optional[list[str]] = typer.Option(None, "--metric",
                                                       help="a round metric to publish in the manifest (repeat; "
                                                            "default none: only the privacy guarantee)")) -> None:
    """Publish a run's adapter as a new signed version (devices see it only once promoted)."""
    from fedtune.registry import load_signing_key, publish_run
    from fedtune.registry.publish import artifact_info

    with _errors():
        if not source.exists():
            raise InputError(f"{source}: no such run or adapter directory")
        is_adapter = (source / "adapter_config.json").is_file()
        if not is_adapter and not any((source / "adapters").glob("round-*/fedtune.json")):
            raise InputError(f"{source}: no adapters/round-N/fedtune.json; pass the --out directory of a "
                             f"`fedtune simulate` run that finished at least one round, or one adapters/round-N")
        signing = load_signing_key(key)  # checked before the registry is created: a refusal writes nothing
        reg = _registry(registry, create=True)
        if is_adapter:
            run_name = source.parent.parent.name if source.parent.name == "adapters" else source.name
            signed = reg.publish(source, artifact_info(source, run_name, name=name, metrics=metric or ()), signing)
        else:
            signed = publish_run(source, reg, signing, round=round_, name=name, metrics=metric or ())
    m = signed.manifest
    eps = f"ε={m.privacy.epsilon:.3g}, δ={m.privacy.delta:g}" if m.privacy.epsilon is not None else "no DP"
    console.print(f"published [bold]v{m.version}[/bold] {m.name} (run {m.source.run}, round {m.source.round}; "
                  f"{m.privacy.level}-level {eps}; {len(m.files)} files, {m.total_bytes:,} bytes; "
                  f"signed by {signed.key_id}). Next: fedtune registry promote {m.version} --rollout 10%")


@registry_app.command("list")
def list_(registry: Path = REGISTRY,
          base_model: Optional[str] = typer.Option(None, "--base-model", help="only this base model"),
          events: bool = typer.Option(False, "--events", help="also show the latest publish/promote/rollback")) -> None:
    """Versions (with ε and metrics) and the channels that serve them."""
    with _errors():
        reg = _registry(registry)
        versions, channels = reg.versions(base_model), reg.channels()
    table = Table(title=f"registry {registry}", title_justify="left")
    for col in ("version", "name", "base model", "run/round", "privacy", "eval_loss", "bytes", "created", "channels"):
        table.add_column(col)
    where: dict[int, list[str]] = {}
    for c in channels:
        if c.current is not None:
            where.setdefault(c.current, []).append(c.channel)
        if c.candidate is not None:
            where.setdefault(c.candidate, []).append(f"{c.channel} {c.rollout:g}%")
    for s in versions:
        m = s.manifest
        pv = m.privacy
        privacy = f"{pv.level} ε={pv.epsilon:.3g}" if pv.epsilon is not None else pv.level
        loss = m.metrics.get("eval_loss")
        table.add_row(f"v{m.version}", m.name, m.base_model.id, f"{m.source.run}/{m.source.round}", privacy,
                      f"{loss:.4f}" if loss is not None else "-", f"{m.total_bytes:,}", m.created_at,
                      ", ".join(where.get(m.version, [])))
    console.print(table)
    for c in channels:
        staged = f", v{c.candidate} to {c.rollout:g}%" if c.candidate is not None else ""
        console.print(f"channel {c.base_model_id}/{c.channel}: v{c.current}{staged}"
                      f" (history {', '.join(f'v{v}' for v in c.history) or '-'})")
    if events:
        for e in reg.events():
            console.print(f"  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(e.at))} {e.action:8s} "
                          f"{e.base_model_id}/{e.channel or '-'} v{e.version} {e.detail}")


@registry_app.command()
def promote(version: int = typer.Argument(..., help="version number (see `fedtune registry list`)"),
            registry: Path = REGISTRY,
            channel: str = typer.Option("stable", "--channel"),
            rollout: str = typer.Option("100%", "--rollout", help="share of devices, e.g. 10%"),
            key: list[Path] = KEYS, expires_in: float = EXPIRES) -> None:
    """Serve VERSION on a channel to a deterministic share of devices (100% = everyone); signs the channel."""
    from fedtune.registry.rollout import parse_percent

    with _errors():
        state = _registry(registry).promote(version, channel, parse_percent(rollout), keys=_signing_keys(key),
                                            ttl_s=expires_in * 86400)
    if state.candidate is not None:
        console.print(f"{state.base_model_id}/{channel}: v{state.candidate} to {state.rollout:g}% of devices, "
                      f"the rest stay on {f'v{state.current}' if state.current else 'nothing'}")
    else:
        console.print(f"{state.base_model_id}/{channel}: v{state.current} for every device")


@registry_app.command()
def rollback(registry: Path = REGISTRY, channel: str = typer.Option("stable", "--channel"),
             base_model: Optional[str] = typer.Option(None, "--base-model",
                                                      help="needed when several base models use the channel"),
             key: list[Path] = KEYS, expires_in: float = EXPIRES) -> None:
    """Abort a staged rollout, or else return the channel to the version before the current one (signed)."""
    with _errors():
        reg = _registry(registry)
        base_model = _one_base(reg, channel, base_model)
        state = reg.rollback(base_model, channel, keys=_signing_keys(key), ttl_s=expires_in * 86400)
    console.print(f"{base_model}/{channel}: now v{state.current} for every device")


def _one_base(reg, channel: str, base_model: Optional[str]) -> str:
    if base_model is not None:
        return base_model
    bases = sorted({c.base_model_id for c in reg.channels() if c.channel == channel})
    if len(bases) != 1:
        raise InputError(f"channel {channel!r} serves base models {bases or 'none'}; pick one with --base-model")
    return bases[0]


@registry_app.command()
def refresh(registry: Path = REGISTRY, channel: str = typer.Option("stable", "--channel"),
            base_model: Optional[str] = typer.Option(None, "--base-model"),
            key: list[Path] = KEYS, expires_in: float = EXPIRES,
            timestamp_only: bool = typer.Option(False, "--timestamp-only",
                                                help="re-sign only the timestamp (expires in --expires-in days, "
                                                     "at most 1 by default: run it from cron with the timestamp key)"),
            ) -> None:
    """Re-sign a channel's metadata unchanged with a new expiry (devices refuse expired metadata)."""
    with _errors():
        reg = _registry(registry)
        if timestamp_only:
            ts = reg.refresh_timestamp(keys=_signing_keys(key), ttl_s=min(expires_in, 1.0) * 86400)
        else:
            base_model = _one_base(reg, channel, base_model)
            meta = reg.refresh(base_model, channel, keys=_signing_keys(key), ttl_s=expires_in * 86400)
    if timestamp_only:
        console.print(f"timestamp v{ts.version} (snapshot v{ts.snapshot.version}), expires {ts.expires}")
        return
    console.print(f"{base_model}/{channel}: metadata v{meta.version}, expires {meta.expires}")


@registry_app.command()
def rotate(registry: Path = REGISTRY, key: list[Path] = KEYS,
           root_key: list[Path] = typer.Option(..., "--root-key", help="public key of the new root role (repeat)"),
           threshold: int = typer.Option(1, "--threshold", help="root signatures required"),
           release_key: list[Path] = typer.Option(..., "--release-key", help="public release key (repeat)"),
           release_threshold: int = typer.Option(1, "--release-threshold", help="release signatures required"),
           snapshot_key: Optional[list[Path]] = typer.Option(None, "--snapshot-key",
                                                             help="public snapshot key (repeat; default: the "
                                                                  "release keys)"),
           timestamp_key: Optional[list[Path]] = typer.Option(None, "--timestamp-key",
                                                              help="public timestamp key (repeat; default: the release "
                                                                   "keys)")) -> None:
    """New root metadata (keys and thresholds), signed by a threshold of the old and of the new root keys."""
    from fedtune.registry import load_verify_key

    with _errors():
        reg = _registry(registry)
        root = reg.rotate_root(_signing_keys(key), [load_verify_key(p) for p in root_key], threshold,
                               [load_verify_key(p) for p in release_key], release_threshold,
                               snapshot_keys=[load_verify_key(p) for p in snapshot_key] if snapshot_key else None,
                               timestamp_keys=[load_verify_key(p) for p in timestamp_key] if timestamp_key else None)
    console.print(f"root v{root.version}: {len(root.roles['root'].keyids)} root keys (threshold {threshold}), "
                  f"{len(root.roles['release'].keyids)} release keys (threshold {release_threshold}). Next: "
                  "`fedtune registry refresh` each channel with the new release keys")


@registry_app.command("root")
def root_cmd(registry: Path = REGISTRY, out: Path = typer.Option(..., "--out", help="where to write root.json")) -> None:
    """Write the newest root metadata: provision devices with it (or with the first key's .pub)."""
    with _errors():
        if out.is_dir():
            raise InputError(f"{out} is a directory; pass a file path such as {out / 'root.json'}")
        out.write_bytes(_registry(registry).root_envelope())
    console.print(f"wrote {out}")


@registry_app.command()
def verify(registry: Path = REGISTRY) -> None:
    """Re-hash every blob and check every signature; exit 1 if anything is corrupted."""
    from fedtune.registry.check import verify_registry

    with _errors():
        report = verify_registry(_registry(registry))
    for problem in report.problems:
        console.print(f"[red]corrupted:[/red] {problem}")
    summary = (f"{report.roots} roots, {report.manifests} manifests, {report.channel_metadata} channels, "
               f"{report.blobs} blobs checked")
    if not report.ok:
        console.print(f"{len(report.problems)} problem(s); {summary}")
        raise typer.Exit(1)
    console.print(f"ok: {summary}")


@registry_app.command()
def serve(registry: Path = REGISTRY, host: str = typer.Option("127.0.0.1", "--host"),
          port: int = typer.Option(8080, "--port"),
          docs: bool = typer.Option(False, "--docs", help="also serve /docs, /redoc and /openapi.json"),
          request_timeout: float = typer.Option(10.0, "--request-timeout",
                                                help="seconds a client has to send each request")) -> None:
    """Serve signed metadata, manifests and blobs over HTTP for devices to poll (read-only; holds no key)."""
    from fedtune.registry.service import serve as run

    with _errors():
        _registry(registry)
    console.print(f"serving {registry} on http://{host}:{port} (Ctrl-C stops)")
    run(registry, host, port, docs=docs, request_timeout_s=request_timeout)


# --- device ------------------------------------------------------------------------------------------
@device_app.command()
def pull(server: str = typer.Option(..., "--server", envvar="FEDTUNE_REGISTRY_URL", help="e.g. http://host:8080"),
         base_model: str = typer.Option(..., "--base-model", envvar="FEDTUNE_BASE_MODEL", help="base model id"),
         public_key: Path = PUBLIC_KEY, state: Path = STATE,
         channel: str = typer.Option("stable", "--channel"),
         device_id: Optional[str] = typer.Option(None, "--device-id", help="default: remembered, or a new uuid"),
         base_sha256: Optional[str] = typer.Option(None, "--base-sha256", help="refuse adapters for other weights"),
         force: bool = typer.Option(False, "--force", help="ignore ETag and this device's rollback block"),
         deadline: float = typer.Option(600.0, "--deadline", help="seconds the whole pull may take"),
         artifact: Optional[str] = typer.Option(None, "--artifact", help="refuse channels serving another name")) -> None:
    """Fetch the adapter the channel's signed metadata names for this device, verify, switch atomically."""
    import httpx

    from fedtune.registry.device import DeviceClient, DeviceConfig
    from fedtune.registry.metadata import load_anchor

    with _errors():
        cfg = DeviceConfig(server=server, base_model_id=base_model, trusted_key=load_anchor(public_key),
                           channel=channel, base_model_sha256=base_sha256, deadline_s=deadline, artifact=artifact)
        try:
            with DeviceClient(state, cfg, device_id=device_id) as dev:
                r = dev.pull(force=force)
        except httpx.HTTPError as err:
            raise RegistryError(f"cannot reach {server}: {err}; is `fedtune registry serve` running?") from None
    if r.status == "updated":
        console.print(f"updated to v{r.active} (previous v{r.previous}); downloaded {r.downloaded_bytes:,} bytes, "
                      f"reused {r.reused_bytes:,}")
    elif r.status == "none":
        console.print(f"the registry offers nothing to this device on {channel}; active stays "
                      f"{f'v{r.active}' if r.active else 'none'}")
    elif r.status == "repaired":
        console.print(f"repaired v{r.active}: its files on this device no longer matched; re-downloaded "
                      f"{r.downloaded_bytes:,} bytes and verified")
    elif r.status == "blocked":
        console.print(f"v{r.offered} was rolled back on this device; staying on v{r.active} (--force takes it)")
    else:
        console.print(f"unchanged: v{r.active} ({'304 Not Modified' if r.http_status == 304 else 'same version'})")


@device_app.command("rollback")
def device_rollback(state: Path = STATE, public_key: Path = PUBLIC_KEY) -> None:
    """Make the previous adapter active again (after verifying it)."""
    from fedtune.registry.device import rollback as do_rollback
    from fedtune.registry.device_state import DeviceState
    from fedtune.registry.metadata import load_anchor

    with _errors():
        ptr = do_rollback(DeviceState(_state_dir(state)), load_anchor(public_key))
    console.print(f"active v{ptr.active} (v{ptr.previous} kept, and skipped by pull until --force)")


@device_app.command()
def status(state: Path = STATE, public_key: Path = PUBLIC_KEY) -> None:
    """The active adapter, verified now, and what else this device keeps."""
    from fedtune.registry.device_state import DeviceState
    from fedtune.registry.metadata import load_anchor

    with _errors():
        anchor = load_anchor(public_key)
        ds = DeviceState(_state_dir(state))
        ptr = ds.pointer()
        console.print(f"device {ds.device_id()}: active {f'v{ptr.active}' if ptr.active else 'none'}, previous "
                      f"{f'v{ptr.previous}' if ptr.previous else 'none'}, blocked {list(ptr.blocked) or '-'}")
        if ptr.active is not None:
            path, m = ds.active(anchor)
            eps = f"ε={m.privacy.epsilon:.3g}" if m.privacy.epsilon is not None else "no DP"
            console.print(f"v{m.version} {m.name} verified (signature + {len(m.files)} files) at {path}; "
                          f"{m.privacy.level}-level {eps}; base {m.base_model.id}")


# --- export ------------------------------------------------------------------------------------------
ADAPTER = typer.Argument(..., help="adapter directory: PEFT files + fedtune.json (a run's adapters/round-N)")
CONFIG = typer.Option(None, "--config", help="experiment YAML naming the base model, if fedtune.json is absent")


def _base(config: Optional[Path]):
    from fedtune.config import load_config

    return load_config(config).model if config else None


@export_app.command("peft")
def export_peft_cmd(adapter: Path = ADAPTER, out: Path = typer.Option(..., "--out")) -> None:
    """Copy the PEFT directory (PeftModel.from_pretrained loads it)."""
    from fedtune.export import export_peft

    with _errors():
        console.print(f"wrote {export_peft(adapter, out)}")


@export_app.command("merged")
def export_merged_cmd(adapter: Path = ADAPTER, out: Path = typer.Option(..., "--out"), config: Optional[Path] = CONFIG,
                      dtype: str = typer.Option("float32", "--dtype", help="float32 | float16 | bfloat16")) -> None:
    """Base with the LoRA merged in, as a transformers directory of safetensors."""
    from fedtune.export.merged import export_merged

    with _errors():
        path = export_merged(adapter, out, _base(config), dtype)
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    console.print(f"wrote {path} ({size / 2**20:.1f} MiB of safetensors)")


@export_app.command("gguf-lora")
def export_gguf_cmd(adapter: Path = ADAPTER, out: Path = typer.Option(..., "--out", help="adapter .gguf path"),
                    config: Optional[Path] = CONFIG,
                    dtype: str = typer.Option("f32", "--dtype", help="f32 | f16")) -> None:
    """GGUF LoRA adapter for llama.cpp (`llama-cli -m base.gguf --lora OUT`)."""
    from fedtune.export.gguf_lora import export_gguf_lora

    with _errors():
        path = export_gguf_lora(adapter, out, _base(config), dtype=dtype)
    console.print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB)")


@export_app.command("onnx")
def export_onnx_cmd(adapter: Path = ADAPTER, out: Path = typer.Option(..., "--out", help=".onnx path"),
                    config: Optional[Path] = CONFIG,
                    check: bool = typer.Option(True, "--check/--no-check", help="compare ONNX Runtime to PyTorch")) -> None:
    """Merged model as ONNX (input_ids -> logits, dynamic batch and length), checked with ONNX Runtime."""
    import torch

    from fedtune.export.onnx import export_onnx, onnx_max_abs_diff

    with _errors():
        path, model = export_onnx(adapter, out, _base(config))
        size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
        console.print(f"wrote {path} ({size / 2**20:.1f} MiB)")
        if check:
            x = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
            diff = onnx_max_abs_diff(path, model, x)
            console.print(f"ONNX Runtime vs PyTorch on [2, 32] tokens: max |Δlogits| = {diff:.2e}")
            if diff > 1e-3:
                raise typer.Exit(1)
