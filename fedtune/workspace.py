"""The run directory: one place that knows where each artifact of a run lives.

    run_dir/
      config.yaml          resolved experiment config
      metrics.jsonl        one JSON object per round (round 0 = the starting adapter)
      events.jsonl         progress events (clients finishing), for the CLI's live view
      adapters/round-N/    global adapter after round N, PEFT format (+ fedtune.json metadata)
      data/                prepared per-client token chunks (index.json, clients/<i>.safetensors)
      state/ledgers/       per-client privacy ledgers (accountant history)
      state/private/       per-device private adapter parts (split adapters; never sent)
      eval/                per-user evaluation (`fedtune evaluate`): per_user.csv, summary, plots
      flower/              Flower home, logs of the simulation engine
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def create(cls, root: str | Path) -> "RunDir":
        root = Path(root).absolute()
        for sub in ("adapters", "data", "state/ledgers", "state/private", "flower"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        return cls(root)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def ledgers(self) -> Path:
        return self.root / "state" / "ledgers"

    @property
    def private(self) -> Path:
        return self.root / "state" / "private"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def flower(self) -> Path:
        return self.root / "flower"

    def adapter(self, server_round: int) -> Path:
        return self.root / "adapters" / f"round-{server_round}"

    def append_metrics(self, record: dict) -> None:
        _append_jsonl(self.metrics, record)

    def append_event(self, event: dict) -> None:
        _append_jsonl(self.events, dict(event, time=time.time()))

    def read_metrics(self) -> list[dict]:
        return read_jsonl(self.metrics)


def check_run_root(root: str | Path, resume: bool, flag: str = "--out") -> None:
    """Refuse a run directory that would overwrite something: it must be new, empty, or a fedtune run
    (config.yaml / checkpoint.json) that is being resumed. Raises UserError; writes nothing."""
    from fedtune.errors import UserError

    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"{flag} {root}: is a file, not a directory; choose a new directory for the run")
    if not root.exists() or not any(root.iterdir()):
        return
    is_run = (root / "checkpoint.json").is_file() or (root / "config.yaml").is_file()
    if resume and is_run:
        return
    if (root / "checkpoint.json").is_file():
        raise UserError(f"{flag} {root}: already holds a run (checkpoint.json); pass --resume to continue it, or "
                        f"choose another {flag}")
    if is_run:
        raise UserError(f"{flag} {root}: already holds a run that never checkpointed (config.yaml); pass --resume to "
                        f"start it over in place, or choose another {flag}")
    raise UserError(f"{flag} {root}: the directory is not empty and is not a fedtune run; choose a new or empty "
                    "directory (nothing was written)")


def safe_filename(key: str) -> str:
    """A device or user id as a file name: anything but letters, digits, '-', '_' and '.' becomes '_'."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)


def _append_jsonl(path: Path, record: dict) -> None:
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)  # one write of a short line: whole lines even with concurrent writers
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line still being written
    return out
