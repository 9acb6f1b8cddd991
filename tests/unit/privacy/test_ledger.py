import pytest

from fedtune.privacy import LedgerStore, PrivacyLedger, compute_epsilon, noise_for_target_epsilon


def test_store_roundtrip_and_atomic_files(tmp_path):
    store = LedgerStore(tmp_path)
    assert store.load("alice").history == []
    led = PrivacyLedger("alice", history=[(1.0, 0.1, 10)], rounds=[1])
    store.save(led)
    back = store.load("alice")
    assert back.history == [(1.0, 0.1, 10)] and back.rounds == [1]
    assert back.epsilon(1e-5) == pytest.approx(led.epsilon(1e-5))
    assert [p.name for p in tmp_path.iterdir()] == ["alice.json"]


def test_store_refuses_switching_accountant(tmp_path):
    store = LedgerStore(tmp_path)
    store.save(PrivacyLedger("a", accountant="rdp", history=[(1.0, 0.1, 1)]))
    with pytest.raises(ValueError, match="accountant"):
        store.load("a", accountant="prv")


def test_epsilon_composes_over_history():
    one = compute_epsilon([(1.0, 0.05, 100)], 1e-5)
    two = compute_epsilon([(1.0, 0.05, 100), (1.0, 0.05, 100)], 1e-5)
    assert 0 < one < two
    assert two == pytest.approx(compute_epsilon([(1.0, 0.05, 200)], 1e-5), rel=1e-9)
    assert compute_epsilon([], 1e-5) == 0.0


def test_noise_calibration_meets_target_and_refuses_impossible():
    sigma = noise_for_target_epsilon(2.0, 1e-5, 0.05, 500)
    assert compute_epsilon([(sigma, 0.05, 500)], 1e-5) <= 2.0
    assert compute_epsilon([(sigma * 0.9, 0.05, 500)], 1e-5) > 2.0
