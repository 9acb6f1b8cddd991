from typer.testing import CliRunner

from fedtune.cli import app


def test_validate_reports_several_errors_and_exits_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  quantization: int3\nadapter:\n  rank: -2\ntrain:\n  batch_size: 0\n")
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    out = result.output
    assert "3 error" in out or "4 error" in out, out
    assert "model.quantization" in out and "adapter.rank" in out and "train.batch_size" in out
    assert "Traceback" not in out


def test_validate_ok_and_set(tmp_path):
    result = CliRunner().invoke(app, ["validate", "configs/smoke.yaml", "--set", "federation.rounds=4"])
    assert result.exit_code == 0, result.output
    assert "4 rounds" in result.output


