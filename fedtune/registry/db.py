"""SQLite metadata of a registry: artifacts (signed manifests), channels (current + staged), an audit log.

    artifacts(version PK, name, base_model_id, base_model_sha256, envelope, created_at)
        envelope = the signed manifest's canonical bytes, served to devices verbatim
    channels(base_model_id, channel) -> current, candidate, rollout, history
        current   = version every device gets (NULL until the first full promotion)
        candidate = version in staged rollout to `rollout` % of devices (NULL when none)
        history   = JSON list of earlier `current` versions, newest last (what rollback returns to)
    events(...)   every publish / promote / rollback, for `fedtune registry list --events`
    roots(version PK, envelope)                       signed root metadata, every version (devices walk the chain)
    channel_meta(base_model_id, channel, version, envelope)
        signed channel metadata, every version; the highest is what devices get (metadata.py)
    role_meta(role, version, envelope)                 signed snapshot and timestamp metadata, every version
        (freshness.py); the highest of each is what devices get

One connection per operation (the HTTP service runs requests on several threads); writes take
``BEGIN IMMEDIATE`` so two publishers never get the same version number.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS artifacts (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    base_model_id TEXT NOT NULL,
    base_model_sha256 TEXT NOT NULL,
    envelope BLOB NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS channels (
    base_model_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    current INTEGER REFERENCES artifacts(version),
    candidate INTEGER REFERENCES artifacts(version),
    rollout REAL NOT NULL DEFAULT 0,
    history TEXT NOT NULL DEFAULT '[]',
    updated_at REAL NOT NULL,
    PRIMARY KEY (base_model_id, channel)
);
CREATE TABLE IF NOT EXISTS roots (version INTEGER PRIMARY KEY, envelope BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS channel_meta (
    base_model_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    version INTEGER NOT NULL,
    envelope BLOB NOT NULL,
    PRIMARY KEY (base_model_id, channel, version)
);
CREATE TABLE IF NOT EXISTS role_meta (
    role TEXT NOT NULL,
    version INTEGER NOT NULL,
    envelope BLOB NOT NULL,
    PRIMARY KEY (role, version)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    action TEXT NOT NULL,
    base_model_id TEXT NOT NULL,
    channel TEXT,
    version INTEGER,
    detail TEXT NOT NULL DEFAULT ''
);
"""


@dataclass(frozen=True)
class ArtifactRow:
    version: int
    name: str
    base_model_id: str
    base_model_sha256: str
    envelope: bytes
    created_at: str


@dataclass(frozen=True)
class ChannelState:
    base_model_id: str
    channel: str
    current: int | None
    candidate: int | None
    rollout: float  # percent of devices that get `candidate`
    history: tuple[int, ...]  # earlier `current` versions, newest last


@dataclass(frozen=True)
class Event:
    at: float
    action: str
    base_model_id: str
    channel: str | None
    version: int | None
    detail: str


class MetadataDB:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(_SCHEMA)

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            yield con
        finally:
            con.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self.connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    # --- meta -----------------------------------------------------------------------------------
    def meta(self, key: str, default: str | None = None) -> str | None:
        with self.connect() as con:
            row = con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def ensure_meta(self, key: str, value: str) -> str:
        """Set ``key`` unless it is set; return the stored value (first writer wins)."""
        with self.transaction() as con:
            con.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (key, value))
            return con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]

    # --- artifacts ------------------------------------------------------------------------------
    @staticmethod
    def next_version(con: sqlite3.Connection) -> int:
        return int(con.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM artifacts").fetchone()[0])

    @staticmethod
    def insert_artifact(con: sqlite3.Connection, row: ArtifactRow) -> None:
        con.execute(
            "INSERT INTO artifacts(version, name, base_model_id, base_model_sha256, envelope, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (row.version, row.name, row.base_model_id, row.base_model_sha256, row.envelope, row.created_at),
        )
        _log(con, "publish", row.base_model_id, None, row.version, row.name)

    def artifact(self, version: int) -> ArtifactRow | None:
        with self.connect() as con:
            r = con.execute("SELECT version, name, base_model_id, base_model_sha256, envelope, created_at "
                            "FROM artifacts WHERE version = ?", (version,)).fetchone()
        return ArtifactRow(r[0], r[1], r[2], r[3], bytes(r[4]), r[5]) if r else None

    def artifacts(self, base_model_id: str | None = None) -> list[ArtifactRow]:
        q = "SELECT version, name, base_model_id, base_model_sha256, envelope, created_at FROM artifacts"
        args: tuple = ()
        if base_model_id:
            q, args = q + " WHERE base_model_id = ?", (base_model_id,)
        with self.connect() as con:
            rows = con.execute(q + " ORDER BY version", args).fetchall()
        return [ArtifactRow(r[0], r[1], r[2], r[3], bytes(r[4]), r[5]) for r in rows]

    # --- channels -------------------------------------------------------------------------------
    @staticmethod
    def channel_in(con: sqlite3.Connection, base_model_id: str, channel: str) -> ChannelState:
        r = con.execute("SELECT current, candidate, rollout, history FROM channels "
                        "WHERE base_model_id = ? AND channel = ?", (base_model_id, channel)).fetchone()
        if r is None:
            return ChannelState(base_model_id, channel, None, None, 0.0, ())
        return ChannelState(base_model_id, channel, r[0], r[1], float(r[2]), tuple(json.loads(r[3])))

    def channel(self, base_model_id: str, channel: str) -> ChannelState:
        with self.connect() as con:
            return self.channel_in(con, base_model_id, channel)

    def channels(self) -> list[ChannelState]:
        with self.connect() as con:
            rows = con.execute("SELECT base_model_id, channel FROM channels ORDER BY 1, 2").fetchall()
            return [self.channel_in(con, b, c) for b, c in rows]

    @staticmethod
    def write_channel(con: sqlite3.Connection, state: ChannelState, action: str, version: int | None,
                      detail: str = "") -> None:
        con.execute(
            "INSERT INTO channels(base_model_id, channel, current, candidate, rollout, history, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(base_model_id, channel) DO UPDATE SET "
            "current = excluded.current, candidate = excluded.candidate, rollout = excluded.rollout, "
            "history = excluded.history, updated_at = excluded.updated_at",
            (state.base_model_id, state.channel, state.current, state.candidate, state.rollout,
             json.dumps(list(state.history)), time.time()),
        )
        _log(con, action, state.base_model_id, state.channel, version, detail)

    # --- signed metadata ------------------------------------------------------------------------
    @staticmethod
    def root_in(con: sqlite3.Connection, version: int | None = None) -> tuple[int, bytes] | None:
        if version is None:
            r = con.execute("SELECT version, envelope FROM roots ORDER BY version DESC LIMIT 1").fetchone()
        else:
            r = con.execute("SELECT version, envelope FROM roots WHERE version = ?", (version,)).fetchone()
        return (r[0], bytes(r[1])) if r else None

    def root(self, version: int | None = None) -> tuple[int, bytes] | None:
        with self.connect() as con:
            return self.root_in(con, version)

    @staticmethod
    def insert_root(con: sqlite3.Connection, version: int, envelope: bytes) -> None:
        con.execute("INSERT INTO roots(version, envelope) VALUES (?, ?)", (version, envelope))
        _log(con, "root", "-", None, version, "")

    @staticmethod
    def channel_meta_in(con: sqlite3.Connection, base_model_id: str, channel: str) -> tuple[int, bytes] | None:
        r = con.execute("SELECT version, envelope FROM channel_meta WHERE base_model_id = ? AND channel = ? "
                        "ORDER BY version DESC LIMIT 1", (base_model_id, channel)).fetchone()
        return (r[0], bytes(r[1])) if r else None

    def channel_meta(self, base_model_id: str, channel: str) -> tuple[int, bytes] | None:
        with self.connect() as con:
            return self.channel_meta_in(con, base_model_id, channel)

    @staticmethod
    def insert_channel_meta(con: sqlite3.Connection, base_model_id: str, channel: str, version: int,
                            envelope: bytes) -> None:
        con.execute("INSERT INTO channel_meta(base_model_id, channel, version, envelope) VALUES (?, ?, ?, ?)",
                    (base_model_id, channel, version, envelope))

    def all_channel_meta(self) -> list[tuple[str, str, int, bytes]]:
        with self.connect() as con:
            rows = con.execute("SELECT base_model_id, channel, version, envelope FROM channel_meta "
                               "ORDER BY 1, 2, 3").fetchall()
        return [(b, c, v, bytes(e)) for b, c, v, e in rows]

    @staticmethod
    def role_meta_in(con: sqlite3.Connection, role: str, version: int | None = None) -> tuple[int, bytes] | None:
        if version is None:
            r = con.execute("SELECT version, envelope FROM role_meta WHERE role = ? ORDER BY version DESC LIMIT 1",
                            (role,)).fetchone()
        else:
            r = con.execute("SELECT version, envelope FROM role_meta WHERE role = ? AND version = ?",
                            (role, version)).fetchone()
        return (r[0], bytes(r[1])) if r else None

    def role_meta(self, role: str, version: int | None = None) -> tuple[int, bytes] | None:
        with self.connect() as con:
            return self.role_meta_in(con, role, version)

    @staticmethod
    def insert_role_meta(con: sqlite3.Connection, role: str, version: int, envelope: bytes) -> None:
        con.execute("INSERT INTO role_meta(role, version, envelope) VALUES (?, ?, ?)", (role, version, envelope))

    def all_role_meta(self, role: str) -> list[tuple[int, bytes]]:
        with self.connect() as con:
            rows = con.execute("SELECT version, envelope FROM role_meta WHERE role = ? ORDER BY version",
                               (role,)).fetchall()
        return [(v, bytes(e)) for v, e in rows]

    def events(self, limit: int = 50) -> list[Event]:
        with self.connect() as con:
            rows = con.execute("SELECT at, action, base_model_id, channel, version, detail FROM events "
                               "ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [Event(*r) for r in rows]


def _log(con: sqlite3.Connection, action: str, base: str, channel: str | None, version: int | None,
         detail: str) -> None:
    con.execute("INSERT INTO events(at, action, base_model_id, channel, version, detail) VALUES (?, ?, ?, ?, ?, ?)",
                (time.time(), action, base, channel, version, detail))
