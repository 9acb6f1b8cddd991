"""Per-user ClientData with a held-out split, saved once per run and loaded lazily by each client.

Preparing the data once (in the launching process) means simulation workers never re-tokenize:
a worker serving partition i reads ``clients/<i>.safetensors`` from the run's data directory.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedtune.config import DataConfig
from fedtune.data.sources import load_user_texts
from fedtune.data.tokenize import chunk_tokens
from fedtune.errors import UserError
from fedtune.types import ClientData

log = logging.getLogger(__name__)


def split_heldout(chunks: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded shuffle, then the last ``fraction`` (at least one chunk when there are two) is held out."""
    n = chunks.shape[0]
    if n < 2:
        return chunks, chunks[:0]
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    n_held = min(n - 1, max(1, round(n * fraction)))
    return chunks[perm[n_held:]], chunks[perm[:n_held]]


@dataclass(frozen=True)
class PreparedData:
    """Every user's ClientData (partition id i = i-th user), and the users left out for too little text."""

    clients: list[ClientData]
    dropped: tuple[str, ...] = ()  # users whose text gives no full training chunk of seq_len tokens
    seq_len: int = 0

    def dropped_note(self, limit: int = 10) -> str:
        """One line naming the dropped users (empty when none were)."""
        if not self.dropped:
            return ""
        names = ", ".join(self.dropped[:limit]) + (f" and {len(self.dropped) - limit} more"
                                                   if len(self.dropped) > limit else "")
        return (f"{len(self.dropped)} user(s) left out: their text gives no full chunk of {self.seq_len} tokens "
                f"({names}); give them more text or lower data.seq_len")


def prepare_client_data(cfg: DataConfig, encoder, seed: int = 0) -> PreparedData:
    """All users' data, in the source's order, and who was dropped; refuses data where nobody is left."""
    out, dropped = [], []
    for i, (user, docs) in enumerate(load_user_texts(cfg, seed).items()):
        chunks = chunk_tokens(docs, encoder, cfg.seq_len)
        train, held = split_heldout(chunks, cfg.heldout_fraction, seed * 100_003 + i)
        if cfg.max_train_chunks is not None:
            train = train[: cfg.max_train_chunks]
        if cfg.max_heldout_chunks is not None:
            held = held[: cfg.max_heldout_chunks]
        if train.shape[0] == 0:
            dropped.append(user)
            continue
        out.append(ClientData(user_id=user, train=train.contiguous(), heldout=held.contiguous()))
    if not out:
        raise UserError(f"data.seq_len: no user has at least one chunk of {cfg.seq_len} tokens "
                        f"({len(dropped)} users, all too short); lower data.seq_len or add text")
    prepared = PreparedData(out, tuple(dropped), cfg.seq_len)
    if dropped:
        log.info(prepared.dropped_note())
    return prepared


def build_client_data(cfg: DataConfig, encoder, seed: int = 0) -> list[ClientData]:
    """All users' data, in the source's order (partition id i = i-th user); dropped users are logged."""
    return prepare_client_data(cfg, encoder, seed).clients


def save_client_data(clients: list[ClientData], directory: str | Path) -> Path:
    directory = Path(directory)
    (directory / "clients").mkdir(parents=True, exist_ok=True)
    index = []
    for i, c in enumerate(clients):
        save_file({"train": c.train, "heldout": c.heldout}, str(directory / "clients" / f"{i}.safetensors"))
        index.append({"partition": i, "user_id": c.user_id, "train": c.num_train,
                      "heldout": int(c.heldout.shape[0])})
    (directory / "index.json").write_text(json.dumps(index, indent=1))
    return directory


def prepare_run_data(cfg, directory: str | Path | None = None) -> PreparedData | None:
    """The one data-preparation step of a server: tokenize and partition ``cfg.data`` once.

    With ``directory``: None if it already holds prepared data (index.json), else prepare and save it
    there (``flwr run .`` straight from a checkout, a deployed server's own evaluation set). Without: only
    prepare, writing nothing (a CLI checks the data before it creates a run directory). Raises UserError
    for data where nobody is left.
    """
    if directory is not None and (Path(directory) / "index.json").is_file():
        return None
    from fedtune.models import load_encoder

    prepared = prepare_client_data(cfg.data, load_encoder(cfg.model), cfg.seed)
    if directory is not None:
        save_client_data(prepared.clients, directory)
    return prepared


def read_index(directory: str | Path) -> list[dict]:
    path = Path(directory) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"no prepared data at {directory} (index.json missing)")
    return json.loads(path.read_text())


def load_client_data(directory: str | Path, partition: int) -> ClientData:
    index = read_index(directory)
    if not 0 <= partition < len(index):
        raise IndexError(f"partition {partition} out of range: the data has {len(index)} clients")
    t = load_file(str(Path(directory) / "clients" / f"{partition}.safetensors"))
    return ClientData(user_id=index[partition]["user_id"], train=t["train"], heldout=t["heldout"])
