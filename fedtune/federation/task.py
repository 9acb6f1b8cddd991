"""The task planner's output: what one device is asked to do in a round, typed (no untyped dicts).

``TaskPlan`` is what the server decides (``plan_task``): the round, the device, its steps, batch size,
learning rate and, in a fleet, its tier's LoRA rank / alpha / base quantization and the round deadline.
It crosses the wire as flat ``key: value`` pairs (``to_wire`` / ``from_wire``; a Flower ConfigRecord in
``fedtune.flower``). The device turns it into its training ``ClientTask`` with its own random streams
(``fedtune.federation.seeds.task_seeds``): the server never sends a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.types import ClientTask


@dataclass(frozen=True)
class TaskPlan:
    server_round: int
    local_steps: int
    batch_size: int
    lr: float
    device: int | None = None  # fleet simulations: the device this task is for (else the node's own)
    rank: int | None = None  # None: the configured adapter rank
    alpha: float | None = None
    quantization: str | None = None  # None: the configured base quantization
    deadline_s: float | None = None

    def to_wire(self) -> dict[str, int | float | str]:
        out: dict[str, int | float | str] = {"server-round": self.server_round, "local-steps": self.local_steps,
                                             "batch-size": self.batch_size, "lr": float(self.lr)}
        optional = {"device-index": self.device, "rank": self.rank, "alpha": self.alpha,
                    "quantization": self.quantization, "deadline-s": self.deadline_s}
        out.update({k: v for k, v in optional.items() if v is not None})
        return out

    @classmethod
    def from_wire(cls, config) -> "TaskPlan":
        def get(key, cast):
            return cast(config[key]) if key in config else None

        try:
            return cls(server_round=int(config["server-round"]), local_steps=int(config["local-steps"]),
                       batch_size=int(config["batch-size"]), lr=float(config["lr"]), device=get("device-index", int),
                       rank=get("rank", int), alpha=get("alpha", float), quantization=get("quantization", str),
                       deadline_s=get("deadline-s", float))
        except KeyError as err:
            raise ValueError(f"the server's task lacks {err.args[0]!r}; expected server-round, local-steps, "
                             "batch-size and lr (is the server running another fedtune version?)") from None

    def training_task(self, sampling_seed: int, noise_seed: int, streams: tuple | None = None) -> ClientTask:
        """The device's local training of this plan, with the device's own two random streams (``streams``:
        its secret (sampling, noise) CSPRNG streams on a deployed device)."""
        return ClientTask(server_round=self.server_round, local_steps=self.local_steps, batch_size=self.batch_size,
                          lr=self.lr, seed=sampling_seed, noise_seed=noise_seed, streams=streams)


def plan_task(cfg, server_round: int, device_plan=None, device: int | None = None) -> TaskPlan:
    """The server's task for a device: the config's training settings, or a fleet tier's plan
    (``fedtune.fleet.plan_device``: rank, alpha, quantization, steps and batch its profile allows)."""
    t = cfg.train
    if device_plan is None:
        return TaskPlan(server_round, t.local_steps, t.batch_size, t.lr, device=device)
    return TaskPlan(server_round, device_plan.local_steps, device_plan.batch_size, t.lr, device=device,
                    rank=device_plan.rank, alpha=float(device_plan.alpha), quantization=device_plan.quantization,
                    deadline_s=cfg.fleet.deadline_s)
