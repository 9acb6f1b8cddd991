"""`fedtune serve` refuses bad input with one line and exit code 2, before loading anything."""

import pytest
from typer.testing import CliRunner

from fedtune.cli import app


@pytest.mark.parametrize("args, expected", [
    (["--base", "missing.yaml"], "no such file"),
    (["--base", "configs/smoke.yaml", "--registry", "http://127.0.0.1:9"], "needs --public-key"),
    (["--base", "configs/smoke.yaml", "--channel", "stable"], "--channel needs --registry"),
    (["--base", "configs/smoke.yaml", "--quantization", "fp8"], "expected none, int8 or nf4"),
    (["--base", "configs/smoke.yaml", "--policy", "random"], "expected mixed or single"),
])
def test_bad_input_exits_2_with_one_line(args, expected):
    result = CliRunner().invoke(app, ["serve", *args])
    assert result.exit_code == 2 and expected in " ".join(result.output.split())
