"""What a device's reply reports beside its upload: only what aggregation needs, unless configured.

``federation.reply_figures``:

* ``exact``: every figure as measured (the example count, train loss, tokens, steps, seconds): what
  simulations report per device in metrics.jsonl (``clients``) and how the round's ``train_loss`` is made.
* ``minimal``: the reply carries what aggregation and the label need and nothing else: the example count
  **bucketed** down to a power of two (the FedAvg weight; the server learns only ⌊log2 n⌋, and nothing
  at all of it is used under user-level DP, whose mean is unweighted), the rank (fleets), the device's own
  ε and δ (the label; they follow from public settings and the rounds the server itself sampled it for) and a
  fleet simulation's simulated seconds. Train loss, tokens, steps and seconds are withheld (-1), so the
  round's ``train_loss`` is null.
* ``auto`` (default): ``exact`` in simulations (the server is the simulator; nothing to protect),
  ``minimal`` on deployed devices.
"""

from __future__ import annotations

import math

from fedtune.types import ClientUpdate

WITHHELD = -1.0


def bucket_examples(n: int) -> int:
    """The largest power of two <= n (n >= 1): the coarse FedAvg weight a minimal reply carries (rounded
    down, so it never exceeds the device's true count or the server's bound on it)."""
    return 1 if n <= 1 else 2 ** int(math.floor(math.log2(n)))


def resolve(policy: str, deployed: bool) -> str:
    if policy not in ("auto", "exact", "minimal"):
        raise ValueError(f"federation.reply_figures must be auto, exact or minimal, got {policy!r}")
    return ("minimal" if deployed else "exact") if policy == "auto" else policy


def reply_figures(update: ClientUpdate, policy: str, *, device: int, rank: int, partition: int = -1,
                  seconds: float = WITHHELD, sim_seconds: float = WITHHELD) -> dict[str, float | int]:
    """The reply's figures under a resolved policy (every key present either way)."""
    exact = policy == "exact"
    return {
        "partition": int(partition) if exact else -1,
        "device": int(device),
        "rank": int(rank),
        "sim-seconds": float(sim_seconds),
        "num-examples": int(update.num_examples) if exact else bucket_examples(update.num_examples),
        "train-loss": float(update.train_loss) if exact else WITHHELD,
        "epsilon": float(update.epsilon if update.epsilon is not None else -1.0),
        "delta": float(update.delta if update.delta is not None else -1.0),
        "steps": int(update.steps) if exact else -1,
        "tokens": int(update.tokens) if exact else -1,
        "train-seconds": float(seconds) if exact else WITHHELD,
    }
