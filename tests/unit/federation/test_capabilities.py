"""The composition table: generated docs match the code, every refused pair is refused by validate naming
its field, and the fleet + user-level + zero-pad case that once ran without user-level DP is refused."""

from itertools import combinations
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedtune.config import ConfigError, config_from_dict
from fedtune.federation import capabilities as cap

ROOT = Path(__file__).resolve().parents[3]

# the smallest config that turns each feature on (deployment is not a config setting: see test below)
ON = {
    "sample-dp": {"privacy": {"enabled": True}},
    "user-dp": {"privacy": {"user_level": {"enabled": True}}},
    "fleet-zeropad": {"fleet": {"enabled": True, "mixture": {"phone-low": 1.0}, "rank_aggregation": "zeropad",
                                "catalog": str(ROOT / "configs/devices")}},
    "fleet-flexlora": {"fleet": {"enabled": True, "mixture": {"phone-low": 1.0}, "rank_aggregation": "flexlora",
                                 "catalog": str(ROOT / "configs/devices")}},
    "fedsa-split": {"personalization": {"split": "fedsa"}},
    "ffa-lora": {"adapter": {"method": "ffa_lora"}},
    "prompt-tuning": {"adapter": {"method": "prompt_tuning"}},
    "packed": {"simulation": {"packed_group_size": 2}},
    "int8-upload": {"federation": {"upload": "int8"}},
    "fp16-upload": {"federation": {"upload": "fp16"}},
    "robust": {"federation": {"aggregation": "median"}},
}
BASE = {"model": {"source": "tiny"}, "privacy": {"enabled": False}, "federation": {"upload": "fp32"}}


def config_with(*features):
    raw = {k: dict(v) for k, v in BASE.items()}
    for f in features:
        for section, values in ON[f].items():
            raw.setdefault(section, {}).update(values)
    return raw


def test_docs_are_generated_from_the_table():
    assert (ROOT / "docs/composition.md").read_text() == cap.render_markdown(), \
        "regenerate: python -m fedtune.federation.capabilities > docs/composition.md"


def test_every_pair_is_classified_and_every_feature_can_be_turned_on():
    assert set(ON) | {"deployment"} == set(cap.NAMES)
    for a, b in combinations(cap.NAMES, 2):
        assert cap.status(a, b) in ("runs", "conditional", "refused", "exclusive")
    for name in ON:  # each feature alone is valid and detected
        assert cap.active_features(config_from_dict(config_with(name))) == [name]


@pytest.mark.parametrize("pair", cap.refused_pairs(), ids="×".join)
def test_refused_pairs_are_refused_by_validate_naming_the_field(pair):
    refusal = cap.REFUSED[frozenset(pair)]
    if "deployment" in pair:
        other = next(p for p in pair if p != "deployment")
        messages = cap.refusals(config_from_dict(config_with(other)), deployment=True)
        assert any(m.startswith(refusal.field + ":") for m in messages)
        return
    with pytest.raises(ConfigError) as exc:
        config_from_dict(config_with(*pair))
    assert any(p.startswith(refusal.field + ":") and refusal.fix in p for p in exc.value.problems), exc.value.problems


@pytest.mark.parametrize("pair", [p for p in cap.allowed_pairs() if "deployment" not in p], ids="×".join)
def test_allowed_pairs_pass_validate(pair):
    cfg = config_from_dict(config_with(*pair))
    assert set(pair) <= set(cap.active_features(cfg))


@pytest.mark.parametrize("fleet", ["fleet-zeropad", "fleet-flexlora"])
def test_robust_fleet_runs_on_same_rank_tiers_and_is_refused_otherwise(fleet):
    raw = config_with("robust", fleet)
    raw["fleet"]["mixture"] = {"phone-low": 0.5, "laptop-8gb": 0.5}  # lora_rank 4 and 8
    raw["adapter"] = {"rank": 8, "alpha": 16}
    with pytest.raises(ConfigError) as exc:
        config_from_dict(raw)
    assert any(p.startswith("federation.aggregation:") and "same LoRA rank" in p for p in exc.value.problems)
    raw["adapter"] = {"rank": 4, "alpha": 8}  # both tiers train rank 4
    assert {"robust", fleet} <= set(cap.active_features(config_from_dict(raw)))


def test_fleet_user_level_zeropad_is_refused_by_validate_regression():
    """main@ac4911b: this passed validate, ran FleetFedAvg without user-level DP and labelled it user-level."""
    from fedtune.cli import app

    result = CliRunner().invoke(app, [
        "validate", str(ROOT / "configs/fleet-smoke.yaml"), "--set", "privacy.user_level.enabled=true",
        "--set", "privacy.user_level.target_epsilon=8", "--set", "fleet.rank_aggregation=zeropad"])
    assert result.exit_code == 2, result.output
    assert "privacy.user_level.enabled" in result.output and "Poisson" in result.output


def test_the_fleet_sampler_is_never_labelled_poisson():
    from fedtune.federation.sampler import create_sampler
    from fedtune.federation.seeds import Seeds

    cfg = config_from_dict(config_with("fleet-zeropad"))
    s = create_sampler(cfg, Seeds.simulated(0), 10, is_available=lambda d: True)
    assert s.kind == "availability"
    user = config_from_dict(config_with("user-dp"))
    assert create_sampler(user, Seeds.simulated(0), 10).kind == "poisson"
