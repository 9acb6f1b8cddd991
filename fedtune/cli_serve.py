"""`fedtune serve`: printing and option parsing over fedtune.serve (mounted in fedtune/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

console = Console(highlight=False)


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


def serve_cmd(
    base: Path = typer.Option(..., "--base", help="experiment YAML whose `model:` section names the base model"),
    quantization: Optional[str] = typer.Option(None, "--quantization", help="override: none | int8 | nf4"),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | cuda:N"),
    adapters: list[Path] = typer.Option([], "--adapters", help="PEFT adapter directory, or a folder of them "
                                        "(each subfolder is served under its name); repeatable"),
    registry: Optional[str] = typer.Option(None, "--registry", envvar="FEDTUNE_REGISTRY_URL",
                                           help="registry URL to pull signed adapters from, e.g. http://host:8080"),
    public_key: Optional[Path] = typer.Option(None, "--public-key", envvar="FEDTUNE_PUBLIC_KEY",
                                              help="trusted publisher key (.pub); required with --registry"),
    channel: list[str] = typer.Option([], "--channel", help="registry channel to serve, CHANNEL or NAME=CHANNEL "
                                      "(NAME is the model id clients send); repeatable; default: stable"),
    state: Path = typer.Option(Path("serve-state"), "--state", help="where pulled adapter versions are kept"),
    poll: float = typer.Option(30.0, "--poll", help="seconds between registry polls"),
    device_id: Optional[str] = typer.Option(None, "--device-id", help="id for the registry's rollout bucket"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    max_loaded: int = typer.Option(16, "--max-loaded", help="adapters kept loaded (LRU)"),
    max_batch: int = typer.Option(32, "--max-batch", help="requests decoded together in one batch"),
    policy: str = typer.Option("mixed", "--policy", help="mixed: any adapters in one batch | single: one adapter "
                               "per batch"),
    lora_kernel: str = typer.Option("stacked", "--lora-kernel", help="mixed-batch LoRA: stacked (gathered "
                                    "bmm) | peft (peft's per-adapter loop)"),
) -> None:
    """OpenAI-compatible server (/v1/models, /v1/completions, /v1/chat/completions) for the base + adapters."""
    from fedtune.config import ConfigError, load_config
    from fedtune.registry.errors import RegistryError
    from fedtune.serve.server import RegistryOptions, ServeOptions, serve
    from fedtune.serve.watcher import Subscription, parse_subscription

    if not base.is_file():
        _fail(f"--base {base}: no such file; pass an experiment YAML (e.g. configs/default.yaml)")
    if quantization not in (None, "none", "int8", "nf4"):
        _fail(f"--quantization {quantization}: expected none, int8 or nf4")
    if policy not in ("mixed", "single"):
        _fail(f"--policy {policy}: expected mixed or single")
    if lora_kernel not in ("stacked", "peft"):
        _fail(f"--lora-kernel {lora_kernel}: expected stacked or peft")
    if registry and public_key is None:
        _fail("--registry needs --public-key (the publisher's .pub) so that pulled adapters can be verified")
    if channel and not registry:
        _fail("--channel needs --registry URL")
    if not adapters and not registry:
        console.print("no --adapters or --registry: serving the bare base model only")
    try:
        model = load_config(base).model
        if quantization:
            model = model.model_copy(update={"quantization": quantization})
        subs = tuple(parse_subscription(c) for c in channel) or (Subscription("stable", "stable"),)
    except (ConfigError, ValueError) as err:
        _fail(str(err))
    reg = RegistryOptions(url=registry, public_key=public_key, state_dir=state, subscriptions=subs,
                          device_id=device_id, poll_s=poll) if registry else None
    options = ServeOptions(model=model, device=device, adapters=tuple(adapters), registry=reg,
                           max_loaded=max_loaded, max_batch=max_batch, policy=policy,
                           lora_kernel=lora_kernel)
    console.print(f"serving {model.name} ({model.quantization}) on http://{host}:{port}/v1")
    try:
        serve(options, host=host, port=port)
    except (FileNotFoundError, RegistryError, ValueError) as err:
        _fail(str(err))
