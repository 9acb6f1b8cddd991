import pytest
import torch

from fedtune.aggregation import UpdateRejected, validate_update, weighted_average

REF = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}


def test_weighted_average_by_examples():
    s1 = {"a": torch.ones(2, 3), "b": torch.zeros(4)}
    s2 = {"a": torch.full((2, 3), 4.0), "b": torch.ones(4)}
    out = weighted_average([s1, s2], [3, 1])
    assert torch.allclose(out["a"], torch.full((2, 3), 1.75))
    assert torch.allclose(out["b"], torch.full((4,), 0.25))
    with pytest.raises(ValueError, match="no updates"):
        weighted_average([], [])


@pytest.mark.parametrize("update,n,reason", [
    ({"a": torch.zeros(2, 3)}, 5, "missing_keys"),
    (dict(REF, c=torch.zeros(1)), 5, "extra_keys"),
    ({"a": torch.zeros(3, 2), "b": torch.zeros(4)}, 5, "bad_shape"),
    ({"a": torch.zeros(2, 3, dtype=torch.int64), "b": torch.zeros(4)}, 5, "bad_dtype"),
    ({"a": torch.tensor([[0.0, float("nan"), 0], [0, 0, 0]]), "b": torch.zeros(4)}, 5, "non_finite"),
    ({"a": torch.zeros(2, 3), "b": torch.tensor([0.0, float("inf"), 0, 0])}, 5, "non_finite"),
    (REF, 0, "bad_num_examples"),
    (REF, 10**9, "bad_num_examples"),
])
def test_validate_rejects_with_reason(update, n, reason):
    with pytest.raises(UpdateRejected) as exc:
        validate_update(update, REF, n, max_examples=1000)
    assert exc.value.reason == reason


def test_validate_accepts_good_update():
    validate_update({"a": torch.ones(2, 3), "b": torch.ones(4)}, REF, 10, max_examples=1000)


def test_a_finite_update_whose_sum_overflows_is_not_called_non_finite():
    # the check takes norms first; an overflowing norm of finite values must fall through to the exact check
    from fedtune.aggregation.validate import validate_update

    ref = {"w": torch.zeros(2)}
    validate_update({"w": torch.full((2,), 3e38)}, ref, num_examples=1.0)  # finite, though 3e38 + 3e38 = inf


def test_the_fused_checks_name_the_bad_tensor_and_give_the_float64_norm():
    from fedtune.aggregation.validate import UpdateRejected, update_norm, validate_update

    g = torch.Generator().manual_seed(0)
    ref = {f"t{i}": torch.randn(7, 5, generator=g) for i in range(6)}
    up = {k: v + 0.01 * torch.randn(7, 5, generator=g) for k, v in ref.items()}
    exact = sum(float((up[k].double() - ref[k].double()).pow(2).sum()) for k in ref) ** 0.5
    assert update_norm(up, ref) == pytest.approx(exact, rel=1e-6)
    huge = {k: v.clone() for k, v in up.items()}
    huge["t2"][0, 0] = 3e38  # finite, but its square is past fp32's range: the norm is recomputed in float64
    assert update_norm(huge, ref) == pytest.approx(3e38, rel=1e-6)
    validate_update(huge, ref, num_examples=1.0)
    half = {k: v.half() for k, v in up.items()}  # mixed dtypes: computed in the wider one
    assert update_norm(half, ref) == pytest.approx(exact, rel=1e-2)
    for bad in (float("nan"), float("inf")):
        broken = {k: v.clone() for k, v in up.items()}
        broken["t4"][3, 1] = bad
        with pytest.raises(UpdateRejected, match="non_finite: t4 holds NaN or Inf"):
            validate_update(broken, ref, num_examples=1.0)
