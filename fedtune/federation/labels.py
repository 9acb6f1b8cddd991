"""The privacy label of the global adapter, from the mechanisms that ran (never from the config).

``PrivacyTrail`` follows a run round by round. Each training round feeds it the round's ``Aggregated.applied``
(the server side: did user-level DP-FedAvg run, with which ledger) and the replies that went into the
aggregate (the device side: each device's own ledger ε, or none when it trained without DP-SGD). The
adapter after round t depends on every earlier round, so a level holds only if its mechanism ran in every
training round so far:

* ``user``: DP-FedAvg ran in every round; ε, δ from its ledger (the server's accountant);
* ``sample``: every aggregated reply of every round came from DP-SGD; ε is the largest device ε reported
  so far (each device's own cumulative ledger), δ the devices' δ;
* ``none`` otherwise.

Secure aggregation is reported beside the level (``secure_aggregation``) when every training round was
aggregated through SecAgg+ (``secure_round``; an aborted one revealed nothing and counts as zero under
user-level DP); one plain round and it is not.

Round 0 (the seeded initial adapter) depends on no data: any level holds with ε = 0; the trail reports the
level the config plans, with ε = 0, until a training round says otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from fedtune.federation.aggregate import Mechanism, Reply

USER_MECHANISM = "DP-FedAvg: per-device clipping + Gaussian noise, Poisson-sampled devices"
SAMPLE_MECHANISM = "DP-SGD (opacus, Poisson sampling), per device"
SECURE_PROTOCOL = "SecAgg+ (masked sum; the server never held an individual update)"


@dataclass
class PrivacyTrail:
    sample_accountant: str | None = None
    randomness: str = "simulated"
    rounds: int = 0  # training rounds seen
    user_rounds: int = 0  # of which DP-FedAvg ran
    sample_rounds: int = 0  # of which every aggregated reply came from DP-SGD
    sample_epsilon: float = 0.0  # the largest device ε seen
    sample_epsilons: list[float] = field(default_factory=list)  # this round's
    sample_delta: float | None = None
    user: dict | None = None  # the last DP-FedAvg report
    planned_level: str = "none"
    secure_rounds: int = 0  # training rounds aggregated through secure aggregation
    secure: dict | None = None  # the last secure aggregation report

    def observe(self, applied: Sequence[Mechanism], replies: Sequence[Reply]) -> None:
        """One training round: what the server applied and which replies it aggregated."""
        self.rounds += 1
        user = next((m.report for m in applied if m.name == "user_level_dp"), None)
        if user is not None:
            self.user_rounds += 1
            self.user = user
        secure = next((m.report for m in applied if m.name == "secure_aggregation"), None)
        if secure is not None:  # an aborted round revealed nothing either (its sum counts as zero)
            self.secure_rounds += 1
            self.secure = secure
        eps = [r.epsilon for r in replies if r.epsilon is not None and r.epsilon >= 0]
        self.sample_epsilons = eps
        if len(eps) == len(replies):  # every aggregated update came from DP-SGD (vacuous for none)
            self.sample_rounds += 1
        if eps:
            self.sample_epsilon = max(self.sample_epsilon, *eps)
            self.sample_delta = next(r.delta for r in replies if r.epsilon is not None and r.epsilon >= 0)

    def restore(self, saved: dict | None) -> None:
        for k, v in (saved or {}).items():
            if hasattr(self, k):
                setattr(self, k, v)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("rounds", "user_rounds", "sample_rounds", "sample_epsilon",
                                              "sample_delta", "user", "planned_level", "secure_rounds",
                                              "secure")}

    @property
    def level(self) -> str:
        if self.rounds == 0:
            return self.planned_level
        if self.user is not None and self.user_rounds == self.rounds:
            return "user"
        if self.sample_delta is not None and self.sample_rounds == self.rounds:
            return "sample"
        return "none"

    def sample_guarantee(self) -> dict | None:
        if self.level == "none" or (self.rounds and self.sample_rounds != self.rounds) or (
                self.rounds == 0 and self.planned_level == "none"):
            return None
        if self.rounds and self.sample_delta is None:
            return None
        return {"level": "sample", "epsilon": self.sample_epsilon, "delta": self.sample_delta,
                "mechanism": SAMPLE_MECHANISM, "accountant": self.sample_accountant}

    @property
    def secure_aggregation(self) -> bool:
        """Every training round's sum came from secure aggregation (the server held no individual update)."""
        return self.rounds > 0 and self.secure_rounds == self.rounds

    def guarantee(self, server_round: int) -> dict:
        """The adapter's guarantee as fedtune.json and manifests carry it (with ``secure_aggregation`` when
        every training round's sum came from it)."""
        out = self._guarantee(server_round)
        if self.secure_aggregation:
            s = self.secure or {}
            out["secure_aggregation"] = {"protocol": SECURE_PROTOCOL, "rounds": self.secure_rounds,
                                         "bits": s.get("bits"), "threshold": s.get("threshold"),
                                         "neighbours": s.get("neighbours")}
        return out

    def _guarantee(self, server_round: int) -> dict:
        level, sample = self.level, self.sample_guarantee()
        if level == "user" and self.user is not None:
            u = self.user
            return {"level": "user", "epsilon": u["epsilon"], "delta": u["delta"], "mechanism": USER_MECHANISM,
                    "accountant": u["accountant"], "rounds": server_round, "clip_norm": u["clip_norm"],
                    "noise_multiplier": u["noise_multiplier"], "sampler": u["sampler"],
                    "noise_generator": u.get("noise_generator"), "sample_level": sample,
                    "randomness": self.randomness}
        if level == "user":  # round 0 of a planned user-level run: nothing trained yet
            return {"level": "user", "epsilon": 0.0, "delta": self.sample_delta, "mechanism": USER_MECHANISM,
                    "rounds": 0, "sample_level": sample, "randomness": self.randomness}
        if sample is not None:
            return dict(sample, rounds=server_round, randomness=self.randomness)
        return {"level": "none", "epsilon": None, "delta": None, "mechanism": None, "rounds": server_round,
                "randomness": self.randomness}

    def record_fields(self) -> dict:
        """The metrics.jsonl privacy fields of the round (``epsilon``/``delta`` follow the level)."""
        g = self.guarantee(0)
        sample = self.sample_guarantee()
        eps = self.sample_epsilons
        return {
            "epsilon": g["epsilon"], "delta": g["delta"], "privacy_level": g["level"],
            "sample_epsilon": sample["epsilon"] if sample else None,
            "sample_delta": sample["delta"] if sample else None,
            "sample_epsilon_mean": sum(eps) / len(eps) if eps else None,
            "randomness": self.randomness, "secure_aggregation": self.secure_aggregation,
        }
