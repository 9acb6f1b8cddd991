"""The server's user-level privacy ledger: state only (σ, q, rounds); ε comes from the pure functions."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fedtune.privacy.accounting import History, compute_epsilon

__all__ = ["UserLevelLedger"]

_FORMAT = 1


@dataclass(kw_only=True)
class UserLevelLedger:
    """What the server has spent: one ``(σ, q, rounds)`` entry per run of identical rounds."""

    delta: float
    accountant: str = "rdp"
    history: History = field(default_factory=list)
    target_epsilon: float | None = None  # the budget; None = unbounded (budget_left is always True)

    @property
    def rounds(self) -> int:
        return sum(int(n) for _, _, n in self.history)

    def record_round(self, noise_multiplier: float, sample_rate: float) -> None:
        """One more round at (σ, q); merges into the last entry when it is equal, as opacus does."""
        if not noise_multiplier >= 0 or not 0.0 < sample_rate <= 1.0:
            raise ValueError(
                f"record_round: expected noise_multiplier >= 0 and sample_rate in (0, 1], "
                f"got ({noise_multiplier!r}, {sample_rate!r})"
            )
        sigma, q = float(noise_multiplier), float(sample_rate)
        if self.history and self.history[-1][0] == sigma and self.history[-1][1] == q:
            self.history[-1] = (sigma, q, int(self.history[-1][2]) + 1)
        else:
            self.history.append((sigma, q, 1))

    def epsilon(self) -> float:
        """ε spent so far at this ledger's δ (0.0 before any round, inf after a round without noise)."""
        if any(s == 0 for s, _, _ in self.history):
            return math.inf
        return compute_epsilon(self.history, self.delta, self.accountant)

    def budget_left(self, next_round_sigma: float, sample_rate: float) -> bool:
        """Would one more round at (σ, q) keep ε within ``target_epsilon``?"""
        if self.target_epsilon is None:
            return True
        after = UserLevelLedger(delta=self.delta, accountant=self.accountant, history=list(self.history))
        after.record_round(next_round_sigma, sample_rate)
        return after.epsilon() <= self.target_epsilon

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form for the run checkpoint."""
        return {
            "format": _FORMAT,
            "accountant": self.accountant,
            "delta": float(self.delta),
            "target_epsilon": None if self.target_epsilon is None else float(self.target_epsilon),
            "history": [[float(s), float(q), int(n)] for s, q, n in self.history],
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> UserLevelLedger:
        missing = {"accountant", "delta", "history"} - set(raw)
        if missing:
            raise ValueError(
                f"UserLevelLedger.from_dict: checkpoint lacks {sorted(missing)}; expected what to_dict() wrote"
            )
        if raw.get("format", _FORMAT) != _FORMAT:
            raise ValueError(
                f"UserLevelLedger.from_dict: checkpoint format {raw['format']!r}, this fedtune reads {_FORMAT}"
            )
        target = raw.get("target_epsilon")
        return cls(
            accountant=str(raw["accountant"]),
            delta=float(raw["delta"]),
            target_epsilon=None if target is None else float(target),
            history=[(float(s), float(q), int(n)) for s, q, n in raw["history"]],
        )
