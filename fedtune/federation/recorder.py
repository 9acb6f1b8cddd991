"""The one recorder and checkpointer of both backends: evaluate, label, save, record, checkpoint.

After each round (and for round 0, the starting adapter) ``Recorder.record``:
  1. merges the shared global adapter with the split's private init and evaluates it on the pooled
     held-out set;
  2. lets the privacy trail observe what the round's pipeline applied (``labels``);
  3. writes ``adapters/round-N`` (PEFT + ``fedtune.json`` with the trail's guarantee), one metrics.jsonl
     record (and the tracking sinks'), then ``checkpoint.json`` atomically: the round's commit point.

``RoundStats`` is what a backend observed in a round (counts, bytes, the pipeline's result), typed.
``round_throughput`` turns the aggregated replies' step and token counts and the round's wall time into
``device_steps_per_s`` and ``tokens_per_s`` (null where replies withhold them: ``reply_figures: minimal``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from fedtune.adapters import adapter_bytes, set_adapter_state
from fedtune.adapters.split import merge
from fedtune.federation.aggregate import Aggregated, Reply
from fedtune.federation.labels import PrivacyTrail
from fedtune.federation.sinks import Sinks
from fedtune.recording import save_adapter
from fedtune.training import evaluate_chunks
from fedtune.types import AdapterState, RoundResult


@dataclass
class RoundStats:
    sampled: int = 0
    succeeded: int = 0
    failed: int = 0
    rejected: Counter = field(default_factory=Counter)
    declined: Counter = field(default_factory=Counter)  # ineligible devices, by their reason
    upload_bytes: int = 0
    train_loss: float | None = None
    clients: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    skipped: bool = False
    dp: dict = field(default_factory=dict)  # the pipeline's figures (user-level DP) of the round
    replies: list[Reply] = field(default_factory=list)  # what was aggregated
    result: Aggregated | None = None  # what the pipeline did (its ``applied`` mechanisms label the round)
    extra: dict = field(default_factory=dict)  # backend figures (a fleet's tiers and clock)
    marks: dict = field(default_factory=dict)  # wall-clock times (time.time()) of the round's server steps

    def mark(self, step: str) -> None:
        """When the server finished ``step`` (sent, replies_in, checked, aggregated, recorded, checkpointed):
        the round_done event carries them, so a round's seconds can be split between devices and server."""
        self.marks[step] = time.time()

    def absorb(self, result: Aggregated, replies: list[Reply]) -> None:
        self.result, self.replies, self.skipped = result, replies, result.skipped
        self.succeeded = len(replies)
        self.train_loss = result.figures.get("train_loss")
        self.dp = {k: v for k, v in result.figures.items() if k != "train_loss"}


def round_throughput(clients: list[dict], seconds: float) -> dict[str, float | None]:
    """Device steps and tokens per wall second of the round, from the aggregated replies' own counts.

    ``clients``: the replies' figures (``steps``, ``tokens``; -1 where withheld). Null when no reply was
    aggregated, when the round took no time, or when any reply withheld its counts (a partial sum would
    understate the round): nothing is estimated from config.
    """
    steps = [c.get("steps", -1) for c in clients]
    tokens = [c.get("tokens", -1) for c in clients]
    if not clients or seconds <= 0 or min(steps) < 0 or min(tokens) < 0:
        return {"device_steps_per_s": None, "tokens_per_s": None}
    return {"device_steps_per_s": round(sum(steps) / seconds, 4), "tokens_per_s": round(sum(tokens) / seconds, 1)}


def new_trail(cfg, randomness: str, user_dp=None) -> PrivacyTrail:
    """The trail before round 1: the plan's level at ε = 0 (the initial adapter depends on no data)."""
    return PrivacyTrail(sample_accountant=cfg.privacy.accountant, randomness=randomness,
                        planned_level="user" if user_dp else "sample" if cfg.privacy.enabled else "none",
                        sample_delta=cfg.privacy.delta if cfg.privacy.enabled else None,
                        user=user_dp.report() if user_dp else None)


class Recorder:
    def __init__(self, cfg, run, model, heldout, trail: PrivacyTrail, private_init: AdapterState | None = None,
                 info: dict | None = None, engine: str = "flower",
                 checkpoint_state: Callable[[], dict] | None = None):
        self.cfg, self.run, self.model, self.heldout, self.trail = cfg, run, model, heldout, trail
        self.private_init = private_init or {}  # split adapters: the global model's private part (zeros)
        self.info, self.engine = info, engine
        self.checkpoint_state = checkpoint_state or (lambda: {})
        self.sinks = Sinks(cfg, run.root)  # TensorBoard / MLflow when `tracking` turns them on

    def record(self, server_round: int, shared: AdapterState, stats: RoundStats) -> RoundResult:
        state = merge(shared, self.private_init)
        set_adapter_state(self.model, state)
        res = evaluate_chunks(self.model, self.heldout, self.cfg.train.eval_batch_size)
        if server_round > 0 and stats.result is not None and not stats.result.skipped:
            self.trail.observe(stats.result.applied, stats.replies)  # the label follows what ran
        privacy = self.trail.record_fields()
        extra = {"eval_accuracy": res.accuracy, **privacy, **stats.dp, "engine": self.engine,
                 "clients_failed": stats.failed, "clients_rejected": dict(stats.rejected),
                 "clients_declined": dict(stats.declined),
                 "aggregation": "+".join(m.name for m in stats.result.applied) if stats.result else "none",
                 "round_skipped": stats.skipped, "adapter_bytes": adapter_bytes(state)}
        if self.info is not None:
            extra.update(base_model_bytes_dense=self.info["base_bytes_dense"],
                         base_model_bytes=self.info["base_bytes"], quantization=self.info["quantization"])
        wall = round(time.perf_counter() - stats.started, 3)
        extra.update(round_throughput(stats.clients, wall), clients=stats.clients, **stats.extra)
        epsilon, delta = extra.pop("epsilon"), extra.pop("delta")
        result = RoundResult(round=server_round, clients_sampled=stats.sampled, clients_succeeded=stats.succeeded,
                             train_loss=stats.train_loss, eval_loss=res.loss, eval_perplexity=res.perplexity,
                             upload_bytes=stats.upload_bytes, wall_seconds=wall,
                             epsilon=epsilon, delta=delta, extra=extra)
        save_adapter(self.model, self.run.adapter(server_round), result, self.cfg, self.trail.guarantee(server_round))
        self.run.append_metrics(result.to_record())
        self.sinks.write(result.to_record())
        return result

    def checkpoint(self, server_round: int, **state) -> None:
        write_checkpoint(self.run, server_round, {**self.checkpoint_state(), **state,
                                                  "privacy_trail": self.trail.to_dict()})


def write_checkpoint(run, server_round: int, state: dict) -> None:
    """After each round, atomically (tmp + fsync + os.replace): the commit point of that round.

    It names the round and the global adapter (adapters/round-N, already written, with its sha256), plus
    the backend's ``state`` (strategy totals, the server's user-level ledger, the fleet clock, the registry,
    the privacy trail). A restart of the same command resumes at round N+1: records past N are dropped
    (``truncate_metrics``), so nothing is counted twice.
    """
    adapter = run.adapter(server_round) / "adapter_model.safetensors"
    data = {"round": server_round, "adapter": f"adapters/round-{server_round}",
            "adapter_sha256": hashlib.sha256(adapter.read_bytes()).hexdigest() if adapter.is_file() else None,
            **state}
    tmp = run.root / "checkpoint.json.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run.root / "checkpoint.json")


def read_checkpoint(run) -> dict | None:
    path = run.root / "checkpoint.json"
    return json.loads(path.read_text()) if path.is_file() else None


def truncate_metrics(run, last_round: int) -> int:
    """Drop metrics records past the checkpoint (a crash between a record and its checkpoint); return how many."""
    from fedtune.workspace import read_jsonl

    records = read_jsonl(run.metrics)
    keep = [r for r in records if r["round"] <= last_round]
    if len(keep) != len(records):
        tmp = run.metrics.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, run.metrics)
    return len(records) - len(keep)


def load_checkpoint_adapter(run, server_round: int, sha256: str | None = None) -> AdapterState:
    from safetensors.torch import load_file

    path = run.adapter(server_round) / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint names round {server_round} but {path} is missing")
    if sha256 and hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
        raise ValueError(f"{path} does not match the checkpoint's sha256; the run directory was changed after "
                         "the checkpoint was written")
    return {k: v.float() for k, v in load_file(str(path)).items()}
