"""The benchmark's privacy settings: the user-level one at the DP-on setting's ε and δ, and the comparison."""

import pytest

from tests.conftest import make_config


def _setting(name, median, mean, **extra):
    row = {"method": "personalized", "median_change_vs_global": median, "mean_perplexity": mean}
    return {"setting": name, "methods": [row, {"method": "global", "median_change_vs_global": None,
                                               "mean_perplexity": 99.0}],
            "best_personalized": "personalized", **extra}


def test_setting_names_accept_the_old_flags_and_refuse_anything_else():
    from fedtune.personalization.settings import setting_name

    assert [setting_name(x) for x in (False, True, "off", "on", "user")] == ["off", "on", "off", "on", "user"]
    with pytest.raises(ValueError, match="expected one of off, on, user"):
        setting_name("maybe")


def test_the_user_setting_turns_device_dp_off_and_targets_the_device_budget_at_the_same_delta():
    from fedtune.personalization.settings import user_level_config

    cfg = make_config(privacy={"enabled": True, "target_epsilon": 6.0, "device_epsilon_budget": 8.0,
                               "delta": 1e-5, "user_level": {"delta": 0.5, "epsilon_budget": 3.0}})
    user = user_level_config(cfg).privacy
    assert user.enabled is False and user.user_level.enabled is True
    assert user.user_level.target_epsilon == 8.0 and user.user_level.delta == 1e-5
    assert user.user_level.epsilon_budget is None  # the target is the budget
    no_budget = make_config(privacy={"target_epsilon": 5.0})
    assert user_level_config(no_budget).privacy.user_level.target_epsilon == 5.0
    with pytest.raises(ValueError, match="set privacy.target_epsilon"):
        user_level_config(make_config(privacy={"target_epsilon": None, "device_epsilon_budget": None}))


def test_a_configuration_user_level_dp_cannot_plan_is_refused_in_its_own_words():
    from fedtune.personalization.settings import user_level_config, user_level_refusal

    cfg = user_level_config(make_config(privacy={"target_epsilon": 8.0}, federation={"clients_per_round": 5}))
    assert "cohort 5 exceeds the population 3" in user_level_refusal(cfg, 3)
    assert user_level_refusal(cfg, 50) is None


def test_the_comparison_follows_the_results_and_flips_with_them():
    from fedtune.personalization.settings import comparison, comparison_line

    on = _setting("on", -0.05, 30.0, max_epsilon=7.9)
    user = _setting("user", -0.01, 35.0, federation_epsilon=8.0)
    c = comparison([_setting("off", -0.2, 20.0), on, user])
    assert c["better_median_change"] == c["better_mean_perplexity"] == "per-device DP-SGD"
    line = comparison_line(c)
    assert "-5.0% vs -1.0%" in line and "30.00 vs 35.00" in line and "max device ε 7.90, user-level ε 8.00" in line
    flipped = comparison([_setting("on", -0.01, 36.0, max_epsilon=7.9), _setting("user", -0.04, 31.0)])
    assert flipped["better_median_change"] == flipped["better_mean_perplexity"] == "user-level DP-FedAvg"
    split = comparison([_setting("on", -0.01, 30.0), _setting("user", -0.04, 31.0)])
    assert (split["better_median_change"], split["better_mean_perplexity"]) == ("user-level DP-FedAvg",
                                                                                  "per-device DP-SGD")
    # only when both ran
    assert comparison([on]) is None and comparison_line(None) is None
    assert comparison([on, {"setting": "user", "dp": False, "refused": "cohort too large"}]) is None
