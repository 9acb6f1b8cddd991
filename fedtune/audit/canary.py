"""The canary audit ("secret sharer", Carlini et al., 2019): does the released adapter remember a secret?

``run_canary_audit(cfg, audit)`` measures memorization of one client's rare secrets by the released
(final global) adapter of a short federated run, with or without DP-SGD:

1. Canaries: ``n_inserted + n_held_out`` distinct secrets of one format, ``prefix + k random digits``
   (e.g. "my secret code is 4 9 1 7 3 2"), drawn from a seeded RNG. Held-out ones are never trained on.
2. Insertion: ``repeats`` copies of each inserted canary go into ONE client's training chunks
   (``canary_client``). Each copy becomes its own chunk, in ``chunk_tokens``' layout (documents
   separated by EOS): a copy of one of that client's own chunks with ``EOS canary EOS`` written in at a
   seeded offset, so every copy lands whole, after an EOS. No other client, and no held-out split, gets any.
3. Training through the engine's in-process backend (``fedtune.federation.inprocess``, no Flower): R rounds of
   the same round as ``fedtune simulate`` (the run's sampler, device round, aggregation pipeline; user-level
   DP-FedAvg too when the config turns it on). With DP, each client runs sample-level DP-SGD (``privacy``
   section) and keeps its own ledger across rounds; the canary client's ε is reported.
4. Exposure under the final global adapter: each canary's log-perplexity of the secret given the prefix
   is ranked among ``n_candidates`` secrets of the same format (all 10^k of them when that is no more
   than ``n_candidates``); exposure = log2(N) - log2(rank). Inserted vs held-out canaries are summarized
   (mean, max, rank-1 rate); a model that remembers nothing gives both about 1.44 bits on average.

Everything is seeded: the same config and audit settings give the same exposures.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from fedtune.adapters import create_adapter
from fedtune.audit.exposure import exposure_of, secret_log_perplexities
from fedtune.config import ExperimentConfig
from fedtune.federation.seeds import Seeds
from fedtune.data import build_client_data
from fedtune.models import load_base_model, load_encoder
from fedtune.training import evaluate_chunks
from fedtune.types import ClientData

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CanaryAuditConfig:
    """What to insert, where, and how to rank it. ``None`` fields follow the experiment config."""

    prefix: str = "my secret code is "
    n_digits: int = 6
    n_inserted: int = 8
    n_held_out: int = 8
    repeats: int = 4
    canary_client: int = 0  # index into build_client_data's list
    n_candidates: int = 2000
    rounds: int | None = None  # None: federation.rounds
    dp: bool | None = None  # None: privacy.enabled
    user_level: bool | None = None  # None: privacy.user_level.enabled (DP-FedAvg on the server)
    seed: int | None = None  # None: the experiment seed
    score_batch_size: int = 256

    def __post_init__(self) -> None:
        problems = []
        for name in ("n_digits", "n_inserted", "n_held_out", "repeats", "score_batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.n_candidates < 2:
            problems.append(f"n_candidates: must be >= 2 to rank anything, got {self.n_candidates}")
        if self.canary_client < 0:
            problems.append(f"canary_client: must be a client index >= 0, got {self.canary_client}")
        if self.rounds is not None and self.rounds < 1:
            problems.append(f"rounds: must be >= 1 (or None for federation.rounds), got {self.rounds}")
        if 10**self.n_digits < self.n_inserted + self.n_held_out:
            problems.append(f"n_digits={self.n_digits} allows only {10**self.n_digits} distinct secrets, "
                            f"fewer than n_inserted + n_held_out = {self.n_inserted + self.n_held_out}")
        if problems:
            raise ValueError("canary audit settings: " + "; ".join(problems))


# --- 1. canaries and candidates ---------------------------------------------------------------------

def format_secret(digits: int, n_digits: int) -> str:
    """12345, 6 -> '0 1 2 3 4 5' (space-separated, zero-padded)."""
    return " ".join(f"{digits:0{n_digits}d}")


def make_canaries(audit: CanaryAuditConfig, seed: int) -> tuple[list[str], list[str]]:
    """(inserted secrets, held-out secrets): distinct, same format, from a seeded RNG."""
    rng = Seeds.simulated(seed).rng("canary.secrets")
    picks = rng.sample(range(10**audit.n_digits), audit.n_inserted + audit.n_held_out)
    secrets = [format_secret(d, audit.n_digits) for d in picks]
    return secrets[: audit.n_inserted], secrets[audit.n_inserted :]


def candidate_secrets(audit: CanaryAuditConfig, canaries: list[str], seed: int) -> tuple[list[str], bool]:
    """The pool canaries are ranked against, and whether it is the whole space of 10^k secrets.

    Whole space when 10^k <= n_candidates (+ the canaries), else n_candidates - 1 random secrets that
    are none of the canaries, so every canary is ranked among exactly N = n_candidates.
    """
    space = 10**audit.n_digits
    if space <= audit.n_candidates + len(canaries):
        return [format_secret(d, audit.n_digits) for d in range(space)], True
    rng = Seeds.simulated(seed).rng("canary.candidates")
    taken = set(canaries)
    draw = (format_secret(d, audit.n_digits) for d in rng.sample(range(space), audit.n_candidates - 1 + len(taken)))
    return list(itertools.islice((s for s in draw if s not in taken), audit.n_candidates - 1)), False


# --- 2. insertion -----------------------------------------------------------------------------------

def count_occurrences(chunks: torch.Tensor, ids: list[int]) -> int:
    """How many times the token sequence ``ids`` occurs whole inside a row of ``chunks`` [N, T]."""
    n = len(ids)
    if chunks.shape[0] == 0 or n > chunks.shape[1]:
        return 0
    windows = chunks.unfold(1, n, 1)  # [N, T-n+1, n]
    return int((windows == torch.tensor(ids, dtype=chunks.dtype)).all(-1).sum().item())


def insert_canaries(clients: list[ClientData], canary_ids: list[list[int]], client_index: int, repeats: int,
                    eos_token_id: int, seed: int) -> list[ClientData]:
    """The same clients, with ``repeats`` chunks per canary appended to one client's train split.

    Each canary chunk is a copy of one of that client's own training chunks with ``EOS canary EOS``
    written in at a seeded offset (the ``chunk_tokens`` layout: documents separated by EOS), so the
    copy is whole and follows an EOS as at scoring time. The client's chunks are then shuffled.
    """
    if not 0 <= client_index < len(clients):
        raise ValueError(f"canary_client={client_index}: the data has {len(clients)} clients (0..{len(clients) - 1})")
    target = clients[client_index]
    seq_len = int(target.train.shape[1])
    longest = max(len(ids) for ids in canary_ids) + 2
    if longest > seq_len:
        raise ValueError(f"a canary takes {longest} tokens with its two EOS, more than data.seq_len={seq_len}; "
                         "raise data.seq_len or shorten the prefix / n_digits")
    gen = Seeds.simulated(seed).generator("canary.insert")
    rows = []
    for ids in canary_ids:
        block = torch.tensor([eos_token_id, *ids, eos_token_id], dtype=torch.long)
        for _ in range(repeats):
            row = target.train[int(torch.randint(target.num_train, (1,), generator=gen))].clone()  # [T]
            offset = int(torch.randint(seq_len - len(block) + 1, (1,), generator=gen))
            row[offset : offset + len(block)] = block
            rows.append(row)
    train = torch.cat([target.train, torch.stack(rows)])  # [N + n_inserted * repeats, T]
    train = train[torch.randperm(train.shape[0], generator=gen)].contiguous()
    out = list(clients)
    out[client_index] = ClientData(user_id=target.user_id, train=train, heldout=target.heldout)
    return out


# --- results -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CanaryExposure:
    secret: str
    inserted: bool
    log_perplexity: float  # bits: -log2 Pr(secret | prefix) under the released adapter
    rank: int
    n_candidates: int
    exposure: float  # bits


@dataclass(frozen=True)
class ExposureSummary:
    n: int
    mean: float
    max: float
    min: float
    rank1_rate: float  # share of canaries that are the most likely of all N candidates

    @staticmethod
    def of(items: list[CanaryExposure]) -> ExposureSummary:
        e = [c.exposure for c in items]
        return ExposureSummary(n=len(e), mean=sum(e) / len(e), max=max(e), min=min(e),
                               rank1_rate=sum(c.rank == 1 for c in items) / len(items))


@dataclass(frozen=True)
class CanaryAuditResult:
    canaries: tuple[CanaryExposure, ...]
    inserted: ExposureSummary
    held_out: ExposureSummary
    exposure_gap: float  # mean exposure of inserted - held-out canaries, bits
    max_exposure: float  # log2(N): the exposure of a rank-1 canary
    whole_space: bool  # ranked among all 10^k secrets (exact) rather than a random sample
    dp: bool
    epsilon: float | None  # the canary client's sample-level ε after all rounds (None without DP)
    delta: float | None
    noise_multiplier: float | None
    train_loss: tuple[float, ...]  # per round, mean over the cohort
    eval_loss: float  # held-out loss of the released adapter (token-weighted over clients)
    wall_seconds: float
    settings: dict = field(default_factory=dict)  # audit settings, the canary client, the experiment config
    user_level: bool = False  # DP-FedAvg ran on the server (Poisson cohorts, clipping, noise on the sum)
    user_epsilon: float | None = None  # the run's user-level ε after all rounds (the server ledger's)
    user_delta: float | None = None
    user_noise_multiplier: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# --- 3. the federated run and 4. exposure ------------------------------------------------------------

def _privacy(cfg: ExperimentConfig, dp: bool):
    if not dp:
        return None
    return cfg.privacy if cfg.privacy.enabled else cfg.privacy.model_copy(update={"enabled": True})


def _eval_loss(model, clients: list[ClientData], cfg: ExperimentConfig) -> float:
    nll, tokens = 0.0, 0
    for c in clients:
        held = c.heldout[: cfg.train.eval_max_chunks]
        if held.shape[0]:
            res = evaluate_chunks(model, held, cfg.train.eval_batch_size)
            nll, tokens = nll + res.loss * res.tokens, tokens + res.tokens
    return nll / tokens if tokens else math.nan


def run_canary_audit(cfg: ExperimentConfig, audit: CanaryAuditConfig = CanaryAuditConfig()) -> CanaryAuditResult:
    """Insert canaries into one client, train federated, rank the canaries under the final adapter."""
    start = time.perf_counter()
    seed = cfg.seed if audit.seed is None else audit.seed
    dp = cfg.privacy.enabled if audit.dp is None else audit.dp
    user = cfg.privacy.user_level.enabled if audit.user_level is None else audit.user_level
    privacy = _privacy(cfg, dp)
    rounds = audit.rounds or cfg.federation.rounds
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)

    # 1-2. canaries into one client's training chunks
    encoder = load_encoder(cfg.model)
    inserted, held_out = make_canaries(audit, seed)
    canary_ids = [encoder.encode(audit.prefix + s) for s in inserted]
    clients = build_client_data(cfg.data, encoder, seed)
    clients = insert_canaries(clients, canary_ids, audit.canary_client, audit.repeats, encoder.eos_token_id, seed)

    # 3. federated training through the engine's in-process backend (same sampler, device round, pipeline)
    import tempfile

    from fedtune.federation.inprocess import run_inprocess
    from fedtune.privacy import LedgerStore
    from fedtune.workspace import RunDir

    base, _ = load_base_model(cfg.model)
    model = create_adapter(base, cfg.adapter, seed)
    run_privacy = privacy if privacy is not None else cfg.privacy.model_copy(update={"enabled": False})
    run_privacy = run_privacy.model_copy(update={
        "user_level": cfg.privacy.user_level.model_copy(update={"enabled": user})})
    run_cfg = cfg.model_copy(update={
        "seed": seed, "privacy": run_privacy, "federation": cfg.federation.model_copy(update={"rounds": rounds})})
    noise = None

    def _progress(r, user_id, update):
        nonlocal noise
        if user_id == clients[audit.canary_client].user_id and dp:
            noise = update.metrics.get("noise_multiplier")

    with tempfile.TemporaryDirectory(prefix="fedtune-canary-") as tmp:
        run = RunDir.create(tmp)
        records = run_inprocess(run_cfg, model, clients, run, progress=_progress)
        losses = [r["train_loss"] for r in records[1:]]
        last = records[-1]
        target_id = clients[audit.canary_client].user_id
        ledger = LedgerStore(run.ledgers).load(target_id, cfg.privacy.accountant) if dp else None
    for r, loss in enumerate(losses, 1):
        log.info("canary audit round %d/%d: train loss %s", r, rounds, loss)
    # the model holds the released (last) global adapter: run_inprocess evaluated it last

    # 4. exposure of every canary under the released adapter
    pool, whole_space = candidate_secrets(audit, inserted + held_out, seed)
    canaries = inserted + held_out
    scores = secret_log_perplexities(model, encoder, audit.prefix, canaries, audit.score_batch_size)
    pool_scores = secret_log_perplexities(model, encoder, audit.prefix, pool, audit.score_batch_size)
    index = {s: j for j, s in enumerate(pool)}
    results = []
    for j, secret in enumerate(canaries):
        others = pool_scores
        if secret in index:  # whole space: rank against every secret but itself
            others = torch.cat([pool_scores[: index[secret]], pool_scores[index[secret] + 1 :]])
        e = exposure_of(float(scores[j]), others)
        results.append(CanaryExposure(secret=secret, inserted=j < len(inserted), log_perplexity=float(scores[j]),
                                      rank=e.rank, n_candidates=e.n_candidates, exposure=e.exposure))
    ins = ExposureSummary.of(results[: len(inserted)])
    held = ExposureSummary.of(results[len(inserted) :])
    target = clients[audit.canary_client]
    epsilon = ledger.epsilon(cfg.privacy.delta) if ledger is not None and ledger.history else (0.0 if dp else None)
    settings = {
        "audit": {**asdict(audit), "rounds": len(losses), "dp": dp, "user_level": user, "seed": seed},
        "canary_client": {"index": audit.canary_client, "user_id": target.user_id,
                          "train_chunks": target.num_train, "canary_chunks": len(inserted) * audit.repeats},
        "clients": len(clients),
        "experiment": cfg.to_dict(),
    }
    return CanaryAuditResult(
        canaries=tuple(results), inserted=ins, held_out=held, exposure_gap=ins.mean - held.mean,
        max_exposure=math.log2(results[0].n_candidates), whole_space=whole_space, dp=dp, epsilon=epsilon,
        delta=cfg.privacy.delta if dp else None, noise_multiplier=noise, train_loss=tuple(losses),
        eval_loss=_eval_loss(model, clients, cfg), wall_seconds=time.perf_counter() - start, settings=settings,
        user_level=user, user_epsilon=last.get("epsilon") if user else None,
        user_delta=last.get("delta") if user else None,
        user_noise_multiplier=last.get("user_noise_multiplier") if user else None,
    )


def format_result(result: CanaryAuditResult, per_canary: bool = False) -> str:
    """A small plain-text table: exposure of inserted vs held-out canaries, ε, δ."""
    a = result.settings.get("audit", {})
    eps = "-" if result.epsilon is None else f"{result.epsilon:.2f}"
    delta = "-" if result.delta is None else f"{result.delta:g}"
    noise = "" if result.noise_multiplier is None else f", noise multiplier {result.noise_multiplier:.3g}"
    space = "all" if result.whole_space else "random"
    user = "user-level DP off"
    if result.user_level:
        user = (f"user-level DP on (ε={result.user_epsilon:.2f}, δ={result.user_delta:g}, "
                f"noise multiplier {result.user_noise_multiplier:.3g})")
    lines = [
        f"canary audit: DP {'on' if result.dp else 'off'} (ε={eps}, δ={delta}{noise}), {user}, "
        f"{a.get('rounds', '?')} rounds, {a.get('repeats', '?')} copies per inserted canary",
        f"ranked among N={result.canaries[0].n_candidates} ({space}) secrets: exposure 0..{result.max_exposure:.2f} "
        "bits, ~1.44 when nothing is remembered",
        "",
        f"{'canaries':<10} {'n':>3} {'mean exp.':>10} {'max exp.':>9} {'min exp.':>9} {'rank-1':>7}",
    ]
    for name, s in (("inserted", result.inserted), ("held-out", result.held_out)):
        lines.append(f"{name:<10} {s.n:>3} {s.mean:>10.2f} {s.max:>9.2f} {s.min:>9.2f} {s.rank1_rate:>7.0%}")
    lines += ["", f"exposure gap (mean inserted - held-out): {result.exposure_gap:+.2f} bits; "
                  f"held-out loss {result.eval_loss:.3f}; {result.wall_seconds:.0f} s"]
    if per_canary:
        lines += ["", f"{'secret':<24} {'inserted':>8} {'log-ppl':>8} {'rank':>6} {'exposure':>8}"]
        for c in result.canaries:
            lines.append(f"{c.secret:<24} {'yes' if c.inserted else 'no':>8} {c.log_perplexity:>8.2f} "
                         f"{c.rank:>6} {c.exposure:>8.2f}")
    return "\n".join(lines)
