"""Reading users' data files: ids as written, rows without a user refused, every bad file one UserError."""

import json

import pandas as pd
import pytest

from fedtune.data import load_user_texts, prepare_client_data
from fedtune.data.tables import read_table, user_key
from fedtune.errors import UserError
from fedtune.models.tokenizer import ByteEncoder
from tests.conftest import make_config

IDS = ["007", "7", "7.0"]


def _write(path, rows):
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


def _files(path, **data):
    return make_config(data={"source": "files", "path": str(path), **data}).data


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_user_ids_are_strings_as_written(tmp_path, suffix):
    path = _write(tmp_path / f"d{suffix}", [{"user_id": u, "text": f"text of {u} " * 5} for u in IDS])
    users = load_user_texts(_files(path))
    assert list(users) == IDS  # three users, not one device named 7


def test_json_numbers_keep_their_spelling(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"user_id": 7, "text": "a b"}\n{"user_id": 7.0, "text": "c d"}\n{"user_id": "007", "text": "e"}\n')
    assert list(load_user_texts(_files(path))) == ["7", "7.0", "007"]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_rows_without_a_user_id_are_refused_with_a_count(tmp_path, suffix):
    rows = [{"user_id": "a", "text": "x y z"}, {"user_id": None, "text": "no owner"},
            {"user_id": "b", "text": "p q"}, {"user_id": "", "text": "blank owner"}]
    path = _write(tmp_path / f"d{suffix}", rows)
    with pytest.raises(UserError, match=r"2 of 4 rows have no 'user_id' \(first: row 2\)"):
        load_user_texts(_files(path))


def test_a_row_missing_the_user_key_counts_as_no_user(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"user_id": "a", "text": "x"}\n{"text": "y"}\n')
    with pytest.raises(UserError, match="1 of 2 rows"):
        load_user_texts(_files(path))
    assert user_key(float("nan")) is None and user_key("  ") is None and user_key(0) == "0"


@pytest.mark.parametrize("name,content,match", [
    ("e.jsonl", b"", "no rows"),
    ("m.jsonl", b'{"user_id": "a", "text": "x"}\n{oops\n', "line 2 is not valid JSON"),
    ("l.jsonl", b"[1, 2]\n", "line 1 is a JSON list"),
    ("e.csv", b"", "the file is empty"),
    ("h.csv", b"user_id,text\n", "no rows"),
    ("latin.csv", "user_id,text\na,caf\u00e9\n".encode("latin-1"), r"not UTF-8 text \(byte 0xe9"),
    ("latin.jsonl", '{"user_id": "a", "text": "caf\u00e9"}\n'.encode("latin-1"), "not UTF-8"),
    ("d.txt", b"hello", "unsupported file type '.txt'"),
    ("bad.parquet", b"not parquet", "not a readable Parquet file"),
])
def test_bad_files_are_one_line_user_errors(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=match) as err:
        read_table(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        read_table(tmp_path)


def test_users_with_too_little_text_are_dropped_by_name(tmp_path):
    rows = [{"user_id": "long", "text": "word " * 200}, {"user_id": "short", "text": "hi"},
            {"user_id": "long2", "text": "more " * 200}]
    path = _write(tmp_path / "d.jsonl", rows)
    prepared = prepare_client_data(_files(path, seq_len=32), ByteEncoder())
    assert [c.user_id for c in prepared.clients] == ["long", "long2"]
    assert prepared.dropped == ("short",)
    assert "1 user(s) left out" in prepared.dropped_note() and "short" in prepared.dropped_note()


def test_nobody_with_a_full_chunk_is_a_user_error(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"user_id": "a", "text": "hi"}])
    with pytest.raises(UserError, match="data.seq_len: no user has at least one chunk of 32 tokens"):
        prepare_client_data(_files(path, seq_len=32), ByteEncoder())
