"""The few typed objects that flow between modules."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# name -> tensor, adapter tensors only (peft's get_peft_model_state_dict keys)
AdapterState = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientData:
    """One user's tokenized data: fixed-length chunks of token ids."""

    user_id: str
    train: torch.Tensor  # [N, T] int64
    heldout: torch.Tensor  # [M, T] int64

    @property
    def num_train(self) -> int:
        return int(self.train.shape[0])


@dataclass(frozen=True)
class ClientTask:
    """One device's local training of a round: the server's plan plus the device's own random streams.

    ``seed`` drives the batch sampler (Poisson under DP-SGD), ``noise_seed`` the DP-SGD noise: two
    independent streams (``fedtune.federation.seeds``). A deployed device draws both from its own secret
    seeds; a simulation derives them from the run seed. Without ``noise_seed`` the noise stream is the
    named stream ``task.noise`` of ``Seeds.simulated(seed)``, never the sampler's own stream.
    ``streams`` (a deployed device: ``fedtune.federation.seeds.task_streams``), when set, are the
    (sampling, noise) CSPRNG streams (``fedtune.privacy.csprng.RandomStream``) training draws from instead
    of torch generators seeded with ``seed`` / ``noise_seed``.
    """

    server_round: int
    local_steps: int
    batch_size: int
    lr: float
    seed: int
    noise_seed: int | None = None
    streams: tuple | None = field(default=None, compare=False, repr=False)  # (sampling, noise) RandomStreams

    def __post_init__(self) -> None:
        if self.noise_seed is None:
            from fedtune.federation.seeds import Seeds

            object.__setattr__(self, "noise_seed", Seeds.simulated(self.seed).derive("task.noise"))


@dataclass(frozen=True)
class ClientUpdate:
    """What a device sends back: its adapter after local training and how it got there."""

    adapter: AdapterState
    num_examples: int
    train_loss: float
    epsilon: float | None = None  # sample-level epsilon spent by this client so far
    delta: float | None = None
    steps: int = 0
    tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    noise_generator: str | None = None  # the name of the stream DP-SGD's noise came from (None without DP)


@dataclass(frozen=True)
class RoundResult:
    """One round as recorded in metrics.jsonl."""

    round: int
    clients_sampled: int
    clients_succeeded: int
    train_loss: float | None
    eval_loss: float
    eval_perplexity: float
    upload_bytes: int
    wall_seconds: float
    epsilon: float | None = None
    delta: float | None = None
    extra: dict[str, float] = field(default_factory=dict)

    def to_record(self) -> dict[str, object]:
        rec: dict[str, object] = {
            "round": self.round,
            "clients_sampled": self.clients_sampled,
            "clients_succeeded": self.clients_succeeded,
            "train_loss": self.train_loss,
            "eval_loss": self.eval_loss,
            "eval_perplexity": self.eval_perplexity,
            "upload_bytes": self.upload_bytes,
            "wall_seconds": self.wall_seconds,
        }
        if self.epsilon is not None:
            rec["epsilon"] = self.epsilon
            rec["delta"] = self.delta
        rec.update(self.extra)
        return rec
