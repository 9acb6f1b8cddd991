import pytest

from fedtune.config import ConfigError, apply_overrides, config_from_dict, load_config


def test_defaults_validate():
    cfg = config_from_dict({})
    assert cfg.model.source == "tiny" and cfg.adapter.method == "lora"


def test_reports_every_error_at_once_naming_fields():
    raw = {
        "model": {"quantization": "int3"},
        "adapter": {"rank": 0},
        "train": {"lr": -1},
        "federation": {"clients_per_round": 2, "min_clients": 5},
        "privacy": {"enabled": True, "delta": 2.0},
        "dataa": {},
    }
    with pytest.raises(ConfigError) as exc:
        config_from_dict(raw)
    text = "\n".join(exc.value.problems)
    assert len(exc.value.problems) >= 6, text
    for field in ("model.quantization", "adapter.rank", "train.lr", "dataa", "federation.min_clients",
                  "privacy.delta"):
        assert field in text, f"{field} not reported:\n{text}"
    assert "int3" in text  # says what came


def test_a_target_epsilon_survives_the_resolved_config_round_trip(tmp_path):
    """The run's resolved config.yaml carries every field; a target must still load from it."""
    from fedtune.config import dump_config, with_absolute_paths

    cfg = config_from_dict({"privacy": {"enabled": True, "target_epsilon": 3.0,
                                        "user_level": {"enabled": True, "target_epsilon": 8.0}}})
    assert cfg.privacy.noise_multiplier == 1.0  # the default, unused while a target is set
    dump_config(with_absolute_paths(cfg), tmp_path / "c.yaml")
    back = load_config(tmp_path / "c.yaml")
    assert back.privacy.target_epsilon == 3.0 and back.privacy.user_level.target_epsilon == 8.0

def test_overrides_are_typed_and_nested(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("federation:\n  rounds: 2\nprivacy:\n  enabled: false\n")
    cfg = load_config(path, ["federation.rounds=7", "adapter.target_modules=[q_proj]", "train.lr=1e-3"])
    assert cfg.federation.rounds == 7
    assert cfg.adapter.target_modules == ["q_proj"]
    assert cfg.train.lr == pytest.approx(1e-3)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["federation.rounds"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_files_source_needs_existing_path(tmp_path):
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"data": {"source": "files", "path": str(tmp_path / "missing.jsonl")},
                          "privacy": {"enabled": False}})
    assert "data.path" in str(exc.value) and "not found" in str(exc.value)


def test_shipped_configs_validate():
    for name in ("configs/smoke.yaml", "configs/default.yaml"):
        load_config(name)


def test_robust_aggregation_and_validation_settings():
    from tests.conftest import make_config

    cfg = make_config(federation={"aggregation": "trimmed_mean", "trim_fraction": 0.25, "min_clients": 4,
                                  "clients_per_round": 4}, validation={"max_update_norm": 5.0})
    assert cfg.federation.aggregation == "trimmed_mean" and cfg.validation.max_update_norm == 5.0


@pytest.mark.parametrize("sections,field", [
    ({"federation": {"aggregation": "median"}, "privacy": {"user_level": {"enabled": True}}},
     "federation.aggregation: user-dp cannot be combined with robust"),
    ({"federation": {"aggregation": "trimmed_mean", "trim_fraction": 0.1, "min_clients": 2}},
     "federation.trim_fraction: 0.1 of min_clients=2 trims nothing"),
    ({"federation": {"aggregation": "krum"}}, "federation.aggregation"),
    ({"validation": {"max_update_norm": -1}}, "validation.max_update_norm"),
])
def test_nonsensical_aggregation_combos_are_refused(sections, field):
    from tests.conftest import make_config

    with pytest.raises(ConfigError) as exc:
        make_config(**sections)
    assert field in str(exc.value)
def test_packed_training_needs_plain_lora_without_dropout():
    config_from_dict({"simulation": {"packed_group_size": 8}})
    with pytest.raises(ConfigError, match="simulation.packed_group_size"):
        config_from_dict({"simulation": {"packed_group_size": 8}, "adapter": {"method": "prompt_tuning"}})
    config_from_dict({"simulation": {"packed_group_size": 8}, "personalization": {"split": "fedsa"}})  # composes
    with pytest.raises(ConfigError, match="simulation.packed_group_size"):
        config_from_dict({"simulation": {"packed_group_size": 8}, "adapter": {"dropout": 0.1}})
def test_memory_and_upload_options_are_checked_and_named():
    cfg = config_from_dict({})
    assert cfg.federation.upload == "fp16" and cfg.train.loss_chunk_tokens == 1024
    assert cfg.train.gradient_checkpointing is False
    with pytest.raises(ConfigError) as err:
        config_from_dict({"federation": {"upload": "int4"}, "train": {"loss_chunk_tokens": 0}})
    text = str(err.value)
    assert "federation.upload" in text and "train.loss_chunk_tokens" in text


def test_physical_batch_size_is_typed_and_a_micro_batch_above_the_logical_batch_is_explained():
    assert config_from_dict({"train": {"batch_size": 64, "physical_batch_size": 8}}).train.physical_batch_size == 8
    with pytest.raises(ConfigError, match="train.physical_batch_size"):
        config_from_dict({"train": {"physical_batch_size": 0}})
    with pytest.raises(ConfigError) as err:
        config_from_dict({"train": {"batch_size": 8, "physical_batch_size": 64}})
    assert "logical batch train.batch_size (8)" in str(err.value) and "batch_size: 64" in str(err.value)


def test_ghost_clipping_is_a_lora_one_device_option():
    assert config_from_dict({}).privacy.clipping == "auto"  # ghost for plain LoRA on CUDA, hooks elsewhere
    assert config_from_dict({"privacy": {"clipping": "ghost"}}).privacy.clipping == "ghost"
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"privacy": {"clipping": "ghosts"}})
    assert any(p.startswith("privacy.clipping") and "'hooks' or 'ghost'" in p for p in exc.value.problems)
    for other in ({"adapter": {"method": "prompt_tuning"}}, {"simulation": {"packed_group_size": 4}}):
        with pytest.raises(ConfigError) as exc:
            config_from_dict({"privacy": {"clipping": "ghost"}, **other})
        assert [p for p in exc.value.problems if p.startswith("privacy.clipping:") and "clipping=hooks" in p]
    config_from_dict({"privacy": {"clipping": "ghost"}, "adapter": {"method": "ffa_lora", "dropout": 0.1}})
