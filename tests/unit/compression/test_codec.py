import pytest
import torch

from fedtune.compression import (
    BLOCK, ResidualStore, decode_update, dequantize_blockwise, encode_update, payload_scheme, quantize_blockwise,
)


def _state(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {"a.lora_A": scale * torch.randn(4, 300, generator=g), "a.lora_B": scale * torch.randn(70, 4, generator=g),
            "b.lora_A": scale * torch.randn(4, 10, generator=g)}


def test_blockwise_int8_error_is_at_most_half_a_step_per_block():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 10, 1000)
    x[256:512] = 0  # an all-zero block decodes to zeros
    q, scale = quantize_blockwise(x)
    assert q.dtype == torch.int8 and q.shape == (1000,) and scale.shape == (4,)
    err = (dequantize_blockwise(q, scale) - x).abs()
    step = scale.repeat_interleave(BLOCK)[:1000]
    assert (err <= step / 2 + 1e-7).all()
    assert (dequantize_blockwise(q, scale)[256:512] == 0).all()


def test_dequantize_rejects_a_wrong_number_of_scales():
    with pytest.raises(ValueError, match="scales"):
        dequantize_blockwise(torch.zeros(600, dtype=torch.int8), torch.ones(2))


@pytest.mark.parametrize("scheme,dtype", [("fp32", torch.float32), ("fp16", torch.float16)])
def test_float_schemes_keep_the_keys_and_decode_without_the_sent_adapter(scheme, dtype):
    state = _state(0)
    payload, residual = encode_update(state, _state(1), scheme)
    assert residual is None and payload.keys() == state.keys() and all(v.dtype == dtype for v in payload.values())
    assert payload_scheme(payload) == scheme
    out = decode_update(payload, None)
    for k in state:
        tol = 1e-3 if scheme == "fp16" else 0.0
        torch.testing.assert_close(out[k], state[k], rtol=tol, atol=tol)
    for k in state:  # the decoded adapter is fp32 and its own memory: aggregating it never writes the payload
        assert out[k].dtype == torch.float32 and out[k].data_ptr() != payload[k].data_ptr()


def test_int8_is_a_delta_from_the_sent_adapter_and_keeps_the_error_on_the_device():
    sent = _state(1, scale=10.0)  # large weights, small delta: quantizing the delta, not the weights
    trained = {k: v + 0.01 * _state(2)[k] for k, v in sent.items()}
    payload, residual = encode_update(trained, sent, "int8")
    assert set(payload) == {"delta.int8", "delta.scale"} and payload_scheme(payload) == "int8"
    decoded = decode_update(payload, sent)
    for k in sent:
        # what the server gets plus what the device keeps is exactly the trained adapter
        torch.testing.assert_close(decoded[k] + residual[k], trained[k], rtol=0, atol=1e-6)
        assert (decoded[k] - trained[k]).abs().max() < 0.01 * 0.05


def test_error_feedback_does_not_let_the_error_accumulate():
    """Over many rounds the server's running sum of decoded deltas stays within one residual of the truth."""
    sent = {k: torch.zeros_like(v) for k, v in _state(0).items()}
    residual, true_sum, got_sum = None, 0.0, 0.0
    for r in range(20):
        delta = {k: 0.01 * v for k, v in _state(100 + r).items()}
        trained = {k: sent[k] + delta[k] for k in sent}
        payload, residual = encode_update(trained, sent, "int8", residual)
        decoded = decode_update(payload, sent)
        true_sum += torch.cat([delta[k].flatten() for k in sorted(sent)])
        got_sum += torch.cat([(decoded[k] - sent[k]).flatten() for k in sorted(sent)])
        res = torch.cat([residual[k].flatten() for k in sorted(sent)])
        torch.testing.assert_close(got_sum + res, true_sum, rtol=0, atol=1e-5)
    assert res.abs().max() < 0.01 * 4 / 127  # bounded by half a step, not growing with the rounds


def test_a_residual_of_another_layout_is_dropped():
    sent = _state(1)
    trained = {k: v + 0.01 for k, v in sent.items()}
    stale = {"a.lora_A": torch.full((8, 300), 1e3)}  # another rank: must not leak into the delta
    p1, _ = encode_update(trained, sent, "int8", stale)
    p2, _ = encode_update(trained, sent, "int8", None)
    assert torch.equal(p1["delta.int8"], p2["delta.int8"])


def test_int8_decode_errors_name_the_problem():
    sent = _state(1)
    payload, _ = encode_update(_state(2), sent, "int8")
    with pytest.raises(ValueError, match="needs the adapter sent"):
        decode_update(payload, None)
    with pytest.raises(ValueError, match="values"):
        decode_update(payload, {"a.lora_A": torch.zeros(4, 300)})
    with pytest.raises(ValueError, match="federation.upload"):
        encode_update(sent, sent, "int4")


def test_residual_store_round_trip(tmp_path):
    store = ResidualStore(tmp_path / "residuals")
    assert store.load("dev/1") is None
    res = _state(3)
    store.save("dev/1", res)
    back = ResidualStore(tmp_path / "residuals").load("dev/1")  # another worker reads it
    assert back.keys() == res.keys() and all(torch.equal(back[k], res[k]) for k in res)
