"""One device's own data file (deployment): every row of a JSONL / CSV / Parquet file is this device's.

The simulator partitions a shared data set by user; a real device holds only its own rows. The text column
is ``data.text_column`` of the experiment config; a user column, if present, is ignored.
"""

from __future__ import annotations

from pathlib import Path

from fedtune.config import DataConfig
from fedtune.data.partition import split_heldout
from fedtune.data.tables import read_table, require_columns
from fedtune.data.tokenize import chunk_tokens
from fedtune.errors import UserError
from fedtune.types import ClientData


def load_device_data(path: str | Path, cfg: DataConfig, encoder, seed: int = 0, user_id: str = "device"
                     ) -> ClientData:
    path = Path(path)
    cols = read_table(path, label="--data")
    require_columns(cols, path, {"data.text_column": cfg.text_column}, label="--data")
    docs = [t for t in cols[cfg.text_column] if isinstance(t, str)]
    chunks = chunk_tokens(docs, encoder, cfg.seq_len)
    train, held = split_heldout(chunks, cfg.heldout_fraction, seed)
    if cfg.max_train_chunks is not None:
        train = train[: cfg.max_train_chunks]
    if train.shape[0] == 0:
        raise UserError(f"--data {path}: {len(docs)} texts give no chunk of {cfg.seq_len} tokens; add data or "
                         "lower data.seq_len")
    return ClientData(user_id=user_id, train=train.contiguous(), heldout=held.contiguous())
