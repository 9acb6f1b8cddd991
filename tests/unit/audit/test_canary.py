import json
import math
from dataclasses import replace

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fedtune.audit import (
    CanaryAuditConfig, candidate_secrets, count_occurrences, exposure_of, insert_canaries, make_canaries,
    run_canary_audit,
)
from fedtune.cli_audit import audit_app
from fedtune.data import build_client_data
from fedtune.models.tokenizer import ByteEncoder
from tests.conftest import make_config

# Small enough for seconds on 2 shared cores, strong enough that 2 inserted canaries stand out robustly.
AUDIT = CanaryAuditConfig(prefix="pin ", n_digits=3, n_inserted=2, n_held_out=2, repeats=16, n_candidates=200)
SECTIONS = dict(
    data={"synthetic_users": 2, "synthetic_docs_per_user": 6, "seq_len": 32},
    adapter={"rank": 8, "alpha": 16,
             "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj", "lm_head"]},
    train={"local_steps": 30, "batch_size": 8, "lr": 0.003, "torch_threads": 1, "eval_max_chunks": 4},
    federation={"rounds": 2, "clients_per_round": 2, "min_clients": 1},
)


# --- exposure maths --------------------------------------------------------------------------------

def test_lowest_log_perplexity_gets_full_exposure():
    pool = torch.arange(1.0, 1000.0)  # 999 others, all worse than 0.5
    e = exposure_of(0.5, pool)
    assert e.rank == 1 and e.n_candidates == 1000
    assert e.exposure == pytest.approx(math.log2(1000))


def test_canary_in_the_middle_gets_about_one_bit():
    pool = torch.arange(1.0, 1000.0)
    e = exposure_of(500.5, pool)  # 500 others are below it
    assert e.rank == 501
    assert e.exposure == pytest.approx(1.0, abs=0.01)
    assert exposure_of(1e9, pool).exposure == pytest.approx(0.0)  # the least likely of all


def test_ties_count_in_the_canarys_favour_and_bad_pools_are_refused():
    assert exposure_of(3.0, torch.tensor([3.0, 3.0, 4.0])).rank == 1
    with pytest.raises(ValueError, match="non-empty"):
        exposure_of(1.0, torch.empty(0))


def test_canaries_and_candidates_are_seeded_distinct_and_of_one_format():
    a = CanaryAuditConfig(n_digits=6, n_inserted=5, n_held_out=5, n_candidates=300)
    ins, held = make_canaries(a, seed=3)
    assert (ins, held) == make_canaries(a, seed=3)
    assert (ins, held) != make_canaries(a, seed=4)
    assert len(set(ins + held)) == 10
    assert all(len(s.split()) == 6 and all(len(d) == 1 and d.isdigit() for d in s.split()) for s in ins + held)
    pool, whole = candidate_secrets(a, ins + held, seed=3)
    assert not whole and len(pool) == 299 and len(set(pool)) == 299 and not set(pool) & set(ins + held)
    assert pool == candidate_secrets(a, ins + held, seed=3)[0]
    full, whole = candidate_secrets(CanaryAuditConfig(n_digits=2, n_inserted=1, n_held_out=1), ["1 2", "3 4"], 0)
    assert whole and len(full) == 100  # 10^k <= n_candidates: rank among the whole space


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="n_candidates"):
        CanaryAuditConfig(n_candidates=1)
    with pytest.raises(ValueError, match="n_digits=1 allows only 10"):
        CanaryAuditConfig(n_digits=1, n_inserted=8, n_held_out=8)


# --- insertion -------------------------------------------------------------------------------------

def test_only_the_canary_client_holds_whole_copies_and_held_out_canaries_appear_nowhere():
    cfg = make_config(data={"synthetic_users": 3, "synthetic_docs_per_user": 6, "seq_len": 48})
    enc = ByteEncoder()
    a = CanaryAuditConfig(n_inserted=3, n_held_out=3, repeats=5, canary_client=1)
    ins, held = make_canaries(a, seed=0)
    clients = build_client_data(cfg.data, enc, seed=0)
    ids = [enc.encode(a.prefix + s) for s in ins]
    out = insert_canaries(clients, ids, a.canary_client, a.repeats, enc.eos_token_id, seed=0)
    assert out[1].num_train == clients[1].num_train + 3 * 5
    for i, c in enumerate(out):
        for seq in ids:
            # whole copies, each right after an EOS (the chunk_tokens layout)
            expected = a.repeats if i == 1 else 0
            assert count_occurrences(c.train, seq) == expected
            assert count_occurrences(c.train, [enc.eos_token_id, *seq, enc.eos_token_id]) == expected
            assert count_occurrences(c.heldout, seq) == 0
        for s in held:
            assert count_occurrences(torch.cat([c.train, c.heldout]), enc.encode(a.prefix + s)) == 0
        assert count_occurrences(c.train, enc.encode(a.prefix)) == (15 if i == 1 else 0)
    # the others are untouched; the same seed inserts identically
    assert torch.equal(out[0].train, clients[0].train) and torch.equal(out[2].train, clients[2].train)
    again = insert_canaries(clients, ids, 1, a.repeats, enc.eos_token_id, seed=0)
    assert torch.equal(again[1].train, out[1].train)


def test_a_canary_longer_than_a_chunk_is_refused():
    cfg = make_config(data={"seq_len": 16})
    clients = build_client_data(cfg.data, ByteEncoder(), seed=0)
    with pytest.raises(ValueError, match="data.seq_len=16"):
        insert_canaries(clients, [list(range(20))], 0, 1, 257, seed=0)


# --- end to end ------------------------------------------------------------------------------------

def test_without_dp_inserted_canaries_stand_out_deterministically():
    cfg = make_config(**SECTIONS)
    result = run_canary_audit(cfg, replace(AUDIT, dp=False))
    assert result.epsilon is None and result.delta is None and not result.dp
    assert len(result.canaries) == 4 and result.canaries[0].n_candidates == 200
    assert result.inserted.mean > result.held_out.mean + 2.0, (result.inserted, result.held_out)
    again = run_canary_audit(cfg, replace(AUDIT, dp=False))
    assert [c.exposure for c in again.canaries] == [c.exposure for c in result.canaries]
    assert again.train_loss == result.train_loss


def test_with_dp_the_result_carries_the_canary_clients_epsilon():
    cfg = make_config(**{**SECTIONS, "train": {**SECTIONS["train"], "local_steps": 3},
                         "federation": {"rounds": 1, "clients_per_round": 2, "min_clients": 1}},
                      privacy={"enabled": True, "noise_multiplier": 1.0, "delta": 1e-5})
    result = run_canary_audit(cfg, AUDIT)
    assert result.dp and result.epsilon > 0 and result.delta == 1e-5
    assert result.noise_multiplier == pytest.approx(1.0)
    assert math.isfinite(result.inserted.mean) and math.isfinite(result.held_out.mean)


def test_cli_prints_the_table_and_writes_json(tmp_path):
    cfg = make_config(**{**SECTIONS, "train": {**SECTIONS["train"], "local_steps": 2},
                         "federation": {"rounds": 1, "clients_per_round": 2, "min_clients": 1}})
    path = tmp_path / "audit.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    out = tmp_path / "res" / "audit.json"
    args = ["canary", str(path), "--no-dp", "--inserted", "2", "--held-out", "2", "--repeats", "2",
            "--rounds", "1", "--candidates", "50", "--digits", "3", "--set", "train.local_steps=3", "--out", str(out)]
    result = CliRunner().invoke(audit_app, args)
    assert result.exit_code == 0, result.output
    assert "inserted" in result.output and "held-out" in result.output and "rank-1" in result.output
    data = json.loads(out.read_text())
    assert data["epsilon"] is None and len(data["canaries"]) == 4
    assert data["settings"]["audit"]["repeats"] == 2 and data["settings"]["experiment"]["train"]["local_steps"] == 3
    bad = CliRunner().invoke(audit_app, ["canary", str(path), "--candidates", "1"])
    assert bad.exit_code == 2 and "n_candidates" in bad.output


def test_user_level_dp_runs_dp_fedavg_and_reports_the_server_ledgers_epsilon():
    from fedtune.privacy import user_level_epsilon

    cfg = make_config(**{**SECTIONS, "data": {**SECTIONS["data"], "synthetic_users": 6},
                         "train": {**SECTIONS["train"], "local_steps": 2},
                         "federation": {"rounds": 3, "clients_per_round": 3, "min_clients": 1}},
                      privacy={"enabled": False, "user_level": {"enabled": True, "noise_multiplier": 1.5,
                                                                "clip_norm": 0.1, "delta": 1e-3,
                                                                "epsilon_budget": 2.2}})
    result = run_canary_audit(cfg, AUDIT)
    assert result.user_level and not result.dp and result.epsilon is None
    rounds = result.settings["audit"]["rounds"]
    assert rounds == 2  # the budget cut the rounds: q = 3/6, sigma = 1.5: eps 2.06 after 2, 2.50 after 3
    assert result.user_epsilon == pytest.approx(user_level_epsilon(1.5, 0.5, rounds, 1e-3))
    assert result.user_epsilon <= 2.2
    assert result.user_delta == 1e-3 and result.user_noise_multiplier == 1.5
    assert len(result.train_loss) == rounds
    off = run_canary_audit(cfg, replace(AUDIT, user_level=False, rounds=1))
    assert not off.user_level and off.user_epsilon is None


def test_cli_user_level_flag_reaches_the_server_plan(tmp_path):
    cfg = make_config(**{**SECTIONS, "federation": {"rounds": 1, "clients_per_round": 2, "min_clients": 1}},
                      privacy={"enabled": False, "user_level": {"enabled": False, "noise_multiplier": 0.1,
                                                                "epsilon_budget": 0.01}})
    path = tmp_path / "audit.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    # user-level DP is off in the config; the flag turns it on, and its plan refuses a budget no round fits
    result = CliRunner().invoke(audit_app, ["canary", str(path), "--no-dp", "--user-level", "--candidates", "50",
                                            "--digits", "3", "--inserted", "2", "--held-out", "2"])
    assert result.exit_code == 1 and "not even one round fits" in result.output, result.output
