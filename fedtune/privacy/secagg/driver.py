"""The server's stage driver of a SecAgg+ round, one for every backend: ``drive_secure_aggregation`` runs the
four stages through a ``StageTransport`` (send each client its stage request, return the replies of those that
answered; a client that does not answer has dropped out) and measures what each stage costs in bytes and
seconds. ``LocalClients`` is the in-process transport (clients as objects, with scheduled dropouts); the Flower
backend's carries each request as a message to a device (``fedtune.flower.secagg_grid``).

    stage            server -> client (request)               client -> server (reply)
    advertise keys   SecAggSetup (the round's public setup)   KeyAdvert
    share keys       its neighbours' KeyAdverts               SealedShare[] (one per neighbour)
    masked input     its inbox of SealedShares                MaskedInput
    unmask           UnmaskRequest                            UnmaskReply      -> server: the survivors' sum
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, TypeVar

import numpy as np

from fedtune.privacy.secagg.client import SecAggClient
from fedtune.privacy.secagg.field import FieldQuantizer
from fedtune.privacy.secagg.messages import ID_BYTES, SecAggAbort, SecAggSetup
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
    client_seconds: float = 0.0  # time in the transport: the clients' work in process, the round trip on Flower
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


class StageTransport(Protocol):
    def __call__(self, stage: str, requests: dict[int, object]) -> dict[int, object]:
        """Send each client id its request for ``stage`` (one of ``STAGES``); the replies of those that answered."""
        ...


def nbytes(msg) -> int:
    """A message's size on the wire (lists and dicts of messages: the sum; a setup: ids and sizes)."""
    if isinstance(msg, SecAggSetup):
        return ID_BYTES * (len(msg.cohort) + 6) + len(msg.context)
    if isinstance(msg, dict):
        return sum(nbytes(m) for m in msg.values())
    if isinstance(msg, list):
        return sum(nbytes(m) for m in msg)
    return msg.nbytes()


def drive_secure_aggregation(setup: SecAggSetup, transport: StageTransport) -> SecAggOutcome:
    """The server's side of one round; raises ``SecAggAbort`` when too many clients drop out."""
    costs = {s: StageCost() for s in STAGES}
    server = SecAggServer(setup)

    def exchange(stage: str, requests: dict[int, object]) -> dict[int, object]:
        t0 = time.perf_counter()
        replies = transport(stage, requests)
        cost = costs[stage]
        cost.client_seconds += time.perf_counter() - t0
        cost.downlink_bytes += sum(nbytes(m) for m in requests.values())
        cost.uplink_bytes += sum(nbytes(m) for m in replies.values())
        return {c: m for c, m in replies.items() if c in requests}

    def serve(stage: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        costs[stage].server_seconds += time.perf_counter() - t0
        return out

    adverts = exchange(STAGES[0], {c: setup for c in setup.cohort})
    peers = serve(STAGES[0], server.collect_adverts, [a for c, a in adverts.items() if a.cid == c])
    batches = exchange(STAGES[1], peers)
    for c, batch in batches.items():
        if any(m.src != c for m in batch):
            raise SecAggAbort(f"secure aggregation: client {c} sent shares in another client's name")
    inbox = serve(STAGES[1], server.route_shares, [b for b in batches.values() if b])
    inputs = exchange(STAGES[2], inbox)
    request = serve(STAGES[2], server.collect_masked, [m for c, m in inputs.items() if m.cid == c])
    del inputs  # the server keeps only their sum
    replies = exchange(STAGES[3], {c: request for c in request.survivors})
    total = serve(STAGES[3], server.unmask, [r for c, r in replies.items() if r.cid == c])
    return SecAggOutcome(total, server.survivors, server.dropped, server, costs)


class LocalClients:
    """The in-process transport: one ``SecAggClient`` per id, created when its setup arrives; ``dropouts``
    vanish before their stage; ``codec`` carries every message both ways (e.g. through Flower records)."""

    def __init__(self, updates: dict[int, np.ndarray], dropouts: Dropouts = Dropouts(),
                 rng: np.random.Generator | None = None, codec: Callable[[M], M] = _same, auth=None):
        self.updates, self.dropouts, self.rng, self.codec = updates, dropouts, rng, codec
        self.auth = auth  # fedtune.privacy.secagg.identity.AdvertAuth: signed, verified key adverts
        self.clients: dict[int, SecAggClient] = {}

    def __call__(self, stage: str, requests: dict[int, object]) -> dict[int, object]:
        gone = {STAGES[1]: self.dropouts.before_share_keys, STAGES[2]: self.dropouts.before_masked_input,
                STAGES[3]: self.dropouts.before_unmask}.get(stage, frozenset())
        out = {}
        for c, request in requests.items():
            if c in gone or (stage != STAGES[0] and c not in self.clients):
                self.clients.pop(c, None)  # a client that vanished never comes back this round
                continue
            out[c] = self.codec(self._answer(c, stage, self.codec(request)))
        return out

    def _answer(self, c: int, stage: str, request):
        if stage == STAGES[0]:
            client = SecAggClient(c, request)
            self.clients[c] = self.auth.client(client) if self.auth is not None else client
            return self.clients[c].advertise()
        client = self.clients[c]
        if stage == STAGES[1]:
            return client.share_keys(request)
        if stage == STAGES[2]:
            return client.masked_input(self.updates[c], request, self.rng)
        return client.unmask(request)


def run_secure_aggregation(setup: SecAggSetup, updates: dict[int, np.ndarray], dropouts: Dropouts = Dropouts(),
                           rng: np.random.Generator | None = None,
                           transport: Callable[[M], M] = _same, auth=None) -> SecAggOutcome:
    """A round in process for ``updates`` (client id -> float vector): ``drive_secure_aggregation`` over
    ``LocalClients``; raises ``SecAggAbort`` when too many drop.

    ``transport`` carries every message (a KeyAdvert, a client's neighbours' adverts or list of SealedShares,
    a MaskedInput, the UnmaskRequest, an UnmaskReply) from sender to receiver; the default hands it over as
    is, ``fedtune.flower.secagg_records`` can encode it into a record and decode it back.

    ``auth`` (``fedtune.privacy.secagg.identity.AdvertAuth``): each client signs its key advert with its
    registered ed25519 identity key and verifies its neighbours' before sealing shares (a server that
    substitutes a key makes the round abort with ``SecAggAbort``)."""
    return drive_secure_aggregation(setup, LocalClients(updates, dropouts, rng, transport, auth))
