"""The CLI over the registry, the device and the exports (mounted here as fedtune/cli.py mounts them)."""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import typer
from typer.testing import CliRunner

from fedtune.cli_registry import device_app, export_app, registry_app

app = typer.Typer()
app.add_typer(registry_app, name="registry")
app.add_typer(device_app, name="device")
app.add_typer(export_app, name="export")


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def test_registry_and_device_commands(tmp_path, runs, live, registry):
    run_a, run_b = runs
    key, pub, reg = tmp_path / "k" / "signing.key", tmp_path / "k" / "signing.pub", registry.root
    assert cli("registry", "keygen", "--out", key).exit_code == 0 and pub.is_file()
    r = cli("registry", "keygen", "--out", key)
    assert r.exit_code == 2 and "refusing to overwrite" in r.output

    r = cli("registry", "publish", run_a, "--registry", reg, "--key", key, "--round", "1")
    assert r.exit_code == 0 and "published v1" in r.output and "ε=2.5" in r.output, r.output
    r = cli("registry", "publish", run_b / "adapters" / "round-1", "--registry", reg, "--key", key)
    assert r.exit_code == 0 and "published v2" in r.output, r.output
    assert "v1 for every device" in cli("registry", "promote", "1", "--registry", reg, "--key", key).output
    r = cli("registry", "promote", "2", "--registry", reg, "--rollout", "10%", "--key", key)
    assert "v2 to 10% of devices, the rest stay on v1" in r.output
    r = cli("registry", "list", "--registry", reg, "--events")
    assert r.exit_code == 0 and "stable 10%" in r.output and "tiny-run/1" in r.output and "promote" in r.output

    state = tmp_path / "device"
    pull = ["device", "pull", "--server", live.url, "--base-model", "tiny-llama", "--public-key", pub,
            "--state", state, "--device-id", "cli-device"]
    r = cli(*pull)
    assert r.exit_code == 0 and "updated to v" in r.output, r.output
    assert "304 Not Modified" in cli(*pull).output
    r = cli("device", "status", "--state", state, "--public-key", pub)
    assert r.exit_code == 0 and "verified (signature + 4 files)" in r.output and "cli-device" in r.output
    r = cli("device", "rollback", "--state", state, "--public-key", pub)
    assert r.exit_code == 2 and "nothing to roll back" in r.output

    assert "now v1 for every device" in cli("registry", "rollback", "--registry", reg, "--key", key).output
    r = cli("registry", "promote", "9", "--registry", reg, "--key", key)
    assert r.exit_code == 2 and "no version 9" in r.output
    r = cli("registry", "promote", "2", "--registry", reg, "--rollout", "150%", "--key", key)
    assert r.exit_code == 2 and "percentage in (0, 100]" in r.output
    r = cli("registry", "promote", "1", "--registry", tmp_path / "nowhere", "--key", key)
    assert r.exit_code == 2 and "not a registry" in r.output and not (tmp_path / "nowhere").exists()
    assert cli("registry", "verify", "--registry", reg).exit_code == 0
    r = cli(*pull[:3], "http://127.0.0.1:9", *pull[4:])
    assert r.exit_code == 1 and "cannot reach" in r.output


def test_export_commands(tmp_path, runs):
    adapter = runs[0] / "adapters" / "round-1"
    r = cli("export", "peft", adapter, "--out", tmp_path / "peft")
    assert r.exit_code == 0 and (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    r = cli("export", "gguf-lora", adapter, "--out", tmp_path / "a.gguf")
    assert r.exit_code == 0 and (tmp_path / "a.gguf").is_file(), r.output
    r = cli("export", "merged", tmp_path / "nowhere", "--out", tmp_path / "m")
    assert r.exit_code == 2 and "no adapter_config.json" in r.output


def test_serve_command_in_a_subprocess(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from fedtune.registry import Registry

    Registry(tmp_path / "reg")
    code = "import sys; from fedtune.cli_registry import registry_app; sys.argv[0] = 'fedtune'; registry_app()"
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--registry", str(tmp_path / "reg"),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
                time.sleep(0.2)
        assert r.json() == {"status": "ok", "versions": 0}
    finally:
        proc.send_signal(signal.SIGINT)  # our own child, by its PID
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_keygen_force_writes_0600_and_never_prints_the_key(tmp_path):
    key, pub = tmp_path / "k" / "signing.key", tmp_path / "k" / "signing.pub"
    key.parent.mkdir()
    key.write_text("old key")
    key.chmod(0o644)  # an old file with loose permissions must not lend them to the new key
    r = cli("registry", "keygen", "--out", key, "--force")
    assert r.exit_code == 0 and "mode 600" in r.output, r.output
    assert key.stat().st_mode & 0o777 == 0o600 and pub.is_file()
    body = "".join(key.read_text().splitlines()[1:-1])
    assert "PRIVATE" not in r.output and not any(body[i:i + 8] in r.output for i in range(len(body) - 8))
    assert not [p for p in key.parent.iterdir() if p.name.endswith(".tmp")]


def test_keygen_refuses_a_directory_in_the_way(tmp_path):
    (tmp_path / "k").mkdir()
    r = cli("registry", "keygen", "--out", tmp_path / "k", "--force")
    assert r.exit_code == 2 and "is a directory" in r.output and len(r.output.strip().splitlines()) == 1
    assert list((tmp_path / "k").iterdir()) == [] and not (tmp_path / "k.pub").exists()  # nothing written
    (tmp_path / "x.pub").mkdir()
    r = cli("registry", "keygen", "--out", tmp_path / "x.key", "--force")
    assert r.exit_code == 2 and "x.pub is a directory" in r.output and not (tmp_path / "x.key").exists()


def test_registry_verify_finds_corruption(tmp_path, registry, keys, runs):
    import sqlite3

    from fedtune.registry import publish_run

    key, _ = keys
    v1 = publish_run(runs[0], registry, key, round=1).manifest
    registry.promote(1, keys=key)
    r = cli("registry", "verify", "--registry", registry.root)
    assert r.exit_code == 0 and "ok: 1 roots, 1 manifests, 1 channels" in r.output, r.output
    blob = registry.store.local_path(v1.file("adapter_model.safetensors").sha256)
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes()[:-1] + b"\x01")
    env = registry.row(1).envelope.replace(b'"round":1', b'"round":2')
    with sqlite3.connect(registry.db.path) as con:
        con.execute("UPDATE artifacts SET envelope = ? WHERE version = 1", (env,))
    r = cli("registry", "verify", "--registry", registry.root)
    assert r.exit_code == 1 and "storage corrupted" in r.output and "signature does not match" in r.output, r.output
    assert "names manifest v1 with a hash" in r.output


def test_device_commands_refuse_a_state_dir_that_does_not_exist(tmp_path):
    from fedtune.registry.signing import generate_keypair

    generate_keypair(tmp_path / "k.key")
    for cmd in ("status", "rollback"):
        r = cli("device", cmd, "--state", tmp_path / "nowhere", "--public-key", tmp_path / "k.pub")
        assert r.exit_code == 2 and "not a device state directory" in r.output
    assert not (tmp_path / "nowhere").exists()
    r = cli("device", "status", "--state", tmp_path, "--public-key", tmp_path / "missing.pub")
    assert r.exit_code == 2 and "no such file" in r.output


def test_publish_of_a_directory_that_is_not_a_run_writes_nothing(tmp_path):
    key = tmp_path / "signing.key"
    assert cli("registry", "keygen", "--out", key).exit_code == 0
    (tmp_path / "not-a-run").mkdir()
    reg = tmp_path / "reg"
    r = cli("registry", "publish", tmp_path / "not-a-run", "--registry", reg, "--key", key)
    assert r.exit_code == 2 and "no adapters/round-N/fedtune.json" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not reg.exists()  # no empty registry left behind


def test_timestamp_only_refresh_and_verify_of_the_timestamp_and_snapshot(tmp_path, registry, keys, runs):
    import sqlite3

    from fedtune.registry import publish_run
    from fedtune.registry.metadata import TIMESTAMP_ROLE

    key, _ = keys
    publish_run(runs[0], registry, key, round=1)
    registry.promote(1, keys=key)  # snapshot v1, timestamp v1
    r = cli("registry", "refresh", "--timestamp-only", "--registry", registry.root, "--key",
            tmp_path / "keys" / "signing.key")
    assert r.exit_code == 0 and "timestamp v2 (snapshot v1)" in r.output, r.output
    assert registry.db.role_meta(TIMESTAMP_ROLE)[0] == 2
    assert cli("registry", "verify", "--registry", registry.root).exit_code == 0
    snap_pin_broken = registry.db.role_meta(TIMESTAMP_ROLE)[1].replace(b'"version":1', b'"version":7')
    with sqlite3.connect(registry.db.path) as con:
        con.execute("UPDATE role_meta SET envelope = ? WHERE role = 'timestamp' AND version = 2", (snap_pin_broken,))
    r = cli("registry", "verify", "--registry", registry.root)
    assert r.exit_code == 1 and "timestamp v2: 0 valid signature" in r.output, r.output
