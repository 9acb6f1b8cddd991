import pytest
import torch

from fedtune.aggregation import (
    FlexLoRAState,
    aggregate_products,
    aggregate_zeropad,
    available_hetero_aggregators,
    create_hetero_aggregator,
    factorization_error,
    factorize,
    lora_modules,
    lora_rank,
    products,
    register_hetero_aggregator,
    truncate_rank,
    zero_pad_rank,
)
from fedtune.aggregation import hetero

Q = "base_model.model.model.layers.0.self_attn.q_proj"
DOWN = "base_model.model.model.layers.0.mlp.down_proj"
MODULES = {Q: (12, 10), DOWN: (9, 16)}  # prefix -> (d_out, d_in); d_out != d_in
R_MAX = 8
SCALE = 16.0 / R_MAX  # alpha / r_max, shared by every tier (alpha_k = alpha * r_k / r_max)
RANKS = [2, 4, 8]
WEIGHTS = [1.0, 2.0, 3.0]


def make_state(rank: int, seed: int, modules=MODULES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, (d_out, d_in) in modules.items():
        state[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=g)
        state[f"{prefix}.lora_B.weight"] = torch.randn(d_out, rank, generator=g)
    return state


def clients(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    return [make_state(r, seed * 100 + k) for k, r in enumerate(RANKS)]


def A(prefix: str) -> str:
    return f"{prefix}.lora_A.weight"


def B(prefix: str) -> str:
    return f"{prefix}.lora_B.weight"


def eckart_young_error(deltas: dict[str, torch.Tensor], rank: int) -> float:
    """sqrt(sum of discarded sigma^2) / ||ΔW||_F over all modules."""
    discarded = total = 0.0
    for d in deltas.values():
        s = torch.linalg.svdvals(d.double())
        discarded += float(torch.sum(s[rank:] ** 2))
        total += float(torch.sum(s ** 2))
    return (discarded / total) ** 0.5


# --- slow references ---------------------------------------------------------------------------------------


def ref_products_mean(states, weights, scale):
    """sum_k w_k s sum_j outer(B_k[:, j], A_k[j, :]) / sum_k w_k, one rank-one term at a time, fp64."""
    out = {}
    for prefix, (d_out, d_in) in MODULES.items():
        acc = torch.zeros(d_out, d_in, dtype=torch.float64)
        for s, w in zip(states, weights):
            a, b = s[A(prefix)].double(), s[B(prefix)].double()
            for j in range(a.shape[0]):
                acc += w * scale * torch.outer(b[:, j], a[j, :])
        out[prefix] = acc / sum(weights)
    return out


def ref_zeropad(states, weights, r_max):
    """Row by row of A, column by column of B; a client of rank r contributes nothing past r."""
    out = {}
    for prefix, (d_out, d_in) in MODULES.items():
        a = torch.zeros(r_max, d_in, dtype=torch.float64)
        b = torch.zeros(d_out, r_max, dtype=torch.float64)
        for s, w in zip(states, weights):
            for j in range(s[A(prefix)].shape[0]):
                a[j] += w * s[A(prefix)][j].double()
                b[:, j] += w * s[B(prefix)][:, j].double()
        out[A(prefix)] = a / sum(weights)
        out[B(prefix)] = b / sum(weights)
    return out


# --- keys --------------------------------------------------------------------------------------------------


def test_lora_modules_and_rank():
    s = make_state(4, 0)
    assert lora_modules(s) == {DOWN: (A(DOWN), B(DOWN)), Q: (A(Q), B(Q))}
    assert list(lora_modules(s)) == sorted(MODULES)
    assert lora_rank(s) == 4


# --- exact (FlexLoRA) maths --------------------------------------------------------------------------------


def test_products_shape_and_value():
    s = make_state(4, 1)
    p = products(s, SCALE)
    for prefix, (d_out, d_in) in MODULES.items():
        assert p[prefix].shape == (d_out, d_in) and p[prefix].dtype == torch.float32
        torch.testing.assert_close(p[prefix], SCALE * s[B(prefix)] @ s[A(prefix)])


def test_aggregate_products_is_exact_weighted_mean():
    states = clients()
    got = aggregate_products(states, WEIGHTS, [SCALE] * 3)
    assert set(got) == set(MODULES)
    for prefix in MODULES:
        explicit = sum(w * SCALE * s[B(prefix)].double() @ s[A(prefix)].double()
                       for s, w in zip(states, WEIGHTS)) / sum(WEIGHTS)
        assert got[prefix].dtype == torch.float32
        torch.testing.assert_close(got[prefix].double(), explicit, rtol=1e-6, atol=1e-6)


def test_aggregate_products_uses_each_clients_scale():
    states = clients()
    got = aggregate_products(states, WEIGHTS, [1.0, 2.0, 0.5])
    explicit = sum(w * sc * s[B(Q)] @ s[A(Q)] for s, w, sc in zip(states, WEIGHTS, [1.0, 2.0, 0.5])) / 6
    torch.testing.assert_close(got[Q], explicit, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [10, 14, 16])
def test_factorize_at_full_rank_reproduces_deltas(rank):
    deltas = aggregate_products(clients(), WEIGHTS, [SCALE] * 3)
    # sum of client ranks is 14 > min(d_out, d_in) for both modules: the true ranks are 10 and 9
    assert all(int(torch.linalg.matrix_rank(d)) == min(d.shape) for d in deltas.values())
    state = factorize(deltas, rank, SCALE)
    assert set(state) == {A(Q), B(Q), A(DOWN), B(DOWN)}
    for prefix, (d_out, d_in) in MODULES.items():
        assert state[A(prefix)].shape == (rank, d_in) and state[A(prefix)].dtype == torch.float32
        assert state[B(prefix)].shape == (d_out, rank) and state[B(prefix)].dtype == torch.float32
        k = min(d_out, d_in)  # ranks above min(d_out, d_in) are zero-padded
        assert torch.all(state[A(prefix)][k:] == 0) and torch.all(state[B(prefix)][:, k:] == 0)
    assert factorization_error(deltas, state, SCALE) < 1e-5


@pytest.mark.parametrize("rank", [1, 2, 3, 5])
def test_factorize_below_true_rank_is_eckart_young_optimal(rank):
    deltas = aggregate_products(clients(), WEIGHTS, [SCALE] * 3)
    err = factorization_error(deltas, factorize(deltas, rank, SCALE), SCALE)
    assert err == pytest.approx(eckart_young_error(deltas, rank), rel=1e-5)
    assert err > 1e-3


def test_factorize_keeps_template_key_names_and_scale_convention():
    deltas = aggregate_products(clients(), WEIGHTS, [SCALE] * 3)
    keys = {p: (f"{p}.A", f"{p}.B") for p in deltas}
    state = factorize(deltas, 4, SCALE, template_keys=keys)
    assert set(state) == {k for pair in keys.values() for k in pair}
    # B and A carry sqrt(S / scale) each: balanced factors, whatever the scale
    for prefix in deltas:
        a, b = state[keys[prefix][0]], state[keys[prefix][1]]
        torch.testing.assert_close(a.norm(dim=1), b.norm(dim=0), rtol=1e-4, atol=1e-5)


# --- zero-padding baseline ---------------------------------------------------------------------------------


def test_pad_then_truncate_round_trips():
    s = make_state(2, 3)
    padded = zero_pad_rank(s, R_MAX)
    assert lora_rank(padded) == R_MAX
    for prefix in MODULES:
        assert torch.all(padded[A(prefix)][2:] == 0) and torch.all(padded[B(prefix)][:, 2:] == 0)
    back = truncate_rank(padded, 2)
    assert set(back) == set(s)
    for k in s:
        assert torch.equal(back[k], s[k])
    # padding adds only zero components: the product is unchanged
    for prefix in MODULES:
        torch.testing.assert_close(products(padded, SCALE)[prefix], products(s, SCALE)[prefix])


def test_truncate_keeps_leading_rows_and_columns():
    s = make_state(8, 4)
    t = truncate_rank(s, 3)
    for prefix in MODULES:
        assert torch.equal(t[A(prefix)], s[A(prefix)][:3])
        assert torch.equal(t[B(prefix)], s[B(prefix)][:, :3])


def test_aggregate_zeropad_by_hand():
    s2 = {A(Q): torch.tensor([[1.0, 1.0], [2.0, 2.0]]), B(Q): torch.tensor([[1.0, 2.0]])}
    s4 = {A(Q): torch.tensor([[4.0, 0.0], [0.0, 4.0], [3.0, 3.0], [6.0, 6.0]]),
          B(Q): torch.tensor([[4.0, 4.0, 4.0, 8.0]])}
    out = aggregate_zeropad([s2, s4], [3, 1], r_max=4)
    expected_a = torch.tensor([[(3 * 1 + 4) / 4, (3 * 1 + 0) / 4],
                               [(3 * 2 + 0) / 4, (3 * 2 + 4) / 4],
                               [3 / 4, 3 / 4],
                               [6 / 4, 6 / 4]])
    expected_b = torch.tensor([[(3 * 1 + 4) / 4, (3 * 2 + 4) / 4, 4 / 4, 8 / 4]])
    torch.testing.assert_close(out[A(Q)], expected_a)
    torch.testing.assert_close(out[B(Q)], expected_b)


def test_rank2_client_contributes_nothing_past_its_rank():
    states = clients()
    out = aggregate_zeropad(states, WEIGHTS, R_MAX)
    without_rank2 = aggregate_zeropad([zero_pad_rank(states[0], R_MAX), *states[1:]], WEIGHTS, R_MAX)
    zeroed = {k: torch.zeros_like(v) for k, v in states[0].items()}
    only_others = aggregate_zeropad([zeroed, *states[1:]], WEIGHTS, R_MAX)
    for prefix in MODULES:
        assert torch.equal(out[A(prefix)], without_rank2[A(prefix)])
        torch.testing.assert_close(out[A(prefix)][2:], only_others[A(prefix)][2:], rtol=0, atol=0)
        torch.testing.assert_close(out[B(prefix)][:, 2:], only_others[B(prefix)][:, 2:], rtol=0, atol=0)
        # rows 2..3 get clients of rank 4 and 8; rows 4..7 only the rank-8 client (diluted by all weights)
        torch.testing.assert_close(out[A(prefix)][4:], states[2][A(prefix)][4:] * 3 / 6)


# --- aggregators -------------------------------------------------------------------------------------------


def test_registry_has_both_schemes():
    assert {"zeropad", "flexlora"} <= set(available_hetero_aggregators())


def test_flexlora_send_is_best_rank_r():
    agg = create_hetero_aggregator("flexlora")
    deltas = aggregate_products(clients(), WEIGHTS, [SCALE] * 3)
    glob = FlexLoRAState(deltas=deltas, keys={p: (A(p), B(p)) for p in deltas}, scale=SCALE)
    for r in RANKS:
        sent = agg.send(glob, r)
        assert lora_rank(sent) == r and set(sent) == set(make_state(r, 0))
        assert factorization_error(deltas, sent, SCALE) == pytest.approx(eckart_young_error(deltas, r), rel=1e-5)


def test_flexlora_round_then_to_adapter_has_peft_keys_and_shapes():
    agg = create_hetero_aggregator("flexlora")
    init = make_state(R_MAX, 7)
    for k in init:  # peft init: B = 0, so ΔW = 0
        if k.endswith("lora_B.weight"):
            init[k] = torch.zeros_like(init[k])
    glob = FlexLoRAState.from_adapter(init, SCALE)
    assert all(torch.all(d == 0) for d in glob.deltas.values())
    sent = [agg.send(glob, r) for r in RANKS]
    assert all(lora_rank(s) == r for s, r in zip(sent, RANKS))
    updates = clients(seed=5)  # "trained" adapters of ranks 2, 4, 8
    new = agg.aggregate(glob, updates, WEIGHTS, RANKS)
    assert isinstance(new, FlexLoRAState) and new.scale == SCALE and new.keys == glob.keys
    for prefix in MODULES:
        torch.testing.assert_close(new.deltas[prefix], aggregate_products(updates, WEIGHTS, [SCALE] * 3)[prefix])
    for r in [*RANKS, R_MAX]:
        out = new.to_adapter(r)
        assert set(out) == set(init)
        for prefix, (d_out, d_in) in MODULES.items():
            assert out[A(prefix)].shape == (r, d_in) and out[B(prefix)].shape == (d_out, r)


def test_zeropad_aggregator_round():
    agg = create_hetero_aggregator("zeropad")
    glob = make_state(R_MAX, 8)
    for r in RANKS:
        sent = agg.send(glob, r)
        assert lora_rank(sent) == r and torch.equal(sent[A(Q)], glob[A(Q)][:r])
    updates = clients()
    new = agg.aggregate(glob, updates, WEIGHTS, RANKS)
    for k, v in aggregate_zeropad(updates, WEIGHTS, R_MAX).items():
        assert torch.equal(new[k], v)


@pytest.mark.parametrize("name", ["zeropad", "flexlora"])
def test_contract_homogeneous_fleet_keeps_its_adapter(name):
    """Every scheme: if all devices are rank r_max and send back what they got, the global ΔW is unchanged."""
    agg = create_hetero_aggregator(name)
    adapter = make_state(R_MAX, 9)
    glob = adapter if name == "zeropad" else FlexLoRAState.from_adapter(adapter, SCALE)
    sent = [agg.send(glob, R_MAX) for _ in range(3)]
    new = agg.aggregate(glob, sent, WEIGHTS, [R_MAX] * 3)
    new_adapter = new if name == "zeropad" else new.to_adapter(R_MAX)
    for prefix in MODULES:
        torch.testing.assert_close(products(new_adapter, SCALE)[prefix], products(adapter, SCALE)[prefix],
                                   rtol=1e-4, atol=1e-4)


# --- property tests against the slow references ------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_property_against_slow_reference(seed):
    g = torch.Generator().manual_seed(seed)
    ranks = [int(r) for r in torch.randint(1, R_MAX + 1, (4,), generator=g)]
    weights = [float(w) for w in torch.rand(4, generator=g) + 0.1]
    states = [make_state(r, 1000 * seed + k) for k, r in enumerate(ranks)]

    got = aggregate_products(states, weights, [SCALE] * 4)
    ref = ref_products_mean(states, weights, SCALE)
    for p in MODULES:
        torch.testing.assert_close(got[p].double(), ref[p], rtol=1e-5, atol=1e-5)

    got_zp = aggregate_zeropad(states, weights, R_MAX)
    for k, v in ref_zeropad(states, weights, R_MAX).items():
        torch.testing.assert_close(got_zp[k].double(), v, rtol=1e-5, atol=1e-6)

    # FlexLoRA's rank-r redistribution beats any other rank-r adapter, e.g. the zero-padding global's
    for r in (1, 3, 6):
        best = factorization_error(got, factorize(got, r, SCALE), SCALE)
        assert best == pytest.approx(eckart_young_error(got, r), rel=1e-5)
        assert best <= factorization_error(got, truncate_rank(got_zp, r), SCALE) + 1e-6
        assert best <= factorization_error(got, make_state(r, seed), SCALE) + 1e-6


# --- errors ------------------------------------------------------------------------------------------------


def test_unpaired_factor_named():
    s = make_state(4, 0)
    del s[B(Q)]
    with pytest.raises(ValueError, match=rf"{A(Q)}.*no matching.*{B(Q)}"):
        lora_modules(s)
    s = make_state(4, 0)
    del s[A(DOWN)]
    with pytest.raises(ValueError, match=rf"{B(DOWN)}.*no matching.*{A(DOWN)}"):
        truncate_rank(s, 2)


def test_non_lora_keys_refused():
    with pytest.raises(ValueError, match=r"prompt_embeddings.*LoRA only"):
        lora_modules({"prompt_embeddings": torch.zeros(8, 16)})
    s = dict(make_state(2, 0), **{"base_model.model.lm_head.bias": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"lm_head.bias.*LoRA only"):
        aggregate_zeropad([s], [1.0], R_MAX)


def test_mismatched_modules_across_clients_named():
    a = make_state(2, 0)
    b = make_state(4, 1, modules={Q: MODULES[Q]})
    with pytest.raises(ValueError, match=rf"update 1.*missing.*{DOWN}"):
        aggregate_zeropad([a, b], [1, 1], R_MAX)
    with pytest.raises(ValueError, match=rf"update 1.*missing.*{DOWN}"):
        aggregate_products([a, b], [1, 1], [SCALE, SCALE])


def test_mismatched_shapes_named():
    a = make_state(2, 0)
    b = make_state(2, 1, modules={Q: (12, 11), DOWN: MODULES[DOWN]})
    with pytest.raises(ValueError, match=rf"update 1, module '{Q}'.*\(12, 11\)"):
        aggregate_products([a, b], [1, 1], [SCALE, SCALE])
    bad = make_state(2, 0)
    bad[A(Q)] = torch.zeros(3, 10)
    with pytest.raises(ValueError, match=rf"{Q}.*same r.*\(3, 10\)"):
        products(bad, SCALE)


@pytest.mark.parametrize("name", ["zeropad", "flexlora"])
def test_aggregator_refuses_update_with_other_modules(name):
    agg = create_hetero_aggregator(name)
    adapter = make_state(R_MAX, 0)
    glob = adapter if name == "zeropad" else FlexLoRAState.from_adapter(adapter, SCALE)
    updates = [make_state(2, 1), make_state(4, 2, modules={Q: MODULES[Q]})]
    with pytest.raises(ValueError, match=rf"update 1 .*global state: missing \['{DOWN}'\]"):
        agg.aggregate(glob, updates, [1, 1], [2, 4])


def test_weight_errors():
    states = clients()
    with pytest.raises(ValueError, match=r"sum to > 0"):
        aggregate_zeropad(states, [0, 0, 0], R_MAX)
    with pytest.raises(ValueError, match=r"sum to > 0"):
        aggregate_products(states, [0.0, 0.0, 0.0], [SCALE] * 3)
    with pytest.raises(ValueError, match=r"3 updates but 2 weights"):
        aggregate_zeropad(states, [1, 2], R_MAX)
    with pytest.raises(ValueError, match=r"3 updates but 1 scales"):
        aggregate_products(states, WEIGHTS, [SCALE])
    with pytest.raises(ValueError, match=r">= 0"):
        aggregate_products(states, [1, -1, 1], [SCALE] * 3)
    with pytest.raises(ValueError, match=r"no updates"):
        aggregate_zeropad([], [], R_MAX)


def test_rank_errors():
    s = make_state(4, 0)
    with pytest.raises(ValueError, match=r"rank 4 to the larger rank 8"):
        truncate_rank(s, 8)
    with pytest.raises(ValueError, match=r"rank 4 to the smaller rank 2"):
        zero_pad_rank(s, 2)
    with pytest.raises(ValueError, match=r"rank 8 to the smaller rank 4"):
        aggregate_zeropad([make_state(8, 0)], [1], r_max=4)
    with pytest.raises(ValueError, match=r"positive int, got 0"):
        factorize(products(s, SCALE), 0, SCALE)
    with pytest.raises(ValueError, match=r"scale.*> 0, got 0"):
        factorize(products(s, SCALE), 2, 0.0)
    with pytest.raises(ValueError, match=r"update 1 was announced as rank 2 but.*rank 4"):
        create_hetero_aggregator("zeropad").aggregate(make_state(8, 0), clients(), WEIGHTS, [2, 2, 8])
    glob = FlexLoRAState.from_adapter(make_state(8, 0), SCALE)
    with pytest.raises(ValueError, match=r"3 updates but 2 ranks"):
        create_hetero_aggregator("flexlora").aggregate(glob, clients(), WEIGHTS, [2, 4])
    mixed = dict(make_state(2, 0, modules={Q: MODULES[Q]}), **make_state(4, 0, modules={DOWN: MODULES[DOWN]}))
    with pytest.raises(ValueError, match=r"different ranks"):
        lora_rank(mixed)


def test_registry_errors():
    with pytest.raises(ValueError, match=r"unknown heterogeneous-rank aggregator 'hetlora'.*flexlora.*zeropad"):
        create_hetero_aggregator("hetlora")
    with pytest.raises(ValueError, match=r"'zeropad' is already registered"):
        register_hetero_aggregator("zeropad")(hetero.ZeroPadAggregator)
    assert hetero._AGGREGATORS["zeropad"] is hetero.ZeroPadAggregator


def test_registry_accepts_new_names(monkeypatch):
    monkeypatch.setattr(hetero, "_AGGREGATORS", dict(hetero._AGGREGATORS))

    @register_hetero_aggregator("test-only")
    class Dummy:
        def send(self, global_state, rank):
            return truncate_rank(global_state, rank)

        def aggregate(self, global_state, updates, weights, ranks):
            return global_state

    assert isinstance(create_hetero_aggregator("test-only"), Dummy)


def test_factorization_error_and_state_errors():
    deltas = products(make_state(4, 0), SCALE)
    with pytest.raises(ValueError, match=rf"only in deltas \['{Q}'\]"):
        factorization_error(deltas, make_state(4, 0, modules={DOWN: MODULES[DOWN]}), SCALE)
    with pytest.raises(ValueError, match=r"template_keys has no entry"):
        factorize(deltas, 2, SCALE, template_keys={Q: (A(Q), B(Q))})
    with pytest.raises(ValueError, match=r"deltas and keys name different modules"):
        FlexLoRAState(deltas=deltas, keys={Q: (A(Q), B(Q))}, scale=SCALE)
    zero = {p: torch.zeros_like(d) for p, d in deltas.items()}
    assert factorization_error(zero, factorize(zero, 2, SCALE), SCALE) == 0.0
