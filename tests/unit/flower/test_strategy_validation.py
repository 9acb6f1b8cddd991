"""Contract: a cohort with poisoned replies (NaN, Inf, wrong shape, extra key, huge norm, bad metrics) plus
a declined and a failed device; only the honest updates are aggregated, each rejection counted by reason."""

import math

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedtune.aggregation import create_aggregator
from fedtune.flower.device import decline
from fedtune.flower.records import state_to_arrays, arrays_to_state
from fedtune.flower.strategy import AdapterFedAvg

GLOBAL = {"l.lora_A.weight": torch.zeros(2, 3), "l.lora_B.weight": torch.zeros(3, 2)}


@pytest.fixture(autouse=True)
def _task_identity():
    """Flower stamps messages with the run's identity, set by the ServerApp runtime."""
    from flwr.supercore.task_identity import TaskIdentity

    before = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = before


class FakeGrid:
    def __init__(self, n):
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))


def _metrics(n=10, loss=1.0):
    return MetricRecord({"num-examples": n, "train-loss": loss, "epsilon": -1.0})


def _reply(to, state, metrics=None):
    return Message(content=RecordDict({"arrays": state_to_arrays(state) if isinstance(state, dict) else state,
                                       "metrics": metrics or _metrics()}), reply_to=to)


def _honest(v):
    return {k: torch.full_like(t, v) for k, t in GLOBAL.items()}


def _cohort(strategy, n):
    out = strategy.configure_train(1, state_to_arrays(GLOBAL), ConfigRecord({"lr": 0.1}), FakeGrid(n))
    return list(out)


POISON = {
    "non_finite": lambda: {**_honest(0.1), "l.lora_A.weight": torch.full((2, 3), float("nan"))},
    "non_finite ": lambda: {**_honest(0.1), "l.lora_B.weight": torch.full((3, 2), float("inf"))},
    "bad_shape": lambda: {**_honest(0.1), "l.lora_A.weight": torch.zeros(4, 3)},
    "extra_keys": lambda: {**_honest(0.1), "l.lora_C.weight": torch.zeros(1)},
    "norm_bound": lambda: _honest(1e3),
}


def _strategy(**kw):
    opts = dict(reference=GLOBAL, clients_per_round=10, min_clients=2, seed=0, max_examples=100,
                max_update_norm=2.0, max_train_loss=100.0)
    opts.update(kw)
    return AdapterFedAvg(**opts)


@pytest.mark.parametrize("aggregation", ["fedavg", "median", "trimmed_mean"])
def test_poisoned_cohort_is_rejected_by_reason_and_never_aggregated(aggregation):
    agg = None if aggregation == "fedavg" else create_aggregator(aggregation, trim_fraction=0.2)
    s = _strategy(aggregator=agg)
    out = _cohort(s, 10)
    assert len(out) == 10
    replies = [_reply(out[0], _honest(0.1)), _reply(out[1], _honest(0.3), _metrics(30))]
    for i, make in enumerate(POISON.values()):
        replies.append(_reply(out[2 + i], make()))
    replies.append(_reply(out[7], _honest(0.2), _metrics(loss=float("nan"))))
    replies.append(decline(out[8], "not_charging"))
    replies.append(Message(Error(code=0, reason="device crashed"), reply_to=out[9]))
    arrays, metrics = s.aggregate_train(1, replies)
    stats = s.stats[1]
    assert dict(stats.rejected) == {"non_finite": 2, "bad_shape": 1, "extra_keys": 1, "norm_bound": 1,
                                    "bad_metrics": 1}
    assert dict(stats.declined) == {"not_charging": 1}
    assert stats.failed == 1 and stats.succeeded == 2 and not stats.skipped
    new = arrays_to_state(arrays)
    expected = {"fedavg": 0.25, "median": 0.2, "trimmed_mean": 0.2}[aggregation]  # only the two honest ones
    for t in new.values():
        assert torch.allclose(t, torch.full_like(t, expected))
    assert math.isfinite(stats.train_loss) and stats.train_loss == pytest.approx(1.0)


def test_round_is_skipped_when_too_few_valid_updates_remain():
    s = _strategy(min_clients=2)
    out = _cohort(s, 3)
    replies = [_reply(out[0], _honest(0.1)), _reply(out[1], POISON["norm_bound"]()),
               _reply(out[2], POISON["non_finite"]())]
    assert s.aggregate_train(1, replies) == (None, None)
    assert s.stats[1].skipped and s.stats[1].succeeded == 1
    assert dict(s.stats[1].rejected) == {"norm_bound": 1, "non_finite": 1}


def test_norm_is_measured_against_the_adapter_sent_this_round():
    s = _strategy(max_update_norm=1.0)
    moved = _honest(5.0)  # far from zero, but this round's global adapter is already there
    out = list(s.configure_train(2, state_to_arrays(moved), ConfigRecord({}), FakeGrid(2)))
    replies = [_reply(out[0], _honest(5.1)), _reply(out[1], _honest(5.2))]
    arrays, _ = s.aggregate_train(2, replies)
    assert arrays is not None and not s.stats[2].rejected


def test_a_reply_whose_flat_layout_does_not_add_up_is_rejected_as_malformed():
    s = _strategy(min_clients=1)
    out = _cohort(s, 2)
    bad = state_to_arrays(_honest(0.1))
    bad["flat:float32"] = state_to_arrays({"x": torch.zeros(5)})["flat:float32"]  # 5 values, the layout names 12
    replies = [_reply(out[0], _honest(0.1)), _reply(out[1], bad)]
    arrays, _ = s.aggregate_train(1, replies)  # counted, not raised: the round goes on with the honest one
    assert dict(s.stats[1].rejected) == {"malformed": 1} and s.stats[1].succeeded == 1
    assert all(torch.allclose(t, torch.full_like(t, 0.1)) for t in arrays_to_state(arrays).values())
