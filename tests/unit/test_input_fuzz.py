"""Fuzz: malformed configs and data files never crash the CLI. Each either passes or is refused with exit 2,
lines that start with ``error:`` (a config may list several problems, one per line), no traceback, and
nothing written. Bounded (a few dozen examples) so the default suite stays fast."""

import json
import string
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fedtune.cli import app

FAST = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

SECTIONS = ["model", "adapter", "data", "train", "privacy", "federation", "fleet", "name", "seed", "bogus"]
KEYS = ["source", "rank", "seq_len", "path", "rounds", "min_clients", "clients_per_round", "enabled", "name",
        "quantization", "tiny", "noise_multiplier", "x"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["../../x", "/", "files", "tiny", "nf4", "-1", "1e9"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)),
                      max_leaves=8)
configs = st.one_of(
    st.dictionaries(st.sampled_from(SECTIONS), values, max_size=5).map(lambda d: yaml.safe_dump(d).encode()),
    st.binary(max_size=80),
    st.text(alphabet=string.printable, max_size=80).map(str.encode),
)
overrides = st.lists(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(
    ["name", "data.seq_len", "federation.rounds", "model", "model.tiny.vocab_size", "train.lr", "data.path"]),
    st.text(alphabet=string.printable.replace("\n", ""), max_size=10)), max_size=2)


def _assert_clean(result, allow_ok: bool) -> None:
    assert "Traceback" not in result.output, result.output
    if result.exit_code == 0 and allow_ok:
        return
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    first = next(i for i, ln in enumerate(lines) if ln.startswith("error:"))
    assert all(ln.startswith("  - ") for ln in lines[first + 1:]), result.output


@FAST
@given(body=configs, sets=overrides)
def test_malformed_configs_are_refused_in_one_place(body, sets):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_bytes(body)
        args = ["validate", str(path)]
        for s in sets:
            args += ["--set", s]
        _assert_clean(CliRunner().invoke(app, args), allow_ok=True)
        assert sorted(p.name for p in Path(tmp).iterdir()) == ["c.yaml"]


cell = st.one_of(st.none(), st.integers(), st.floats(allow_nan=True), st.text(max_size=40), st.booleans(),
                 st.lists(st.integers(), max_size=2))
rows = st.lists(st.dictionaries(st.sampled_from(["user_id", "text", "other"]), cell, max_size=3), max_size=6)
data_files = st.one_of(
    st.tuples(st.sampled_from([".jsonl", ".csv", ".parquet", ".txt", ""]), st.binary(max_size=120)),
    st.tuples(st.just(".jsonl"), rows.map(lambda rs: "".join(json.dumps(r) + "\n" for r in rs).encode())),
    st.tuples(st.just(".csv"), rows.map(lambda rs: ("user_id,text\n" + "".join(
        f"{r.get('user_id', '')},{r.get('text', '')}\n" for r in rs)).encode())),
)


@FAST
@given(data=data_files)
def test_malformed_data_files_are_refused_before_anything_is_written(data):
    suffix, content = data
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(content)
        out = Path(tmp) / "run"
        # min_clients far above any population these files can hold: even a well-formed file stops before
        # training, so every example ends at the checks and nothing may be written
        result = CliRunner().invoke(app, [
            "simulate", "configs/smoke.yaml", "--out", str(out), "--set", "data.source=files", "--set",
            f"data.path={path}", "--set", "federation.clients_per_round=50", "--set", "federation.min_clients=50"])
        _assert_clean(result, allow_ok=False)
        assert not out.exists()
