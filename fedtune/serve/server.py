"""Assemble a server: base model (quantized as configured) -> adapter pool -> scheduler -> watcher -> app.

``build_server(options)`` returns a ``Server`` whose ``app`` uvicorn can run and whose ``close()`` stops
the watcher and drains the scheduler; ``serve(options)`` runs it in the foreground (`fedtune serve`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from fedtune.config import ModelConfig
from fedtune.serve.app import ServeContext, create_app
from fedtune.serve.pool import AdapterPool, local_sources
from fedtune.serve.scheduler import Scheduler
from fedtune.serve.text import load_serving_tokenizer
from fedtune.serve.watcher import RegistryWatcher, Subscription

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistryOptions:
    url: str
    public_key: Path
    state_dir: Path
    subscriptions: tuple[Subscription, ...] = (Subscription("stable", "stable"),)
    device_id: str | None = None
    poll_s: float = 30.0
    check_base_hash: bool = True  # refuse adapters whose manifest names other base weights


@dataclass(frozen=True)
class ServeOptions:
    model: ModelConfig
    device: str = "cpu"
    adapters: tuple[Path, ...] = ()
    registry: RegistryOptions | None = None
    max_loaded: int = 16
    max_batch: int = 32
    policy: str = "mixed"
    lora_kernel: str = "stacked"  # stacked: gathered batched LoRA | peft: peft's per-adapter loop
    window_s: float = 0.005
    chat_max_tokens: int = 256
    base_id: str | None = None  # default: the registry's id for this base (publish.base_model_id)


@dataclass
class Server:
    app: object
    context: ServeContext
    watcher: RegistryWatcher | None = None
    closed: bool = field(default=False)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.watcher is not None:
            self.watcher.stop()
        self.context.scheduler.stop()


def build_server(options: ServeOptions, base_model=None) -> Server:
    """Everything but the listening socket; ``base_model`` overrides loading (tests, benchmarks)."""
    from fedtune.models import load_base_model
    from fedtune.registry.publish import base_model_id

    if base_model is None:
        base_model, info = load_base_model(options.model, options.device)
        log.info("base %s (%s) on %s: %.1f MiB", options.model.name, options.model.quantization, options.device,
                 info["base_bytes"] / 2**20)
    base_model.eval()
    base_id = options.base_id or base_model_id(options.model)
    pool = AdapterPool(base_model, base_id, capacity=options.max_loaded, kernel=options.lora_kernel)
    for root in options.adapters:
        for source in local_sources(root):
            if pool.source(source.name) is not None:
                raise ValueError(f"--adapters: two adapters are named {source.name!r}; rename one directory")
            pool.register(source)
    watcher = None
    if options.registry is not None:
        watcher = _watcher(options.registry, pool, options.model, base_id)
        for outcome in watcher.poll_once():  # serve what the registry offers from the first request on
            log.info("registry %s: %s (active v%s) %s", outcome.name, outcome.status, outcome.active, outcome.detail)
        watcher.start()
    tokenizer = load_serving_tokenizer(options.model, base_model.config)
    scheduler = Scheduler(pool, tokenizer, max_batch=options.max_batch, policy=options.policy,
                          window_s=options.window_s).start()
    cfg = base_model.config
    ctx = ServeContext(pool=pool, scheduler=scheduler, tokenizer=tokenizer,
                       context_len=int(getattr(cfg, "max_position_embeddings", 2048)),
                       vocab_size=int(cfg.vocab_size), chat_max_tokens=options.chat_max_tokens, watcher=watcher)
    return Server(app=create_app(ctx), context=ctx, watcher=watcher)


def _watcher(opts: RegistryOptions, pool: AdapterPool, model: ModelConfig, base_id: str) -> RegistryWatcher:
    from fedtune.registry.publish import base_model_ref
    from fedtune.registry.signing import load_verify_key

    key = load_verify_key(opts.public_key)
    sha = base_model_ref(model).sha256 if opts.check_base_hash else None
    return RegistryWatcher(pool, opts.url, key, base_id, opts.state_dir, list(opts.subscriptions),
                           base_model_sha256=sha, device_id=opts.device_id, interval_s=opts.poll_s)


def serve(options: ServeOptions, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    server = build_server(options)
    try:
        uvicorn.run(server.app, host=host, port=port, log_level=log_level)
    finally:
        server.close()
