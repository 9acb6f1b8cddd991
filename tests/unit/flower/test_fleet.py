"""The server's fleet coordinator and strategy: cohorts on the simulated clock, deadlines, dropouts."""

import math

import pytest
import torch

from fedtune.adapters import create_adapter, get_adapter_state
from fedtune.aggregation import lora_rank, products
from fedtune.federation.fleet import FleetCoordinator
from fedtune.flower.fleet_strategy import FleetFedAvg, fill_dead_components
from fedtune.models import load_base_model
from tests.conftest import make_config

MIX = {"phone-low": 0.3, "phone-high": 0.3, "laptop-8gb": 0.2, "edge-cpu": 0.1, "desktop-24gb": 0.1}


def _cfg(**fleet):
    return make_config(adapter={"rank": 8, "alpha": 16},
                       federation={"rounds": 3, "clients_per_round": 5, "min_clients": 2},
                       fleet=dict({"enabled": True, "population": 1000, "mixture": MIX, "deadline_s": 60.0,
                                   "over_selection": 0.4, "start_hour": 23, "simulated_params": 135_000_000},
                                  **fleet))


def _coord(**fleet):
    return FleetCoordinator(_cfg(**fleet), n_users=3, model_params=135_000_000, adapter_bytes_per_rank=60_000)


def test_cohort_is_online_devices_with_over_selection_and_deterministic():
    a, b = _coord(), _coord()
    cohort = a.cohort(1)
    assert cohort == b.cohort(1)
    assert len(cohort) == math.ceil(5 * 1.4)
    assert all(a.online(d) for d in cohort)
    assert sum(a.stats[1].sampled_by_tier.values()) == len(cohort)


def test_tasks_follow_the_profile():
    c = _coord()
    ranks = {}
    for d in range(200):
        task = c.task(d)
        ranks.setdefault(c.tier(d), set()).add(task.rank)
        assert task.device == d and task.local_steps >= 1
        assert task.alpha / task.rank == pytest.approx(16 / 8)  # same LoRA scale in every tier
    assert ranks["phone-low"] == {4} and ranks["laptop-8gb"] == {8} and ranks["desktop-24gb"] == {8}


def test_settle_drops_stragglers_keeps_first_finishers_and_advances_the_clock():
    c = _coord()
    finished = {1: 10.0, 2: 70.0, 3: 20.0, 4: 5.0, 5: 30.0, 6: 40.0, 7: 59.0}  # device 2 misses the 60 s deadline
    accepted = c.settle(1, finished, failed=[9])
    assert accepted == [4, 1, 3, 5, 6]  # the cohort of 5, in finishing order
    st = c.stats[1]
    assert sum(st.stragglers_by_tier.values()) == 1 and sum(st.dropouts_by_tier.values()) == 1
    assert st.over_selected == 1  # device 7 finished in time but after the cohort was full
    assert st.sim_round_seconds == 40.0 and c.clock.seconds == 40.0
    # an incomplete cohort waits for the deadline
    c.settle(2, {1: 10.0, 2: 61.0}, failed=[])
    assert c.stats[2].sim_round_seconds == 60.0 and c.clock.seconds == 100.0


def test_device_that_cannot_fit_a_step_is_never_sampled():
    c = _coord(deadline_s=0.005)  # not even the download fits
    assert not any(c.plan(d).can_participate for d in range(50))
    assert c.cohort(1) == []


def test_fill_dead_components_keeps_the_product_and_revives_zero_rows():
    cfg = make_config(adapter={"rank": 4, "alpha": 8})
    base, _ = load_base_model(cfg.model)
    init = get_adapter_state(create_adapter(base, cfg.adapter, seed=0))
    zero = {k: torch.zeros_like(v) for k, v in init.items()}
    filled = fill_dead_components(zero, init)
    a_keys = [k for k in init if "lora_A" in k]
    assert all(torch.equal(filled[k], init[k]) for k in a_keys)
    for p, d in products(filled, 2.0).items():
        assert torch.count_nonzero(d) == 0  # B is still zero: the adapter still does nothing


def test_strategy_sends_each_rank_its_share_of_the_global_adapter():
    cfg = _cfg()
    base, _ = load_base_model(cfg.model)
    init = get_adapter_state(create_adapter(base, cfg.adapter, seed=0))
    for agg in ("flexlora", "zeropad"):
        s = FleetFedAvg(reference=init, coordinator=_coord(), rank_aggregation=agg, scale=2.0, min_clients=2, seed=0)
        assert lora_rank(s.send(4)) == 4 and lora_rank(s.send(8)) == 8
        assert set(s.global_adapter()) == set(init)


def test_flexlora_send_truncates_one_svd_exactly():
    """Sending rank r as the first r components of the rank-r_max SVD = the rank-r SVD itself."""
    from fedtune.aggregation import FlexLoRAState

    cfg = _cfg()
    base, _ = load_base_model(cfg.model)
    init = get_adapter_state(create_adapter(base, cfg.adapter, seed=0))
    gen = torch.Generator().manual_seed(0)
    trained = {k: torch.randn(v.shape, generator=gen) for k, v in init.items()}
    s = FleetFedAvg(reference=init, coordinator=_coord(), rank_aggregation="flexlora", scale=2.0, min_clients=2, seed=0)
    s.global_state = FlexLoRAState.from_adapter(trained, 2.0)
    for r in (2, 4):
        direct = s.global_state.to_adapter(r)
        for p, d in products(s.send(r), 2.0).items():
            assert torch.allclose(d, products(direct, 2.0)[p], atol=1e-5)
