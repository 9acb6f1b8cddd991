"""Per-client privacy ledgers: the accountant history, kept on disk so no round is ever forgotten.

A fresh opacus PrivacyEngine per round would start from zero; instead each client's history is
loaded before training, extended by the round's steps, and saved atomically afterwards. Simulation
workers are recycled and clients move between them, so the store is on disk, not in memory.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from fedtune.privacy.accounting import History, compute_epsilon
from fedtune.workspace import safe_filename


@dataclass
class PrivacyLedger:
    client_id: str
    accountant: str = "rdp"
    history: History = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)

    def epsilon(self, delta: float) -> float:
        return compute_epsilon(self.history, delta, self.accountant)

    @property
    def steps(self) -> int:
        return sum(int(n) for _, _, n in self.history)


class LedgerStore:
    """One JSON file per client under ``directory``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, client_id: str) -> Path:
        return self.directory / f"{safe_filename(client_id)}.json"

    def load(self, client_id: str, accountant: str = "rdp") -> PrivacyLedger:
        path = self._path(client_id)
        if not path.is_file():
            return PrivacyLedger(client_id=client_id, accountant=accountant)
        raw = json.loads(path.read_text())
        if raw["accountant"] != accountant:
            raise ValueError(
                f"ledger of client {client_id} was kept with accountant {raw['accountant']!r}, "
                f"config asks for {accountant!r}; keep the accountant fixed for a run"
            )
        return PrivacyLedger(client_id=raw["client_id"], accountant=raw["accountant"],
                             history=[tuple(h) for h in raw["history"]], rounds=list(raw["rounds"]))

    def save(self, ledger: PrivacyLedger) -> None:
        path = self._path(ledger.client_id)
        data = {"client_id": ledger.client_id, "accountant": ledger.accountant,
                "history": [list(h) for h in ledger.history], "rounds": ledger.rounds}
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
