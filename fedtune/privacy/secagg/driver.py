"""An in-process SecAgg+ round: a cohort of clients and one server exchange the four stages' messages
through this driver (the transport a Flower adapter would replace), with scheduled dropouts, and the
driver measures what each stage costs in bytes and seconds.

    0. advertise keys   clients -> server: KeyAdvert        server -> clients: neighbours' adverts
    1. share keys       clients -> server: SealedShare[]    server -> clients: their inbox of shares
    2. masked input     clients -> server: MaskedInput      server -> clients: UnmaskRequest
    3. unmask           clients -> server: UnmaskReply      server: the survivors' sum
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence, TypeVar

import numpy as np

from fedtune.privacy.secagg.client import SecAggClient
from fedtune.privacy.secagg.field import FieldQuantizer
from fedtune.privacy.secagg.messages import SecAggSetup
from fedtune.privacy.secagg.server import SecAggServer

STAGES = ("advertise keys", "share keys", "masked input", "unmask")
M = TypeVar("M")


def _same(message: M) -> M:
    return message


@dataclass(frozen=True)
class Dropouts:
    """Clients that vanish before a stage (and never come back this round)."""

    before_share_keys: frozenset[int] = frozenset()
    before_masked_input: frozenset[int] = frozenset()
    before_unmask: frozenset[int] = frozenset()


@dataclass
class StageCost:
    uplink_bytes: int = 0  # all clients -> server
    downlink_bytes: int = 0  # server -> all clients
    client_seconds: float = 0.0  # summed over clients
    server_seconds: float = 0.0


@dataclass
class SecAggOutcome:
    total: np.ndarray  # [n] float64: the sum of the survivors' (quantized) inputs
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    server: SecAggServer  # for inspection: what the server held
    costs: dict[str, StageCost] = field(default_factory=dict)


def make_setup(cohort: Sequence[int], vector_length: int, clip_range: float, *, bits: int = 8,
               num_neighbours: int | None = None, threshold: float = 0.5, context: bytes = b"") -> SecAggSetup:
    """A setup with SecAgg+'s usual sizes: k = num_neighbours (default: everyone, i.e. SecAgg) and
    t = the smallest integer above ``threshold`` * k, kept in k//2 + 1 .. k."""
    n = len(cohort)
    k = n - 1 if num_neighbours is None or num_neighbours >= n - 1 else num_neighbours
    t = min(k, max(k // 2 + 1, math.floor(threshold * k) + 1))
    return SecAggSetup(context, tuple(cohort), k, t, vector_length, FieldQuantizer(clip_range, bits, n))


def run_secure_aggregation(setup: SecAggSetup, updates: dict[int, np.ndarray], dropouts: Dropouts = Dropouts(),
                           rng: np.random.Generator | None = None,
                           transport: Callable[[M], M] = _same, auth=None) -> SecAggOutcome:
    """Run the four stages for ``updates`` (client id -> float vector); raises ``SecAggAbort`` when too many drop.

    ``transport`` carries every message (a KeyAdvert, a client's list of SealedShares, a MaskedInput, the
    UnmaskRequest, an UnmaskReply) from sender to receiver; the default hands it over as is, a Flower adapter
    can encode it into a record and decode it back (``fedtune.flower.secagg_records``).

    ``auth`` (``fedtune.privacy.secagg.identity.AdvertAuth``): each client signs its key advert with its
    registered ed25519 identity key and verifies its neighbours' before sealing shares (a server that
    substitutes a key makes the round abort with ``SecAggAbort``)."""
    costs = {s: StageCost() for s in STAGES}
    server = SecAggServer(setup)
    clients = {c: SecAggClient(c, setup) for c in setup.cohort}
    if auth is not None:
        clients = {c: auth.client(client) for c, client in clients.items()}

    def timed(stage: str, who: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        setattr(costs[stage], who, getattr(costs[stage], who) + time.perf_counter() - t0)
        return out

    adverts = [transport(timed(STAGES[0], "client_seconds", c.advertise)) for c in clients.values()]
    costs[STAGES[0]].uplink_bytes = sum(a.nbytes() for a in adverts)
    peers = timed(STAGES[0], "server_seconds", server.collect_adverts, adverts)
    peers = {u: {v: transport(a) for v, a in p.items()} for u, p in peers.items()}
    costs[STAGES[0]].downlink_bytes = sum(a.nbytes() for p in peers.values() for a in p.values())

    live = [c for c in peers if c not in dropouts.before_share_keys]
    batches = [transport(timed(STAGES[1], "client_seconds", clients[c].share_keys, peers[c])) for c in live]
    costs[STAGES[1]].uplink_bytes = sum(m.nbytes() for b in batches for m in b)
    inbox = timed(STAGES[1], "server_seconds", server.route_shares, batches)
    inbox = {u: transport(msgs) for u, msgs in inbox.items()}
    costs[STAGES[1]].downlink_bytes = sum(m.nbytes() for msgs in inbox.values() for m in msgs)

    live = [c for c in inbox if c not in dropouts.before_masked_input]
    inputs = [transport(timed(STAGES[2], "client_seconds", clients[c].masked_input, updates[c], inbox[c], rng))
              for c in live]
    costs[STAGES[2]].uplink_bytes = sum(m.nbytes() for m in inputs)
    request = timed(STAGES[2], "server_seconds", server.collect_masked, inputs)
    del inputs  # the server keeps only their sum
    live = [c for c in request.survivors if c not in dropouts.before_unmask]
    costs[STAGES[2]].downlink_bytes = request.nbytes() * len(live)

    replies = [transport(timed(STAGES[3], "client_seconds", clients[c].unmask, transport(request))) for c in live]
    costs[STAGES[3]].uplink_bytes = sum(r.nbytes() for r in replies)
    total = timed(STAGES[3], "server_seconds", server.unmask, replies)
    return SecAggOutcome(total, server.survivors, server.dropped, server, costs)
