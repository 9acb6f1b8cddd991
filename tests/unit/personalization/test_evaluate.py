"""Per-user evaluation: methods, summaries, determinism."""

import csv

import pytest

from fedtune.data import build_client_data
from fedtune.models.tokenizer import ByteEncoder
from fedtune.personalization.evaluate import UserResult, local_only_steps
from fedtune.personalization import PrivateStateStore
from fedtune.federation.inprocess import run_inprocess as federate
from fedtune.personalization.run_eval import RunNotEvaluable, evaluate_run, load_model
from fedtune.personalization.summary import best_personalized, summarize
from fedtune.workspace import RunDir
from tests.conftest import make_config


def _cfg(**kw):
    return make_config(data={"synthetic_users": 3, "synthetic_docs_per_user": 8},
                       privacy={"enabled": True, "noise_multiplier": 0.8},
                       federation={"rounds": 2, "clients_per_round": 2, "min_clients": 1},
                       personalization={"finetune_steps": 2, "eval_max_chunks": 4, **kw})


def _run(tmp_path, name, cfg):
    model = load_model(cfg, "cpu")
    from fedtune.adapters import create_adapter, get_adapter_state
    from fedtune.models import load_base_model

    initial = get_adapter_state(create_adapter(load_base_model(cfg.model)[0], cfg.adapter, cfg.seed))
    run = RunDir.create(tmp_path / name)
    federate(cfg, model, build_client_data(cfg.data, ByteEncoder(), cfg.seed), run, initial=initial)
    return run


def test_evaluation_is_deterministic_for_a_seed(tmp_path):
    cfg = _cfg()
    rows = []
    for name in ("a", "b"):
        run = _run(tmp_path, name, cfg)
        evaluate_run(run.root, methods=["base", "global", "finetune", "local_only"])
        rows.append(list(csv.DictReader(open(run.eval / "per_user.csv"))))
    assert rows[0] == rows[1]
    assert {r["method"] for r in rows[0]} == {"base", "global", "finetune", "local_only"}
    assert len({r["user"] for r in rows[0]}) == 3
    by = {(r["user"], r["method"]): r for r in rows[0]}
    for user in {r["user"] for r in rows[0]}:
        assert float(by[user, "base"]["epsilon"]) == 0.0
        # fine-tuning continues the device's own ledger: more epsilon than the federation alone spent
        assert float(by[user, "finetune"]["epsilon"]) > float(by[user, "global"]["epsilon"]) >= 0
        assert int(by[user, "finetune"]["train_steps"]) == 2
        assert int(by[user, "local_only"]["train_steps"]) == local_only_steps(cfg, 3)
    for f in ("summary.json", "summary.md", "per_user_distribution.png", "per_user_before_after.png"):
        assert (rows and (tmp_path / "a" / "eval" / f).is_file())


def test_split_run_evaluates_shared_plus_each_devices_private_part(tmp_path):
    cfg = _cfg(split="fedsa")
    run = _run(tmp_path, "sa", cfg)
    from fedtune.federation.sampler import UniformSampler
    from fedtune.federation.seeds import Seeds

    sampler = UniformSampler(Seeds.simulated(cfg.seed), cfg.federation.clients_per_round)
    sampled = {f"user-{i:03d}" for r in (1, 2) for i in sampler.sample(r, 3)}
    assert {p.stem for p in run.private.glob("*.safetensors")} == sampled  # only devices that trained have a B
    results, _ = evaluate_run(run.root, methods=["global", "split"])
    by = {(r.user, r.method): r for r in results}
    # the global model of a split run is A with B=0; a device's own B changes it, a never-sampled device has none
    for user in {u for u, _ in by}:
        if user in sampled:
            assert by[user, "split"].loss != by[user, "global"].loss
        else:
            assert by[user, "split"].loss == by[user, "global"].loss


def test_a_directory_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(RunNotEvaluable, match="no config.yaml"):
        evaluate_run(tmp_path)


def _r(user, method, ppl):
    return UserResult(user=user, method=method, loss=0.0, perplexity=ppl, accuracy=0.5, tokens=10,
                      train_steps=0, epsilon=None)


def test_summary_shares_and_worst_decile():
    users = [f"u{i}" for i in range(10)]
    results = [_r(u, "global", 10.0) for u in users]
    results += [_r(u, "local_only", 12.0) for u in users]
    results += [_r(u, "finetune", 9.0 if i < 8 else 11.0) for i, u in enumerate(users)]  # 8 of 10 improve
    results += [_r(u, "split", 10.0 + i) for i, u in enumerate(users)]  # never strictly better
    s = {m.method: m for m in summarize(results)}
    assert s["finetune"].improved_over_global == pytest.approx(0.8)
    assert s["finetune"].improved_over_local == pytest.approx(1.0)
    assert s["split"].improved_over_global == 0.0
    assert s["finetune"].mean_perplexity == pytest.approx(9.4) and s["finetune"].median_perplexity == 9.0
    assert s["split"].worst10_perplexity == 19.0  # the worst 10% of 10 users is one user
    assert s["global"].improved_over_global is None
    assert best_personalized(list(s.values())).method == "finetune"


def test_packed_engine_gives_the_same_federation_and_evaluation(tmp_path):
    """--pack N is a speed-up only: the same global adapter, private parts, epsilons and per-user numbers."""
    import torch

    from fedtune.adapters import create_adapter, get_adapter_state
    from fedtune.models import load_base_model
    from fedtune.personalization.evaluate import evaluate_users
    from fedtune.personalization.run_eval import sources_for

    cfg = _cfg(split="fedsa")
    clients = build_client_data(cfg.data, ByteEncoder(), cfg.seed)
    initial = get_adapter_state(create_adapter(load_base_model(cfg.model)[0], cfg.adapter, cfg.seed))
    model = load_model(cfg, "cpu")
    out = {}
    for pack in (1, 3):
        run = RunDir.create(tmp_path / f"pack{pack}")
        records = federate(cfg, model, clients, run, initial=initial, pack=pack)
        src = sources_for(run, cfg, initial)
        rows = evaluate_users(model, clients, src, cfg, ["finetune", "split", "local_only"], pack=pack)
        out[pack] = (records, {(r.user, r.method): r for r in rows},
                     {p.stem: PrivateStateStore(run.private).load(p.stem) for p in run.private.glob("*.safetensors")})
    (rec1, rows1, priv1), (rec3, rows3, priv3) = out[1], out[3]
    assert [r.get("epsilon") for r in rec1[1:]] == pytest.approx([r.get("epsilon") for r in rec3[1:]])
    assert [r["eval_loss"] for r in rec1] == pytest.approx([r["eval_loss"] for r in rec3], rel=1e-5)
    assert rows1.keys() == rows3.keys()
    for key in rows1:
        assert rows3[key].loss == pytest.approx(rows1[key].loss, rel=1e-5), key
        assert rows3[key].epsilon == pytest.approx(rows1[key].epsilon), key
    assert priv1.keys() == priv3.keys()
    for user in priv1:
        for k in priv1[user]:
            torch.testing.assert_close(priv3[user][k], priv1[user][k], atol=1e-5, rtol=1e-4)


def test_personalized_runs_from_the_run_dir_on_test_users_only(tmp_path):
    from fedtune.personalization.users import split_users

    cfg = _cfg(finetune_grid=[2], alpha_grid=[0.5], validation_max_chunks=2, eval_users="test",
               tuning_fraction=0.34, eval_max_users=2)
    run = _run(tmp_path, "p", cfg)
    rows, summaries = evaluate_run(run.root, methods=["global", "personalized"])
    users = {r.user for r in rows}
    all_users = [json_row["user_id"] for json_row in __import__("json").loads((run.data / "index.json").read_text())]
    assert users and users == set(split_users(all_users, 0.34).test[:2])
    chosen = {r.user: r.choice for r in rows if r.method == "personalized"}
    assert all(c for c in chosen.values())
    assert {p.stem for p in (run.root / "state" / "selection").glob("*.json")} == users
