import json

import pandas as pd
import pytest
import torch

from fedtune.data import build_client_data, chunk_tokens, load_client_data, load_user_texts, save_client_data
from fedtune.models.tokenizer import ByteEncoder
from tests.conftest import make_config

ROWS = [{"uid": "ann", "body": "hello world " * 20}, {"uid": "bob", "body": "good morning " * 30},
        {"uid": "ann", "body": "second doc " * 10}]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_files_source_reads_user_and_text_columns(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    df = pd.DataFrame(ROWS)
    {".jsonl": lambda: path.write_text("\n".join(json.dumps(r) for r in ROWS)),
     ".csv": lambda: df.to_csv(path, index=False),
     ".parquet": lambda: df.to_parquet(path)}[suffix]()
    cfg = make_config(data={"source": "files", "path": str(path), "user_column": "uid", "text_column": "body"})
    users = load_user_texts(cfg.data)
    assert list(users) == ["ann", "bob"]
    assert len(users["ann"]) == 2


def test_files_source_names_missing_columns(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"user": "a", "text": "x"}))
    cfg = make_config(data={"source": "files", "path": str(path), "user_column": "uid"})
    with pytest.raises(ValueError, match=r"missing column\(s\) \['uid'\].*data.user_column"):
        load_user_texts(cfg.data)


def test_sotu_is_partitioned_by_president_id():
    cfg = make_config(data={"source": "sotu"})
    users = load_user_texts(cfg.data)
    assert len(users) == 45
    assert "roosevelt-franklin" in users or any("roosevelt" in u for u in users)
    assert sum(len(v) for v in users.values()) >= 237


def test_chunking_and_heldout_split_are_deterministic(tmp_path):
    enc = ByteEncoder()
    chunks = chunk_tokens(["abcdefgh", "ij"], enc, seq_len=4)
    assert chunks.tolist() == [[97, 98, 99, 100], [101, 102, 103, 104], [257, 105, 106, 257]]
    cfg = make_config().data
    a = build_client_data(cfg, enc, seed=3)
    b = build_client_data(cfg, enc, seed=3)
    assert [c.user_id for c in a] == ["user-000", "user-001", "user-002"]
    for ca, cb in zip(a, b):
        assert torch.equal(ca.train, cb.train) and torch.equal(ca.heldout, cb.heldout)
        assert ca.heldout.shape[0] >= 1
    save_client_data(a, tmp_path)
    loaded = load_client_data(tmp_path, 1)
    assert loaded.user_id == "user-001" and torch.equal(loaded.train, a[1].train)
    with pytest.raises(IndexError, match="3 clients"):
        load_client_data(tmp_path, 7)


def test_heldout_split_partitions_the_chunks():
    from fedtune.data.partition import split_heldout

    chunks = torch.arange(40).view(10, 4)  # 10 distinct rows
    train, held = split_heldout(chunks, 0.2, seed=1)
    assert held.shape[0] == 2 and train.shape[0] == 8
    rows = sorted(tuple(r) for r in torch.cat([train, held]).tolist())
    assert rows == sorted(tuple(r) for r in chunks.tolist())  # disjoint and complete
    train2, held2 = split_heldout(chunks, 0.2, seed=2)
    assert not torch.equal(held, held2) or not torch.equal(train, train2)


def test_synthetic_users_differ():
    users = load_user_texts(make_config().data)
    firsts = {u: docs[0].split()[:2] for u, docs in users.items()}
    assert len({tuple(v) for v in firsts.values()}) > 1
