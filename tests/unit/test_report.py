"""The run report: the privacy label and randomness the last record carries (what ran, not the config), the
users left out."""

from fedtune.config import config_from_dict
from fedtune.report import write_report
from fedtune.workspace import RunDir
from tests.conftest import make_config

RECORD = {"round": 1, "eval_perplexity": 3.0, "epsilon": 1.25, "delta": 1e-5, "privacy_level": "user",
          "randomness": "secret"}


def test_report_states_the_label_and_randomness_of_the_last_record(tmp_path):
    cfg = config_from_dict({})  # plans no DP at all: the report must not follow the config
    run = RunDir.create(tmp_path / "run")
    text = write_report(run, cfg, [dict(RECORD, round=0, epsilon=0.0), RECORD], 1.0).read_text()
    assert "- privacy: user-level, ε=1.25, δ=1e-05; randomness: secret" in text


def test_report_without_dp_says_none_and_simulated(tmp_path):
    run = RunDir.create(tmp_path / "run")
    rec = dict(RECORD, epsilon=None, delta=None, privacy_level="none", randomness="simulated")
    text = write_report(run, config_from_dict({}), [rec], 1.0).read_text()
    assert "- privacy: none; randomness: simulated" in text


def test_the_report_names_users_left_out_for_too_little_text(tmp_path):
    run = RunDir.create(tmp_path / "run")
    run.append_event({"event": "users_dropped", "users": ["ann", "007"], "seq_len": 64})
    text = write_report(run, make_config(), [], 1.0).read_text()
    assert "Users left out (2; their text gives no full chunk of 64 tokens): ann, 007." in text
