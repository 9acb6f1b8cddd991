"""Adapters fed by the registry: verified pull, hot swap on promote (in-flight requests finish on the
version they started with), and a tampered version refused while the previous one keeps serving."""

from __future__ import annotations

import json
import os
import sqlite3
import time

import httpx
import pytest

from fedtune.registry.publish import artifact_info
from fedtune.serve.text import ByteTokenizer
from tests.conftest import make_config
from tests.unit.registry.conftest import keys, live, registry  # noqa: F401 - fixtures
from tests.unit.serve.conftest import make_adapter, openai_client, reference_greedy, running

TOK = ByteTokenizer()
PROMPT = "Mr. Speaker"


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    root = tmp_path_factory.mktemp("versions")
    return [make_adapter(root / f"v{i}", seed=10 + i, epsilon=float(i)) for i in (1, 2, 3)]


def publish(registry, key, directory):
    return registry.publish(directory, artifact_info(directory, "alice-personal"), key).manifest


def options(tmp_path, live, poll_s):
    from fedtune.serve.server import RegistryOptions, ServeOptions
    from fedtune.serve.watcher import parse_subscription

    reg = RegistryOptions(url=live.url, public_key=tmp_path / "keys" / "signing.pub", state_dir=tmp_path / "serve",
                          subscriptions=(parse_subscription("alice=user-alice"),), poll_s=poll_s, device_id="srv-1")
    return ServeOptions(model=make_config().model, registry=reg)


def card(url, name="alice"):
    return next(m for m in httpx.get(f"{url}/v1/models").json()["data"] if m["id"] == name)


def greedy(url, n=10):
    r = openai_client(url).completions.create(model="alice", prompt=PROMPT, max_tokens=n, temperature=0)
    return r.choices[0].text, r.system_fingerprint


def test_promoted_version_is_picked_up_by_a_running_server(tmp_path, registry, keys, live, versions):
    key, _ = keys
    registry.promote(publish(registry, key, versions[0]).version, "user-alice", keys=key)
    with running(options(tmp_path, live, poll_s=0.2)) as (url, _server):
        meta = card(url)["fedtune"]
        assert (meta["version"], meta["origin"], meta["verified"], meta["channel"]) == (1, "registry", True,
                                                                                     "user-alice")
        assert (meta["privacy"]["level"], meta["privacy"]["epsilon"], meta["privacy"]["delta"]) == ("sample", 1.0, 1e-5)
        assert greedy(url) == (TOK.decode(reference_greedy(versions[0], TOK.encode(PROMPT), 10)), "fedtune-alice-v1")

        registry.promote(publish(registry, key, versions[1]).version, "user-alice", keys=key)
        deadline = time.monotonic() + 20
        while card(url)["fedtune"]["version"] != 2:
            assert time.monotonic() < deadline, "the running server never picked up v2"
            time.sleep(0.1)
        assert card(url)["fedtune"]["privacy"]["epsilon"] == 2.0
        assert greedy(url) == (TOK.decode(reference_greedy(versions[1], TOK.encode(PROMPT), 10)), "fedtune-alice-v2")


def test_in_flight_request_finishes_on_its_version_across_a_swap(tmp_path, registry, keys, live, versions):
    key, _ = keys
    registry.promote(publish(registry, key, versions[0]).version, "user-alice", keys=key)
    with running(options(tmp_path, live, poll_s=3600)) as (url, server):
        stream = openai_client(url).completions.create(model="alice", prompt=PROMPT, max_tokens=40, temperature=0,
                                                       stream=True)
        first = next(stream)
        registry.promote(publish(registry, key, versions[1]).version, "user-alice", keys=key)
        assert [o.status for o in server.watcher.poll_once()] == ["updated"]  # swapped mid-request
        text = first.choices[0].text + "".join(c.choices[0].text for c in stream)
        assert text == TOK.decode(reference_greedy(versions[0], TOK.encode(PROMPT), 40))
        assert first.system_fingerprint == "fedtune-alice-v1"
        assert greedy(url)[1] == "fedtune-alice-v2"  # the next request runs the new version


def test_tampered_version_is_refused_and_the_previous_keeps_serving(tmp_path, registry, keys, live, versions):
    key, _ = keys
    registry.promote(publish(registry, key, versions[1]).version, "user-alice", keys=key)
    with running(options(tmp_path, live, poll_s=3600)) as (url, server):
        before = greedy(url)
        bad = publish(registry, key, versions[2])
        registry.promote(bad.version, "user-alice", keys=key)
        honest = registry.row(bad.version).envelope
        forged = json.loads(honest)  # the privacy label lowered after signing
        forged["manifest"]["privacy"]["epsilon"] = 0.01
        with sqlite3.connect(registry.db.path) as con:
            con.execute("UPDATE artifacts SET envelope = ? WHERE version = ?", (json.dumps(forged).encode(),
                                                                                 bad.version))
        [outcome] = server.watcher.poll_once()
        assert outcome.status == "refused" and outcome.active == 1
        with sqlite3.connect(registry.db.path) as con:
            con.execute("UPDATE artifacts SET envelope = ? WHERE version = ?", (honest, bad.version))
        blob = registry.store.local_path(bad.file("adapter_model.safetensors").sha256)
        os.chmod(blob, 0o644)
        blob.write_bytes(blob.read_bytes()[:-64] + bytes(64))  # same size, other bytes
        [outcome] = server.watcher.poll_once()
        assert outcome.status == "refused" and outcome.active == 1
        assert card(url)["fedtune"]["version"] == 1
        assert greedy(url) == before == (TOK.decode(reference_greedy(versions[1], TOK.encode(PROMPT), 10)),
                                         "fedtune-alice-v1")
        assert httpx.get(f"{url}/health").json()["registry"]["alice"]["status"] == "refused"

        # altered on the server's own disk after the pull: refused at (re)load, never served
        installed = server.watcher.clients["alice"][1].state.version_dir(1) / "adapter_model.safetensors"
        installed.write_bytes(installed.read_bytes()[:-8] + bytes(8))
        server.context.pool.evict("alice")  # the next request reloads it from disk, verifying first
        with pytest.raises(Exception) as err:
            greedy(url)
        assert getattr(err.value, "status_code", None) == 503 and "verification" in str(err.value)
