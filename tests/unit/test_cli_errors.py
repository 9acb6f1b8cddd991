"""The CLI's top-level handler: user errors are one line and exit 2; bugs are one line, a hint and exit 1;
no traceback (and so no local variable) is ever printed."""

import pytest
import typer
from typer.testing import CliRunner

from fedtune.cli import app
from fedtune.cli_errors import new_app, user_message
from fedtune.config import ConfigError
from fedtune.errors import UserError

SMOKE = "configs/smoke.yaml"


def _run(args):
    return CliRunner().invoke(app, args)


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def _toy_app(exc):
    toy = new_app()

    @toy.command()
    def boom(secret: str = "hunter2-private-key-bytes"):
        raise exc

    @toy.command()
    def other():
        pass

    return toy


def test_user_error_is_one_line_and_exit_2():
    result = CliRunner().invoke(_toy_app(UserError("data.path x.csv: bad\nthing; fix it")), ["boom"])
    assert _one_error_line(result) == "error: data.path x.csv: bad thing; fix it"


def test_an_internal_error_is_short_shows_no_locals_and_exits_1(monkeypatch):
    monkeypatch.delenv("FEDTUNE_DEBUG", raising=False)
    result = CliRunner().invoke(_toy_app(ZeroDivisionError("division by zero")), ["boom"])
    assert result.exit_code == 1
    assert "internal error: ZeroDivisionError: division by zero" in result.output
    assert "FEDTUNE_DEBUG=1" in result.output
    assert "Traceback" not in result.output and "hunter2" not in result.output


def test_debug_traceback_has_no_locals(monkeypatch):
    monkeypatch.setenv("FEDTUNE_DEBUG", "1")
    result = CliRunner().invoke(_toy_app(RuntimeError("bug")), ["boom"])
    assert result.exit_code == 1 and "Traceback" in result.output and "hunter2" not in result.output


def test_every_app_hides_locals():
    from fedtune.cli import app as root
    from fedtune.cli_deploy import certs_app, server_app

    for a in (root, certs_app, server_app):
        assert a.pretty_exceptions_show_locals is False


@pytest.mark.parametrize("err,expected", [
    (ConfigError(["data.path: file not found: x"], "c.yaml"), "c.yaml: data.path: file not found: x"),
    (IsADirectoryError(21, "Is a directory", "/tmp/k"), "/tmp/k: is a directory; give a file path"),
    (FileNotFoundError(2, "No such file", "/nope"), "/nope: no such file or directory; check the path"),
])
def test_os_and_config_errors_name_the_path(err, expected):
    assert user_message(err) == expected
    assert user_message(KeyError("x")) is None


def test_exit_and_usage_errors_pass_through():
    toy = _toy_app(typer.Exit(3))
    assert CliRunner().invoke(toy, ["boom"]).exit_code == 3
    assert CliRunner().invoke(toy, ["boom", "--nope"]).exit_code == 2


@pytest.mark.parametrize("value", ["[unclosed", "{", "a: b: c", "'open"])
def test_bad_set_yaml_is_one_line(value):
    line = _one_error_line(_run(["validate", SMOKE, "--set", f"name={value}"]))
    assert "--set" in line and "not valid YAML" in line


def test_non_utf8_and_non_mapping_configs(tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    assert "not UTF-8 text (byte 0xe9" in _one_error_line(_run(["validate", str(latin)]))
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    assert "expected a mapping" in _one_error_line(_run(["validate", str(listy), "--set", "name=x"]))
    assert "is a directory" in _one_error_line(_run(["validate", str(tmp_path)]))


def test_run_name_cannot_escape_runs():
    assert "name: '../../x' is not a plain run name" in _one_error_line(_run(["validate", SMOKE, "--set",
                                                                              "name=../../x"]))


def test_evaluate_refuses_an_unknown_method_and_a_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: x\n")
    assert "--method: unknown method(s) ['bogus']" in _one_error_line(_run(["evaluate", str(run), "-m", "bogus"]))
    f = tmp_path / "f.txt"
    f.write_text("x")
    assert "is a file" in _one_error_line(_run(["evaluate", str(f)]))


def test_keygen_into_a_directory_prints_no_key_bytes(tmp_path):
    """The issue's case: keygen --force with a directory in the way printed the private key from locals."""
    target = tmp_path / "k"
    target.mkdir()
    (target / "x").write_text("x")
    result = _run(["registry", "keygen", "--out", str(target), "--force"])
    line = _one_error_line(result)
    assert str(target) in line and "Traceback" not in result.output
