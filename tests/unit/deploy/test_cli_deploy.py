"""User errors of `fedtune server start` / `fedtune device join` are one line and exit code 2."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _cli(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "fedtune.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def _one_line_error(proc, *needles):
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    from fedtune.deploy.certs import make_ca_and_server, make_supernode_key

    root = tmp_path_factory.mktemp("certs")
    make_ca_and_server(root)
    make_supernode_key(root, "d0")
    return root


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def test_bad_config_is_one_line(tmp_path, certs):
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation: {rounds: 0, aggregation: median}\nprivacy: {user_level: {enabled: true}}\n")
    proc = _cli("server", "start", str(bad), "--out", str(tmp_path / "run"), "--certs", str(certs))
    _one_line_error(proc, "federation.rounds", "federation.aggregation: user-dp cannot be combined with robust")


def test_server_refuses_a_foreign_out_dir_and_bad_data_before_writing(tmp_path, certs):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep")
    proc = _cli("server", "start", "configs/deploy-smoke.yaml", "--out", str(mine), "--certs", str(certs))
    _one_line_error(proc, "not empty and is not a fedtune run")
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user_id": "a", "text": "x"}\n{"text": "no user"}\n')
    proc = _cli("server", "start", "configs/deploy-smoke.yaml", "--out", str(tmp_path / "run"), "--certs",
                str(certs), "--set", "data.source=files", "--set", f"data.path={bad}")
    _one_line_error(proc, "1 of 2 rows have no 'user_id'")
    assert not (tmp_path / "run").exists()


def test_server_without_certificates_is_one_line(tmp_path):
    proc = _cli("server", "start", "configs/deploy-smoke.yaml", "--out", str(tmp_path / "run"))
    _one_line_error(proc, "--certs", "fedtune certs ca")


def test_missing_data_file_is_one_line(tmp_path, certs):
    proc = _cli("device", "join", "--superlink", f"127.0.0.1:{_unused_port()}", "--data", str(tmp_path / "nope.jsonl"),
                "--root-certificates", str(certs / "ca.crt"))
    _one_line_error(proc, "--data: file not found")


def test_unreachable_superlink_is_one_line(tmp_path, certs):
    data = tmp_path / "me.jsonl"
    data.write_text('{"text": "hello"}\n')
    proc = _cli("device", "join", "--superlink", f"127.0.0.1:{_unused_port()}", "--data", str(data),
                "--root-certificates", str(certs / "ca.crt"), "--auth-key", str(certs / "supernodes" / "d0"),
                "--state-dir", str(tmp_path / "state"))
    _one_line_error(proc, "--superlink: cannot reach")


def test_unknown_profile_and_policy_are_named(tmp_path, certs):
    data = tmp_path / "me.csv"
    data.write_text("text\nhello\n")
    proc = _cli("device", "join", "--superlink", "127.0.0.1:1", "--data", str(data), "--profile", "toaster",
                "--eligibility", "charging+wifi", "--insecure")
    _one_line_error(proc, "--profile: unknown device profile 'toaster'", "(and 1 more)")


def test_certs_commands_make_what_server_and_device_need(tmp_path):
    assert _cli("certs", "ca", "--out", str(tmp_path), "--host", "fl.example.org").returncode == 0
    assert _cli("certs", "supernode", "phone-1", "phone-2", "--out", str(tmp_path)).returncode == 0
    for name in ("ca.crt", "server.crt", "server.key", "supernodes/phone-1", "supernodes/phone-2.pub"):
        assert (tmp_path / name).is_file()
