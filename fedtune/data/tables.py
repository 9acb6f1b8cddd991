"""Read a user's data file (JSONL / CSV / Parquet) into columns of plain Python values, refusing bad input.

Every value is read as written: a user id ``"007"`` stays ``"007"`` (no type inference that would merge
``"007"``, ``"7"`` and ``"7.0"`` into one user), a missing value is ``None``. Every problem is a
:class:`~fedtune.errors.UserError` naming the file, the line or column, and the fix.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from fedtune.errors import UserError, not_utf8

SUFFIXES = (".jsonl", ".ndjson", ".csv", ".parquet", ".pq")
Columns = dict[str, list]


def read_table(path: str | Path, label: str = "data.path") -> Columns:
    """``{column: [value per row]}``; missing values are None. Raises UserError on anything unreadable."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{label} {path}: is a directory; give a .jsonl, .csv or .parquet file")
    if not path.is_file():
        raise UserError(f"{label} {path}: file not found; check the path")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(f"{label} {path}: unsupported file type {suffix or '(none)'!r}; use .jsonl, .csv or "
                        ".parquet")
    if suffix in (".jsonl", ".ndjson"):
        cols = _read_jsonl(path, label)
    elif suffix == ".csv":
        cols = _read_csv(path, label)
    else:
        cols = _read_parquet(path, label)
    if not cols or not len(next(iter(cols.values()))):
        raise UserError(f"{label} {path}: the file has no rows; give it one row per text")
    return cols


def _read_jsonl(path: Path, label: str) -> Columns:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise not_utf8(f"{label} {path}", err) from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{label} {path}: line {n} is not valid JSON ({err.msg}); each line must be one "
                            "JSON object, e.g. {\"user_id\": \"u1\", \"text\": \"...\"}") from None
        if not isinstance(row, dict):
            raise UserError(f"{label} {path}: line {n} is a JSON {type(row).__name__}, not an object; each line "
                            "must be one JSON object, e.g. {\"user_id\": \"u1\", \"text\": \"...\"}")
        rows.append(row)
    names = list(dict.fromkeys(k for row in rows for k in row))
    return {k: [row.get(k) for row in rows] for k in names}


def _read_csv(path: Path, label: str) -> Columns:
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8", encoding_errors="strict")
    except UnicodeDecodeError as err:
        raise not_utf8(f"{label} {path}", err) from None
    except pd.errors.EmptyDataError:
        raise UserError(f"{label} {path}: the file is empty; give it a header row and one row per text") from None
    except pd.errors.ParserError as err:
        raise UserError(f"{label} {path}: not valid CSV ({' '.join(str(err).split())}); quote fields that hold "
                        "commas or newlines") from None
    return {str(c): [v if v != "" else None for v in df[c].tolist()] for c in df.columns}


def _read_parquet(path: Path, label: str) -> Columns:
    import pandas as pd

    try:
        df = pd.read_parquet(path)
    except Exception as err:  # pyarrow's errors have no common public base
        raise UserError(f"{label} {path}: not a readable Parquet file ({type(err).__name__}: "
                        f"{' '.join(str(err).split())[:200]})") from None
    return {str(c): [_plain(v) for v in df[c].tolist()] for c in df.columns}


def _plain(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v


def require_columns(cols: Columns, path, names: dict[str, str], label: str = "data.path") -> None:
    """``names``: column -> the config field that names it. Refuses a file that lacks one of them."""
    missing = [c for c in names.values() if c not in cols]
    if missing:
        fields = " / ".join(k for k, v in names.items() if v in missing)
        raise UserError(f"{label} {path}: missing column(s) {missing}; found {list(cols)}. Set {fields} to the "
                        "names your file uses")


def user_key(value) -> str | None:
    """A user id as a string, exactly as written (``"007"`` stays ``"007"``); None when it is missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool):
        return str(value).lower()
    key = str(value).strip() if isinstance(value, str) else str(value)
    return key or None
