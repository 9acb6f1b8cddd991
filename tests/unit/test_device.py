"""fedtune.device, the embeddable API: the same checks and results as the CLI, as values and UserErrors."""

import pytest

import fedtune.device as fd
from fedtune.deploy.eligibility import Verdict
from fedtune.errors import UserError
from tests.unit.registry.conftest import keys, live, registry, runs  # noqa: F401 (fixtures)


class Signals:
    def __init__(self, charging):
        self._charging = charging

    def charging(self):
        return self._charging

    def idle(self):
        return True

    def unmetered(self):
        return True

    def available_memory_gb(self):
        return 4.0


def test_eligibility_follows_the_signals():
    assert fd.eligibility("charging+idle", Signals(True)).eligible
    no = fd.eligibility("charging", Signals(False))
    assert isinstance(no, Verdict) and not no.eligible and "charging" in no.reason
    assert not fd.eligibility("memory:8", Signals(True)).eligible
    with pytest.raises(UserError, match="eligibility 'sometimes'"):
        fd.eligibility("sometimes")


def test_join_refuses_bad_arguments_before_starting_anything(tmp_path):
    with pytest.raises(UserError, match="root_certificates"):
        fd.join("127.0.0.1:1", tmp_path / "d.jsonl")
    with pytest.raises(UserError, match="--data: file not found"):
        fd.join("127.0.0.1:1", tmp_path / "d.jsonl", insecure=True, state_dir=tmp_path / "s")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    with pytest.raises(UserError, match="cannot reach 127.0.0.1:1"):
        fd.join("127.0.0.1:1", data, insecure=True, state_dir=tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_status_of_a_missing_state_dir_is_refused(tmp_path):
    with pytest.raises(UserError, match="no device state there"):
        fd.status(tmp_path / "nope", tmp_path / "k.pub")
    with pytest.raises(UserError, match="no device state there"):
        fd.current_adapter(tmp_path / "nope", tmp_path / "k.pub")


def test_pull_then_the_current_adapter(tmp_path, registry, keys, runs, live):  # noqa: F811
    from fedtune.registry import publish_run

    key, _ = keys
    registry.promote(publish_run(runs[0], registry, key, round=1).manifest.version, keys=key)
    pub, state = tmp_path / "keys" / "signing.pub", tmp_path / "device"
    state.mkdir()
    assert fd.current_adapter(state, pub) is None
    result = fd.pull(live.url, "tiny-llama", pub, state)
    assert (result.status, result.active) == ("updated", 1)
    adapter = fd.current_adapter(state, pub)
    assert adapter.version == 1 and adapter.path.is_dir() and adapter.base_model == "tiny-llama"
    status = fd.status(state, pub)
    assert (status.active, status.adapter, status.problem) == (1, adapter, None)
    weights = next(adapter.path.glob("*.safetensors"))
    weights.write_bytes(b"corrupted")
    broken = fd.status(state, pub)
    assert broken.active == 1 and broken.adapter is None and broken.problem
    with pytest.raises(UserError, match="cannot reach the registry"):
        fd.pull("http://127.0.0.1:1", "tiny-llama", pub, state)
