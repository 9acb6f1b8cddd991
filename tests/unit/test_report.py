from fedtune.report import write_report
from fedtune.workspace import RunDir
from tests.conftest import make_config


def test_the_report_names_users_left_out_for_too_little_text(tmp_path):
    run = RunDir.create(tmp_path / "run")
    run.append_event({"event": "users_dropped", "users": ["ann", "007"], "seq_len": 64})
    text = write_report(run, make_config(), [], 1.0).read_text()
    assert "Users left out (2; their text gives no full chunk of 64 tokens): ann, 007." in text
