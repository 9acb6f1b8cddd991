"""The adapters a server knows, and the bounded LRU of those loaded into the one peft model.

Two tables:
- ``sources``: served name -> ``AdapterSource`` (directory, version, privacy, and a ``verify`` hook that
  re-checks a registry adapter's signature and hashes before every load). Written by the registry watcher
  (any thread) under a lock; a newer version simply replaces the entry.
- ``loaded``: peft adapter name ("<name>--v<version>") -> last use, at most ``capacity`` entries. Only the
  scheduler thread loads and evicts, between batches, so no forward pass ever sees the model change; a
  batch that started on v1 finishes on v1, the next one runs v2 (hot swap without dropping requests).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fedtune.serve.batched_lora import StackedLoRA, unstack
from fedtune.serve.errors import AdapterRefused, ModelNotFound, Unavailable

log = logging.getLogger(__name__)

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class AdapterSource:
    name: str  # the model id clients send
    path: Path  # PEFT directory (adapter_config.json + weights)
    version: int | None = None
    origin: str = "local"  # local | registry
    privacy: dict | None = None  # the guarantee from the signed manifest / fedtune.json
    info: dict = field(default_factory=dict)  # base model, channel, manifest name, metrics ...
    verify: Callable[[], None] | None = None  # raises when the files no longer match their signature

    @property
    def peft_name(self) -> str:
        return f"{self.name.replace('.', '_')}--v{self.version or 0}"


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"adapter name {name!r}: expected letters, digits, '.', '_' or '-' (at most 128)")
    return name


def local_source(directory: Path, name: str | None = None) -> AdapterSource:
    """A PEFT directory on disk (``--adapters DIR``); privacy and round come from its fedtune.json if any."""
    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{directory}: expected a PEFT adapter directory with adapter_config.json")
    meta = json.loads((directory / "fedtune.json").read_text()) if (directory / "fedtune.json").is_file() else {}
    cfg = json.loads((directory / "adapter_config.json").read_text())
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{directory}: a {cfg.get('peft_type')} adapter; the server mixes LoRA adapters only")
    return AdapterSource(name=check_name(name or directory.name), path=directory, version=meta.get("round"),
                         origin="local", privacy=meta.get("privacy"),
                         info={"round": meta.get("round"), "verified": False})


def local_sources(root: Path) -> list[AdapterSource]:
    """Every PEFT adapter under ``root``: the directory itself, or each subdirectory that holds one."""
    root = Path(root)
    if (root / "adapter_config.json").is_file():
        return [local_source(root)]
    found = [local_source(d) for d in sorted(root.iterdir()) if (d / "adapter_config.json").is_file()]
    if not found:
        raise FileNotFoundError(f"--adapters {root}: no adapter_config.json in it or its subdirectories; "
                                "point it at a PEFT adapter directory or a folder of them")
    return found


class AdapterPool:
    def __init__(self, base_model, base_id: str, capacity: int = 8, kernel: str = "stacked"):
        if kernel not in ("stacked", "peft"):
            raise ValueError(f"lora kernel: expected 'stacked' or 'peft', got {kernel!r}")
        if capacity < 1:
            raise ValueError(f"max loaded adapters: expected >= 1, got {capacity}")
        self.model = base_model  # becomes a PeftModel on the first load
        self.base_id = base_id
        self.capacity = capacity
        self._sources: dict[str, AdapterSource] = {}
        self._loaded: OrderedDict[str, float] = OrderedDict()  # peft name -> last use (LRU order)
        self._lock = threading.Lock()
        self.loads = 0
        self.stack = StackedLoRA() if kernel == "stacked" else None  # None: peft's own mixed-batch loop
        self._snapshot: tuple[str, ...] = ()

    # --- the catalogue (any thread) --------------------------------------------------------------
    def register(self, source: AdapterSource) -> None:
        with self._lock:
            old = self._sources.get(source.name)
            self._sources[source.name] = source
        if old is None or old.version != source.version:
            log.info("serving %s v%s (%s)%s", source.name, source.version, source.origin,
                     f", replaces v{old.version}" if old else "")

    def sources(self) -> list[AdapterSource]:
        with self._lock:
            return list(self._sources.values())

    def source(self, name: str) -> AdapterSource | None:
        with self._lock:
            return self._sources.get(name)

    def resolve(self, model: str, user: str | None = None) -> AdapterSource | None:
        """The request's adapter: ``model`` names one; or ``model`` is the base and ``user`` names one.

        None means the bare base model; an unknown ``model`` raises ModelNotFound (404).
        """
        with self._lock:
            if model in self._sources:
                return self._sources[model]
            if model == self.base_id:
                return self._sources.get(user) if user else None
            known = sorted(self._sources)
        raise ModelNotFound(f"model {model!r} does not exist: this server serves the base {self.base_id!r} and "
                            f"the adapters {known}; GET /v1/models lists them", param="model")

    # --- loading (scheduler thread only) ---------------------------------------------------------
    @property
    def loaded(self) -> list[str]:
        """Loaded peft names, least recent first (a snapshot: safe to read from any thread)."""
        return list(self._snapshot)

    def activate(self, sources: list[AdapterSource]) -> None:
        """Make every adapter of the next batch loaded (evicting the least recently used others)."""
        wanted = {s.peft_name for s in sources}
        if len(wanted) > self.capacity:
            raise ValueError(f"a batch needs {len(wanted)} adapters, the pool holds {self.capacity}")
        now = time.monotonic()
        current = {s.peft_name for s in self.sources()}
        before = set(self._loaded)
        try:
            for s in sources:
                if s.peft_name not in self._loaded:
                    while len(self._loaded) >= self.capacity:
                        stale = [n for n in self._loaded if n not in current and n not in wanted]
                        self._unload((stale or [n for n in self._loaded if n not in wanted])[0])
                    self._load(s)
                self._loaded[s.peft_name] = now
                self._loaded.move_to_end(s.peft_name)
            for stale in [n for n in self._loaded if n not in current and n not in wanted]:
                self._unload(stale)  # a version replaced by a newer one: no batch uses it any more
        finally:
            self._snapshot = tuple(self._loaded)
            if self.stack is not None and before != set(self._loaded):
                self.stack.rebuild(self.model, list(self._loaded))

    def set_kernel(self, kernel: str) -> None:
        """Switch the mixed-batch LoRA arithmetic (between batches): "stacked" or peft's own loop ("peft")."""
        if kernel not in ("stacked", "peft"):
            raise ValueError(f"lora kernel: expected 'stacked' or 'peft', got {kernel!r}")
        if kernel == "peft":
            unstack(self.model)
            self.stack = None
        else:
            self.stack = StackedLoRA()
            self.stack.rebuild(self.model, list(self._loaded))

    def evict(self, name: str) -> None:
        """Unload a served adapter now (scheduler thread, or while no batch runs); the next use reloads it."""
        source = self.source(name)
        if source is not None and source.peft_name in self._loaded:
            self._unload(source.peft_name)
            self._snapshot = tuple(self._loaded)
            if self.stack is not None:
                self.stack.rebuild(self.model, list(self._loaded))

    def _load(self, s: AdapterSource) -> None:
        from peft import PeftModel

        if s.verify is not None:
            try:
                s.verify()
            except Exception as err:  # noqa: BLE001 - any verification failure refuses the adapter
                raise AdapterRefused(f"adapter {s.name} v{s.version} failed verification and is not served: "
                                     f"{err}", param="model") from None
        if not (s.path / "adapter_config.json").is_file():
            raise Unavailable(f"adapter {s.name} v{s.version}: its files are gone from {s.path}", param="model")
        if hasattr(self.model, "peft_config") and s.peft_name in self.model.peft_config:
            pass  # the last adapter, kept resident when it was evicted (see _unload)
        elif hasattr(self.model, "peft_config"):
            self.model.load_adapter(str(s.path), adapter_name=s.peft_name, is_trainable=False)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(s.path), adapter_name=s.peft_name)
        self.model.eval()
        self.loads += 1
        log.debug("loaded adapter %s from %s", s.peft_name, s.path)

    def _unload(self, peft_name: str) -> None:
        self._loaded.pop(peft_name, None)
        if len(self.model.peft_config) > 1:
            self.model.delete_adapter(peft_name)
        else:  # peft keeps at least one adapter; it stays in memory but is never routed to
            log.debug("kept the last adapter %s resident", peft_name)
        log.debug("unloaded adapter %s", peft_name)
