"""One device's own data file (deployment): every row of a JSONL / CSV / Parquet file is this device's.

The simulator partitions a shared data set by user; a real device holds only its own rows. The text column
is ``data.text_column`` of the experiment config; a user column, if present, is ignored.
"""

from __future__ import annotations

from pathlib import Path

from fedtune.config import DataConfig
from fedtune.data.partition import split_heldout
from fedtune.data.sources import _read_table
from fedtune.data.tokenize import chunk_tokens
from fedtune.types import ClientData


def load_device_data(path: str | Path, cfg: DataConfig, encoder, seed: int = 0, user_id: str = "device"
                     ) -> ClientData:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    df = _read_table(path)
    if cfg.text_column not in df.columns:
        raise ValueError(f"{path}: no {cfg.text_column!r} column (found {list(df.columns)}); "
                         "name the text column in the experiment's data.text_column")
    docs = [t for t in df[cfg.text_column] if isinstance(t, str)]
    chunks = chunk_tokens(docs, encoder, cfg.seq_len)
    train, held = split_heldout(chunks, cfg.heldout_fraction, seed)
    if cfg.max_train_chunks is not None:
        train = train[: cfg.max_train_chunks]
    if train.shape[0] == 0:
        raise ValueError(f"{path}: {len(docs)} texts give no chunk of {cfg.seq_len} tokens; add data or "
                         "lower data.seq_len")
    return ClientData(user_id=user_id, train=train.contiguous(), heldout=held.contiguous())
