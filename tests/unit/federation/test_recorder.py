"""metrics.jsonl's per-round throughput: device steps and tokens per second from what the replies report."""

import pytest

from fedtune.adapters import create_adapter
from fedtune.data import build_client_data
from fedtune.federation.inprocess import run_inprocess
from fedtune.federation.recorder import round_throughput
from fedtune.models import load_base_model
from fedtune.models.tokenizer import ByteEncoder
from fedtune.workspace import RunDir
from tests.conftest import make_config


def test_throughput_sums_the_replies_counts_over_the_round_wall_time():
    clients = [{"steps": 4, "tokens": 512}, {"steps": 2, "tokens": 256}]
    assert round_throughput(clients, 3.0) == {"device_steps_per_s": 2.0, "tokens_per_s": 256.0}


@pytest.mark.parametrize("clients, seconds", [
    ([], 3.0),  # round 0 / nothing aggregated: no device ran
    ([{"steps": 4, "tokens": 512}, {"steps": -1, "tokens": -1}], 3.0),  # one reply withheld its counts
    ([{"steps": 4, "tokens": -1}], 3.0),
    ([{"steps": 4, "tokens": 512}], 0.0),
])
def test_throughput_is_null_when_the_counts_or_the_time_are_not_known(clients, seconds):
    assert round_throughput(clients, seconds) == {"device_steps_per_s": None, "tokens_per_s": None}


def _run(tmp_path, policy: str) -> list[dict]:
    cfg = make_config(federation={"rounds": 1, "upload": "fp32", "reply_figures": policy},
                      train={"local_steps": 2, "eval_max_chunks": 4})
    base, _ = load_base_model(cfg.model)
    return run_inprocess(cfg, create_adapter(base, cfg.adapter, cfg.seed),
                         build_client_data(cfg.data, ByteEncoder(), cfg.seed), RunDir.create(tmp_path / policy))


def test_records_carry_throughput_from_exact_replies_and_null_from_minimal_ones(tmp_path):
    exact = _run(tmp_path, "exact")
    first, last = exact
    assert first["round"] == 0 and first["device_steps_per_s"] is None and first["tokens_per_s"] is None
    steps = sum(c["steps"] for c in last["clients"])
    tokens = sum(c["tokens"] for c in last["clients"])
    assert steps == 3 * 2 and tokens == steps * 4 * 32  # 3 devices x 2 steps of 4 x 32 tokens
    assert last["device_steps_per_s"] == pytest.approx(steps / last["wall_seconds"], rel=1e-3)
    assert last["tokens_per_s"] == pytest.approx(tokens / last["wall_seconds"], rel=1e-3)
    minimal = _run(tmp_path, "minimal")[-1]
    assert minimal["clients_succeeded"] == 3
    assert minimal["device_steps_per_s"] is None and minimal["tokens_per_s"] is None
