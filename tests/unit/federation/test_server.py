"""The server's setup both backends share: sampler, rule, user-level plan, fleet coordinator, limits, resume."""

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fedtune.federation.publishing import publish_due
from fedtune.federation.server import budget_event, build_server, cohort_size, totals
from tests.conftest import make_config

ROOT = Path(__file__).resolve().parents[3]
SHARED = {"m.lora_A.weight": torch.zeros(4, 8), "m.lora_B.weight": torch.zeros(8, 4)}
FLEET = {"enabled": True, "mixture": {"phone-low": 1.0}, "catalog": str(ROOT / "configs/devices"),
         "population": 20, "over_selection": 0.5, "rank_aggregation": "zeropad"}


def test_a_plain_simulation_samples_uniformly_and_bounds_examples_by_the_largest_partition():
    cfg = make_config()
    setup = build_server(cfg, SHARED, users=3, max_train=7, params=1000)
    assert setup.seeds.mode == "simulated" and setup.population == 3 and setup.sampler.kind == "uniform"
    assert setup.rule.name == "fedavg" and setup.user_dp is None and setup.rounds == cfg.federation.rounds
    assert setup.limits.max_examples == 7 and setup.offset == 0
    assert setup.pipeline(1).user_dp is None


def test_a_deployed_server_has_secret_seeds_and_its_devices_are_not_bounded_by_the_server_data():
    cfg = make_config()
    setup = build_server(cfg, SHARED, users=3, max_train=7, params=1000, deployed=5)
    assert setup.seeds.mode == "secret" and setup.population == 5
    assert setup.limits.max_examples == cfg.validation.max_examples


def test_user_level_dp_samples_poisson_restores_its_ledger_and_is_the_pipeline():
    from fedtune.privacy.user_level import UserLevelLedger

    cfg = make_config(privacy={"enabled": False, "user_level": {"enabled": True, "noise_multiplier": 1.0,
                                                                   "delta": 1e-5}})
    ledger = UserLevelLedger(accountant="rdp", delta=1e-5, history=[(1.0, 1.0, 2)])
    setup = build_server(cfg, SHARED, users=3, max_train=7, params=1000,
                         checkpoint={"round": 2, "user_ledger": ledger.to_dict()})
    assert setup.sampler.kind == "poisson" and setup.offset == 2
    assert setup.user_dp.ledger.history == [(1.0, 1.0, 2)]  # a resumed run keeps charging the same ledger
    wrapper = setup.pipeline(1).user_dp
    assert wrapper is not None and wrapper.sampler_kind == "poisson" and wrapper.dp is setup.user_dp


def test_a_budget_that_cuts_the_run_is_an_event():
    from fedtune.privacy.user_level import user_level_epsilon

    budget = (user_level_epsilon(2.0, 1.0, 1, 1e-5) + user_level_epsilon(2.0, 1.0, 2, 1e-5)) / 2
    cfg = make_config(privacy={"enabled": False, "user_level": {
        "enabled": True, "noise_multiplier": 2.0, "delta": 1e-5, "epsilon_budget": budget}},
        federation={"rounds": 4, "clients_per_round": 3, "min_clients": 1})
    setup = build_server(cfg, SHARED, users=3, max_train=7, params=1000)
    assert setup.rounds == 1
    assert budget_event(cfg, setup) == {"event": "budget", "rounds": 1, "epsilon": setup.plan.planned_epsilon,
                                        "budget": budget}
    assert budget_event(make_config(), build_server(make_config(), SHARED, users=3, max_train=7, params=1)) is None


def test_a_fleet_gets_its_coordinator_with_the_clock_of_the_checkpoint():
    cfg = make_config(fleet=FLEET)
    setup = build_server(cfg, SHARED, users=3, max_train=7, params=10**6,
                         checkpoint={"round": 3, "clock": {"seconds": 120.0}})
    assert setup.coord is not None and setup.population == 20 and setup.sampler.kind == "availability"
    assert setup.coord.clock.seconds == 120.0 and setup.rule.name == "zeropad"
    assert cohort_size(cfg, setup.population) == 5  # 3 per round, +50% over-selection
    assert cohort_size(make_config(), 2) == 2


def test_robust_aggregation_is_the_rule():
    cfg = make_config(federation={"rounds": 1, "clients_per_round": 3, "min_clients": 3,
                                  "aggregation": "trimmed_mean", "trim_fraction": 0.4})
    assert build_server(cfg, SHARED, users=3, max_train=7, params=1).rule.name == "trimmed_mean"


def test_totals_add_a_resumed_run_to_the_rounds_since():
    rounds = [SimpleNamespace(failed=1, rejected=Counter(norm_bound=2), declined=Counter()),
              SimpleNamespace(failed=0, rejected=Counter(norm_bound=1, malformed=1), declined=Counter(busy=1))]
    prior = {"failed": 3, "rejected": {"malformed": 1}, "declined": {}}
    assert totals(rounds, prior) == {"failed": 4, "rejected": {"norm_bound": 3, "malformed": 2},
                                     "declined": {"busy": 1}}


@pytest.mark.parametrize("at_end,every,round_,due", [(True, None, 4, True), (True, None, 3, False),
                                                     (False, 2, 2, True), (False, 2, 3, False),
                                                     (False, 2, 0, False)])
def test_publishing_is_due_at_the_end_or_every_n_rounds(at_end, every, round_, due):
    pub = SimpleNamespace(registry="/r", at_end=at_end, every_n_rounds=every)
    assert publish_due(pub, round_, 4) is due
    assert publish_due(SimpleNamespace(registry=None, at_end=True, every_n_rounds=None), 4, 4) is False
