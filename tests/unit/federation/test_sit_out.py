"""A device too small to train within its per-device DP budget declines before training, cleanly: the round
counts it in ``clients_declined`` (not ``clients_failed``), the run names its user, nothing is spent."""

import dataclasses

import pytest

from fedtune.adapters import create_adapter
from fedtune.data import build_client_data
from fedtune.federation.device_round import DeviceSitsOut, check_sit_out
from fedtune.federation.inprocess import run_inprocess
from fedtune.models import load_base_model
from fedtune.models.tokenizer import ByteEncoder
from fedtune.report import write_report
from fedtune.workspace import RunDir, read_jsonl
from tests.conftest import make_config

DP = {"enabled": True, "target_epsilon": 8.0, "delta": 1e-5, "max_noise_to_batch": 0.25}


def tiny_fleet(cfg, small: int = 1, keep: int = 2):
    """The synthetic users with user ``small`` cut to ``keep`` training chunks (too few for ε <= 8 at noise <= 0.25 clip norms)."""
    clients = build_client_data(cfg.data, ByteEncoder(), cfg.seed)
    clients[small] = dataclasses.replace(clients[small], train=clients[small].train[:keep])
    return clients


def test_check_sit_out_follows_the_budget_not_the_data_alone():
    cfg = make_config(privacy=DP, federation={"rounds": 1}, train={"local_steps": 1})
    clients = tiny_fleet(cfg)
    with pytest.raises(DeviceSitsOut, match="sits out") as err:
        check_sit_out(cfg, clients[1], batch_size=4)
    assert err.value.reason == "too_small"
    check_sit_out(cfg, clients[0], batch_size=4)  # 54 chunks train within the same budget
    check_sit_out(make_config(privacy={"enabled": False}), clients[1], batch_size=4)  # no DP: nothing to fit
    check_sit_out(make_config(privacy={"enabled": True, "noise_multiplier": 1.0}), clients[1], 4)  # no target


@pytest.mark.parametrize("pack", [1, 3])
def test_in_process_round_counts_a_too_small_device_as_declined(tmp_path, pack):
    cfg = make_config(privacy=DP, federation={"rounds": 1, "upload": "fp32"}, train={"local_steps": 1,
                                                                                     "eval_max_chunks": 4})
    clients = tiny_fleet(cfg)
    base, _ = load_base_model(cfg.model)
    run = RunDir.create(tmp_path / "run")
    records = run_inprocess(cfg, create_adapter(base, cfg.adapter, cfg.seed), clients, run, pack=pack)
    last = records[-1]
    assert last["clients_sampled"] == 3 and last["clients_succeeded"] == 2
    assert last["clients_declined"] == {"too_small": 1} and last["clients_failed"] == 0
    events = [e for e in read_jsonl(run.events) if e["event"] == "client_declined"]
    assert [(e["user"], e["reason"]) for e in events] == [(clients[1].user_id, "too_small")]
    assert not (run.ledgers / f"{clients[1].user_id}.json").exists()  # it never trained: nothing spent
    assert all((run.ledgers / f"{c.user_id}.json").exists() for c in (clients[0], clients[2]))
    from fedtune.personalization.run_eval import sit_out_notes  # `fedtune evaluate`'s per-user summary

    assert sit_out_notes(run) and clients[1].user_id in sit_out_notes(run)[0]
    report = write_report(run, cfg, records, 1.0).read_text()
    assert f"too small to train within their DP budget (1; they keep the global model): {clients[1].user_id}" \
        in report
