"""Staged rollout is a deterministic function of the device id."""

import pytest

from fedtune.registry.rollout import choose_version, in_rollout, parse_percent, rollout_bucket

IDS = [f"device-{i:05d}" for i in range(10_000)]


def test_ten_percent_is_about_ten_percent_and_the_same_devices_every_time():
    salt = "a1b2c3"
    chosen = {d for d in IDS if in_rollout(d, salt, 10.0)}
    assert 800 <= len(chosen) <= 1200, len(chosen)
    assert chosen == {d for d in IDS if in_rollout(d, salt, 10.0)}
    # raising the percentage only adds devices; nobody early drops out
    wider = {d for d in IDS if in_rollout(d, salt, 50.0)}
    assert chosen < wider and 4_700 <= len(wider) <= 5_300
    assert all(0 <= rollout_bucket(d, salt) < 100 for d in IDS[:100])
    # another registry (salt) picks other devices
    other = {d for d in IDS if in_rollout(d, "other-salt", 10.0)}
    assert len(chosen & other) < 200


def test_registry_resolves_ten_percent_to_the_candidate(registry, keys, runs):
    from fedtune.registry import publish_run

    key, _ = keys
    v1 = publish_run(runs[0], registry, key, round=1).manifest.version
    v2 = publish_run(runs[0], registry, key, round=2).manifest.version
    registry.promote(v1, "stable", 100, keys=key)
    registry.promote(v2, "stable", 10, keys=key)

    def who_gets(version):
        s = registry.channel("tiny-llama", "stable")  # what resolve() reads per request, read once here
        return {d for d in IDS if choose_version(s.current, s.candidate, s.rollout, d, registry.rollout_salt) == version}

    first = who_gets(v2)
    assert 800 <= len(first) <= 1200
    assert who_gets(v2) == first  # same ids every time
    assert first == {d for d in IDS if in_rollout(d, registry.rollout_salt, 10.0)}
    # the full request path (resolve) agrees, device by device
    for d in IDS[:300]:
        assert registry.resolve("tiny-llama", "stable", d).version == (v2 if d in first else v1)
    # the salt is version-independent: a third version at 10% reaches the same devices
    v3 = publish_run(runs[1], registry, key).manifest.version
    registry.promote(v3, "stable", 10, keys=key)
    assert who_gets(v3) == first


@pytest.mark.parametrize("text,value", [("10%", 10.0), ("10", 10.0), (" 2.5 % ", 2.5), (100, 100.0)])
def test_parse_percent(text, value):
    assert parse_percent(text) == value


@pytest.mark.parametrize("text", ["0%", "150%", "ten", "-5"])
def test_parse_percent_refuses(text):
    with pytest.raises(ValueError, match="rollout: expected a percentage"):
        parse_percent(text)
