"""`fedtune simulate` refuses bad data and unsafe run directories with one line, before writing anything."""

import json

import pytest
from typer.testing import CliRunner

from fedtune.cli import app

SMOKE = "configs/smoke.yaml"


def _simulate(*args):
    return CliRunner().invoke(app, ["simulate", SMOKE, *args])


def _error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.mark.parametrize("name,content,match", [
    ("empty.jsonl", b"", "no rows"),
    ("bad.jsonl", b'{"user_id": "a", "text": "x"}\n{oops\n', "line 2 is not valid JSON"),
    ("nocol.jsonl", b'{"uid": "a", "text": "x"}\n', "missing column(s) ['user_id']"),
    ("nouser.jsonl", b'{"user_id": "a", "text": "x"}\n{"text": "y"}\n', "1 of 2 rows have no 'user_id'"),
    ("empty.csv", b"", "the file is empty"),
    ("latin.csv", "user_id,text\na,caf\u00e9\n".encode("latin-1"), "not UTF-8"),
    ("notes.txt", b"hello", "unsupported file type '.txt'"),
])
def test_bad_data_files(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_bytes(content)
    out = tmp_path / "run"
    line = _error(_simulate("--set", "data.source=files", "--set", f"data.path={path}", "--out", str(out)))
    assert match in line and str(path) in line
    assert not out.exists()


def test_data_path_that_is_a_directory(tmp_path):
    out = tmp_path / "run"
    assert "is a directory" in _error(_simulate("--set", "data.source=files", "--set", f"data.path={tmp_path}",
                                                "--out", str(out)))
    assert not out.exists()


def test_huge_seq_len(tmp_path):
    assert "data.seq_len: 100000 is longer than the model's context" in _error(
        _simulate("--set", "data.seq_len=100000", "--out", str(tmp_path / "run")))


def test_min_clients_above_the_population_is_refused_before_training(tmp_path):
    out = tmp_path / "run"
    line = _error(_simulate("--set", "data.synthetic_users=2", "--set", "federation.min_clients=3",
                            "--out", str(out)))
    assert "federation.min_clients: 3 is more than the 2 devices" in line
    assert not out.exists()


def test_out_refuses_a_non_empty_directory_and_overwrites_nothing(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").write_text("precious")
    (out / "notes.md").write_text("keep me")
    line = _error(_simulate("--out", str(out)))
    assert "never checkpointed" in line
    assert (out / "config.yaml").read_text() == "precious"
    (out / "config.yaml").unlink()
    assert "not empty and is not a fedtune run" in _error(_simulate("--out", str(out)))
    assert sorted(p.name for p in out.iterdir()) == ["notes.md"]
    f = tmp_path / "file"
    f.write_text("x")
    assert "is a file" in _error(_simulate("--out", str(f)))


def test_a_checkpointed_run_needs_resume(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.json").write_text(json.dumps({"round": 1}))
    assert "pass --resume" in _error(_simulate("--out", str(out)))
    assert "--resume needs --out" in _error(_simulate("--resume"))


def test_dropped_users_are_reported_and_recorded(tmp_path, monkeypatch):
    """A user without a full chunk is named in the console and in the run's events (the run itself is
    stopped right after the data step by a stub launcher: the simulation is tested elsewhere)."""
    import fedtune.flower.simulation as simulation

    class Stop(Exception):
        pass

    def stub(*a, **k):
        raise Stop

    monkeypatch.setattr(simulation, "run_simulation", stub)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"user_id": u, "text": t}) + "\n" for u, t in
                            [("a", "alpha " * 100), ("b", "bravo " * 100), ("tiny", "hi")]))
    out = tmp_path / "run"
    result = _simulate("--set", "data.source=files", "--set", f"data.path={data}", "--out", str(out))
    assert result.exit_code == 1 and "internal error: Stop" in result.output  # the stub stopped it
    assert "1 user(s) left out" in result.output and "(tiny)" in result.output
    events = [json.loads(ln) for ln in (out / "events.jsonl").read_text().splitlines()]
    assert {"event": "users_dropped", "users": ["tiny"]}.items() <= events[0].items()


@pytest.mark.parametrize("args, match", [
    (["--backend", "dask"], "--backend: expected flower or inprocess"),
    (["--backend", "inprocess", "--resume"], "--resume is for the Flower backend"),
    (["--backend", "inprocess", "--ray-address", "auto"], "--ray-address is for the Flower backend"),
])
def test_backend_choice_is_checked_before_anything_is_written(tmp_path, args, match):
    out = tmp_path / "run"
    res = _simulate("--out", str(out), *args)
    assert res.exit_code == 2 and match in res.output and not out.exists()
