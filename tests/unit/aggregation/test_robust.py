"""Robust aggregation rules: against a slow per-coordinate reference, and against poisoned cohorts."""

import statistics

import pytest
import torch

from fedtune.aggregation import (
    UpdateRejected, available_aggregators, create_aggregator, register_aggregator, update_norm, validate_metrics,
    validate_norm,
)


def _states(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(3, 2, generator=g), "b": torch.randn(5, generator=g)} for _ in range(n)]


def _reference(states, key, rule, k=0):
    """Per coordinate, in plain Python."""
    flat = [s[key].flatten().tolist() for s in states]
    out = []
    for j in range(len(flat[0])):
        col = sorted(f[j] for f in flat)
        out.append(statistics.median(col) if rule == "median" else statistics.mean(col[k: len(col) - k]))
    return torch.tensor(out).reshape(states[0][key].shape)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_median_matches_reference(n):
    states = _states(n, seed=n)
    out = create_aggregator("median")(states, [1.0] * n)
    for key in ("a", "b"):
        assert torch.allclose(out[key], _reference(states, key, "median"), atol=1e-6)


@pytest.mark.parametrize("n,f", [(5, 0.2), (10, 0.1), (10, 0.25), (4, 0.0)])
def test_trimmed_mean_matches_reference(n, f):
    states = _states(n, seed=10 + n)
    out = create_aggregator("trimmed_mean", trim_fraction=f)(states, [1.0] * n)
    for key in ("a", "b"):
        assert torch.allclose(out[key], _reference(states, key, "trimmed", int(f * n)), atol=1e-6)


@pytest.mark.parametrize("name,options", [("median", {}), ("trimmed_mean", {"trim_fraction": 0.2})])
def test_robust_rules_ignore_a_poisoned_minority_that_breaks_fedavg(name, options):
    honest = [{"a": torch.full((3, 2), 1.0 + 0.01 * i)} for i in range(4)]
    poisoned = [{"a": torch.full((3, 2), 1e6)}]
    weights = [10.0] * 4 + [1e6]  # the attacker also claims many examples
    fedavg = create_aggregator("fedavg")(honest + poisoned, weights)["a"]
    robust = create_aggregator(name, **options)(honest + poisoned, weights)["a"]
    assert fedavg.min() > 1e5
    assert robust.min() >= 1.0 and robust.max() <= 1.04


def test_fedavg_is_the_weighted_mean():
    states = _states(3)
    out = create_aggregator("fedavg")(states, [1.0, 2.0, 1.0])
    assert torch.allclose(out["a"], (states[0]["a"] + 2 * states[1]["a"] + states[2]["a"]) / 4)


def test_registry_fails_loudly():
    assert {"fedavg", "median", "trimmed_mean"} <= set(available_aggregators())
    with pytest.raises(ValueError, match="unknown aggregation 'mode'"):
        create_aggregator("mode")
    with pytest.raises(ValueError, match="already registered"):
        register_aggregator("median")(object)
    with pytest.raises(ValueError, match="trim_fraction"):
        create_aggregator("trimmed_mean", trim_fraction=0.5)
    with pytest.raises(ValueError, match="other keys"):
        create_aggregator("median")([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}], [1, 1])


def test_norm_bound():
    ref = {"a": torch.zeros(2, 2), "b": torch.ones(3)}
    up = {"a": torch.full((2, 2), 1.0), "b": torch.ones(3)}  # delta norm = sqrt(4) = 2
    assert update_norm(up, ref) == pytest.approx(2.0)
    assert validate_norm(up, ref, 2.0) == pytest.approx(2.0)
    assert validate_norm(up, ref, None) == pytest.approx(2.0)
    with pytest.raises(UpdateRejected) as exc:
        validate_norm(up, ref, 1.5)
    assert exc.value.reason == "norm_bound" and "max_update_norm=1.5" in str(exc.value)


@pytest.mark.parametrize("metrics", [{}, {"train-loss": float("nan")}, {"train-loss": float("inf")},
                                     {"train-loss": 1e9}, {"train-loss": 1.0, "epsilon": float("nan")}])
def test_metric_sanity_rejects(metrics):
    with pytest.raises(UpdateRejected) as exc:
        validate_metrics(metrics, max_train_loss=1e4)
    assert exc.value.reason == "bad_metrics"


def test_metric_sanity_accepts():
    validate_metrics({"train-loss": 2.5, "epsilon": -1.0}, max_train_loss=1e4)
