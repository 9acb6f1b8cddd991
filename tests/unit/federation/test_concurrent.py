"""Devices side by side in the in-process backend: the same round as one at a time, and really side by side."""

import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from fedtune.adapters import create_adapter
from fedtune.data import build_client_data
from fedtune.federation.concurrent import ConcurrentDevices, resolve_workers, torch_threads
from fedtune.federation.inprocess import run_inprocess
from fedtune.models import load_base_model
from fedtune.models.tokenizer import ByteEncoder
from fedtune.training.replica import shares_frozen_base
from fedtune.workspace import RunDir
from tests.conftest import make_config


def _run(tmp_path, name: str, concurrent: int, dp: bool = False):
    cfg = make_config(federation={"rounds": 2, "clients_per_round": 3, "min_clients": 3, "upload": "fp32"},
                      train={"local_steps": 2, "eval_max_chunks": 4}, privacy={"enabled": dp})
    model = create_adapter(load_base_model(cfg.model)[0], cfg.adapter, cfg.seed)
    run = RunDir.create(tmp_path / name)
    records = run_inprocess(cfg, model, build_client_data(cfg.data, ByteEncoder(), cfg.seed), run,
                            concurrent=concurrent)
    return run, records


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "dp-sgd"])
def test_side_by_side_round_equals_one_at_a_time(tmp_path, dp):
    one_run, one = _run(tmp_path, "one", 1, dp)
    two_run, two = _run(tmp_path, "two", 3, dp)
    assert [r["clients_succeeded"] for r in two] == [r["clients_succeeded"] for r in one] == [0, 3, 3]
    assert (one[-1].get("epsilon") is not None) == dp
    for a, b in zip(one[1:], two[1:]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    for a, b in zip(one, two):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
        assert b.get("epsilon") == a.get("epsilon")  # the same ledgers (absent without DP)
    final_one = load_file(one_run.adapter(2) / "adapter_model.safetensors")
    final_two = load_file(two_run.adapter(2) / "adapter_model.safetensors")
    assert final_one.keys() == final_two.keys()
    for k in final_one:
        torch.testing.assert_close(final_two[k], final_one[k], rtol=1e-4, atol=1e-6)


def test_calls_overlap_on_replicas_that_share_the_base():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    runner = ConcurrentDevices(2, cpus=2)
    spans, seen, barrier = {}, [], threading.Barrier(2, timeout=10)

    def call(replica, job):
        start = time.monotonic()
        barrier.wait()  # both calls must be running at once to pass (a serial runner would time out)
        seen.append(replica)
        spans[job] = (start, time.monotonic())
        return job * 10

    assert list(runner.map(call, [(model, 1), (model, 2)])) == [10, 20]  # in job order
    (s1, e1), (s2, e2) = spans[1], spans[2]
    assert s1 < e2 and s2 < e1  # the calls overlapped
    a, b = seen
    assert a is not b and shares_frozen_base(a, b)
    assert a[0].weight.data_ptr() == b[0].weight.data_ptr() and a[1].weight.data_ptr() != b[1].weight.data_ptr()


def test_one_worker_runs_inline_on_the_model_itself():
    model = torch.nn.Linear(2, 2)
    got = list(ConcurrentDevices(1).map(lambda m, j: (m, threading.current_thread()), [(model, 0), (model, 1)]))
    assert all(m is model and t is threading.main_thread() for m, t in got)


def test_default_workers_follow_the_device():
    assert resolve_workers(None, "cuda") == 1
    assert resolve_workers(None, "cpu") == min(torch.get_num_threads(), 8)
    with torch_threads(1):  # a caller that gave this process one core gets one device at a time
        assert resolve_workers(None, "cpu") == 1
    assert resolve_workers(3, "cuda") == 3
    with pytest.raises(ValueError, match="concurrent_devices"):
        ConcurrentDevices(0)
