"""A device whose own sample-level ε has reached ``privacy.device_epsilon_budget`` declines the round before
training, cleanly: the round counts it in ``clients_declined: {budget_spent: n}`` (not ``clients_failed``), the
run names its user, and its ledger is left as it was."""

import pytest

from fedtune.adapters import create_adapter
from fedtune.data import build_client_data
from fedtune.federation.device_round import Declined, DeviceBudgetSpent, DeviceState, declined_event
from fedtune.federation.inprocess import run_inprocess
from fedtune.models import load_base_model
from fedtune.models.tokenizer import ByteEncoder
from fedtune.privacy import LedgerStore
from fedtune.privacy.accounting import compute_epsilon
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.report import write_report
from fedtune.workspace import RunDir, read_jsonl
from tests.conftest import make_config

SPENT = [(0.9, 0.5, 6)]  # a history: six steps at noise 0.9, rate 0.5
DELTA = 1e-5


def dp_at_budget() -> dict:
    """Privacy with the per-device budget exactly at what ``SPENT`` costs: a device holding it is at its budget."""
    return {"enabled": True, "noise_multiplier": 1.0, "delta": DELTA,
            "device_epsilon_budget": compute_epsilon(SPENT, DELTA, "rdp")}


def spend(ledger_dir, user: str) -> PrivacyLedger:
    """Write a ledger for ``user`` that holds ``SPENT`` (as if it had trained round 1)."""
    ledger = PrivacyLedger(client_id=user, accountant="rdp", history=list(SPENT), rounds=[1])
    LedgerStore(ledger_dir).save(ledger)
    return ledger


def test_a_device_at_its_budget_declines_with_budget_spent(tmp_path):
    cfg = make_config(privacy=dp_at_budget())
    state = DeviceState.simulated(tmp_path, cfg.seed)
    assert state.ledger("fresh", cfg.privacy) is not None  # a fresh device is below its budget
    spend(tmp_path / "ledgers", "spent")
    with pytest.raises(DeviceBudgetSpent, match="spent its sample-level budget") as err:
        state.ledger("spent", cfg.privacy)
    assert isinstance(err.value, Declined) and err.value.reason == "budget_spent"
    event = declined_event(3, 1, "spent", err.value)
    assert (event["event"], event["reason"]) == ("client_declined", "budget_spent")


@pytest.mark.parametrize("pack", [1, 3])
def test_in_process_round_counts_a_spent_device_as_declined_not_failed(tmp_path, pack):
    cfg = make_config(privacy=dp_at_budget(), federation={"rounds": 1, "upload": "fp32"},
                      train={"local_steps": 1, "eval_max_chunks": 4})
    clients = build_client_data(cfg.data, ByteEncoder(), cfg.seed)
    run = RunDir.create(tmp_path / "run")
    before = spend(run.ledgers, clients[1].user_id)
    base, _ = load_base_model(cfg.model)
    records = run_inprocess(cfg, create_adapter(base, cfg.adapter, cfg.seed), clients, run, pack=pack)
    last = records[-1]
    assert last["clients_sampled"] == 3 and last["clients_succeeded"] == 2
    assert last["clients_declined"] == {"budget_spent": 1} and last["clients_failed"] == 0
    events = [e for e in read_jsonl(run.events) if e["event"] == "client_declined"]
    assert [(e["user"], e["reason"]) for e in events] == [(clients[1].user_id, "budget_spent")]
    after = LedgerStore(run.ledgers).load(clients[1].user_id)
    assert (after.history, after.rounds) == (before.history, before.rounds)  # it trained nothing, spent nothing
    assert all(LedgerStore(run.ledgers).load(c.user_id).rounds == [1] for c in (clients[0], clients[2]))
    report = write_report(run, cfg, records, 1.0).read_text()
    assert f"DP budget (privacy.device_epsilon_budget) was spent (1; from then on they declined every round): " \
           f"{clients[1].user_id}." in report
    assert "too small" not in report
