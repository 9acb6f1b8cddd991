"""Replies carry only what aggregation needs unless configured: bucketed counts, no loss or tokens."""

import pytest

from fedtune.adapters import create_adapter
from fedtune.data import build_client_data
from fedtune.federation.inprocess import run_inprocess
from fedtune.federation.reply_figures import bucket_examples, reply_figures, resolve
from fedtune.models import load_base_model
from fedtune.models.tokenizer import ByteEncoder
from fedtune.types import ClientUpdate
from fedtune.workspace import RunDir
from tests.conftest import make_config

UPDATE = ClientUpdate(adapter={}, num_examples=37, train_loss=2.31, epsilon=1.5, delta=1e-5, steps=4, tokens=512)


def test_minimal_reply_withholds_exact_figures_and_buckets_the_count():
    exact = reply_figures(UPDATE, "exact", device=3, rank=4, partition=3, seconds=1.2)
    minimal = reply_figures(UPDATE, "minimal", device=3, rank=4, partition=3, seconds=1.2)
    assert exact.keys() == minimal.keys()  # every key present either way
    assert exact["num-examples"] == 37 and exact["train-loss"] == 2.31 and exact["tokens"] == 512
    assert minimal["num-examples"] == 32 and minimal["train-loss"] == -1 and minimal["tokens"] == -1
    assert minimal["steps"] == -1 and minimal["train-seconds"] == -1 and minimal["partition"] == -1
    assert minimal["epsilon"] == 1.5 and minimal["rank"] == 4  # what the label and the rank rule need
    assert [bucket_examples(n) for n in (1, 2, 3, 4, 5, 1000)] == [1, 2, 2, 4, 4, 512]


def test_auto_is_exact_in_simulations_and_minimal_on_deployed_devices():
    assert resolve("auto", deployed=False) == "exact" and resolve("auto", deployed=True) == "minimal"
    assert resolve("exact", deployed=True) == "exact"
    with pytest.raises(ValueError, match="auto, exact or minimal"):
        resolve("all", deployed=False)


def test_a_minimal_run_aggregates_without_losses_and_records_none(tmp_path):
    cfg = make_config(federation={"rounds": 1, "upload": "fp32", "reply_figures": "minimal"},
                      train={"local_steps": 1, "eval_max_chunks": 4})
    base, _ = load_base_model(cfg.model)
    records = run_inprocess(cfg, create_adapter(base, cfg.adapter, cfg.seed),
                            build_client_data(cfg.data, ByteEncoder(), cfg.seed), RunDir.create(tmp_path / "run"))
    last = records[-1]
    assert last["clients_succeeded"] == 3 and last["train_loss"] is None
    assert all(c["train-loss"] == -1 and c["tokens"] == -1 for c in last["clients"])
