"""The Flower command lines and connection file we build (checked against Flower 1.41's own parsers)."""

import json
from pathlib import Path

import pytest

from fedtune.deploy.certs import CertPaths
from fedtune.deploy.superlink import SuperLinkSpec, superlink_command, write_connection
from fedtune.deploy.supernode import DeviceJoin, supernode_command


def test_superlink_command_with_tls_auth_and_database(tmp_path):
    spec = SuperLinkSpec(host="0.0.0.0", port=9999, certs=CertPaths(tmp_path), auth=True, database=tmp_path / "s.db")
    cmd = superlink_command(spec)
    assert cmd[cmd.index("--ssl-ca-certfile") + 1] == str(tmp_path / "ca.crt")
    assert cmd[cmd.index("--ssl-certfile") + 1] == str(tmp_path / "server.crt")
    assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd
    assert cmd[cmd.index("--port") + 1] == "9999" and cmd[cmd.index("--database") + 1] == str(tmp_path / "s.db")
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink

    args = _parse_args_run_superlink().parse_args(cmd[1:])  # Flower's own parser accepts every flag
    assert args.enable_supernode_auth and args.port == 9999


def test_insecure_superlink_and_its_connection(tmp_path):
    spec = SuperLinkSpec(port=9100, certs=None, auth=False)
    assert "--insecure" in superlink_command(spec) and "--enable-supernode-auth" not in superlink_command(spec)
    write_connection(tmp_path, spec)
    assert "insecure = true" in (tmp_path / "config.toml").read_text()


def test_connection_trusts_the_ca(tmp_path):
    import tomllib

    write_connection(tmp_path, SuperLinkSpec(host="0.0.0.0", port=9100, certs=CertPaths(tmp_path / "c")))
    conf = tomllib.loads((tmp_path / "config.toml").read_text())
    assert conf["superlink"]["default"] == "fedtune"
    assert conf["superlink"]["fedtune"] == {"address": "127.0.0.1:9100",
                                            "root-certificates": str(tmp_path / "c" / "ca.crt")}


def test_supernode_node_config_reaches_flower_parsed(tmp_path):
    join = DeviceJoin(superlink="10.0.0.5:9092", data_path=tmp_path / "my data.jsonl", profile="phone-low",
                      root_certificates=tmp_path / "ca.crt", auth_key=tmp_path / "key", eligibility="charging+idle",
                      device_id="phone-7", state_dir=tmp_path / "state")
    cmd = supernode_command(join)
    assert cmd[cmd.index("--superlink") + 1] == "10.0.0.5:9092"
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(tmp_path / "key")
    assert cmd[cmd.index("--root-certificates") + 1] == str(tmp_path / "ca.crt") and "--insecure" not in cmd
    from flwr.common.config import parse_config_args

    parsed = parse_config_args([cmd[cmd.index("--node-config") + 1]])
    assert parsed == {"data-path": str(tmp_path / "my data.jsonl"), "profile": "phone-low",
                      "eligibility": "charging+idle", "device-id": "phone-7", "state-dir": str(tmp_path / "state")}


def test_two_supernodes_on_one_host_get_their_own_runtime_ports(tmp_path):
    join = DeviceJoin(superlink="127.0.0.1:1", data_path=tmp_path / "d.jsonl", insecure=True)
    a, b = supernode_command(join), supernode_command(join)
    assert a[a.index("--port") + 1] != b[b.index("--port") + 1]
    assert "--insecure" in a


def test_a_warm_device_runs_its_supernode_in_process_isolation(tmp_path):
    from fedtune.deploy.supernode import warm_runtime_command, with_runtime_port

    join = DeviceJoin(superlink="127.0.0.1:1", data_path=tmp_path / "d.jsonl", insecure=True)
    cmd = supernode_command(join)
    assert cmd[cmd.index("--isolation") + 1] == "process"  # the SuperNode launches no flwr-clientapp itself
    cold = supernode_command(DeviceJoin(superlink="127.0.0.1:1", data_path=tmp_path / "d.jsonl", insecure=True,
                                        warm=False))
    assert "--isolation" not in cold  # Flower's default: a fresh ClientApp process per round
    with pytest.raises(ValueError, match="port"):
        warm_runtime_command(join, 1)
    fixed = with_runtime_port(join)
    assert with_runtime_port(fixed) is fixed  # the port survives SuperNode restarts
    runtime = warm_runtime_command(fixed, 4242)
    snode = supernode_command(fixed)
    assert runtime[runtime.index("--runtime-api-address") + 1] == f"127.0.0.1:{snode[snode.index('--port') + 1]}"
    assert runtime[runtime.index("--parent-pid") + 1] == "4242" and "fedtune.flower.warm_runtime" in runtime
