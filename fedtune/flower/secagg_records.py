"""Secure-aggregation messages <-> Flower records (message translation only; the protocol is
``fedtune.privacy.secagg``). Keys, ciphertexts and shares travel as bytes in a ConfigRecord; a masked input's
ring elements as an ArrayRecord (uint16/32/64, exactly as masked: the ring arithmetic needs every bit).
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedtune.privacy.secagg import (
    FieldQuantizer,
    KeyAdvert,
    MaskedInput,
    SealedShare,
    SecAggSetup,
    UnmaskReply,
    UnmaskRequest,
)

CONFIG_KEY, ARRAYS_KEY, VECTOR_KEY = "secagg", "secagg-masked", "y"

Message = SecAggSetup | KeyAdvert | dict[int, KeyAdvert] | list[SealedShare] | MaskedInput | UnmaskRequest | UnmaskReply


def setup_config(setup: SecAggSetup) -> dict:
    q = setup.quantizer
    return {"type": "setup", "context": setup.context, "cohort": list(setup.cohort), "k": setup.num_neighbours,
            "t": setup.threshold, "length": setup.vector_length, "range": float(q.clip_range), "bits": q.bits,
            "summands": q.max_summands}


def setup_from_config(cfg) -> SecAggSetup:
    return SecAggSetup(bytes(cfg["context"]), tuple(int(c) for c in cfg["cohort"]), int(cfg["k"]), int(cfg["t"]),
                       int(cfg["length"]), FieldQuantizer(float(cfg["range"]), int(cfg["bits"]), int(cfg["summands"])))


def to_record(msg: Message) -> RecordDict:
    if isinstance(msg, SecAggSetup):
        cfg = setup_config(msg)
    elif isinstance(msg, dict):  # a client's neighbours' adverts
        cfg = {"type": "adverts", "cid": list(msg), "enc": [a.enc_public for a in msg.values()],
               "mask": [a.mask_public for a in msg.values()]}
    elif isinstance(msg, KeyAdvert):
        cfg = {"type": "advert", "cid": msg.cid, "enc": msg.enc_public, "mask": msg.mask_public}
    elif isinstance(msg, list):
        cfg = {"type": "shares", "src": [m.src for m in msg], "dst": [m.dst for m in msg],
               "sealed": [m.sealed for m in msg]}
    elif isinstance(msg, MaskedInput):
        return RecordDict({CONFIG_KEY: ConfigRecord({"type": "masked", "cid": msg.cid}),
                           ARRAYS_KEY: ArrayRecord({VECTOR_KEY: Array(msg.vector)})})
    elif isinstance(msg, UnmaskRequest):
        cfg = {"type": "unmask-request", "survivors": list(msg.survivors), "dropped": list(msg.dropped)}
    elif isinstance(msg, UnmaskReply):
        cfg = {"type": "unmask-reply", "cid": msg.cid,
               "seed-owners": list(msg.seed_shares), "seed-shares": list(msg.seed_shares.values()),
               "key-owners": list(msg.key_shares), "key-shares": list(msg.key_shares.values())}
    else:
        raise TypeError(f"not a secure-aggregation message: {type(msg).__name__}")
    return RecordDict({CONFIG_KEY: ConfigRecord(cfg)})


def from_record(record: RecordDict) -> Message:
    if CONFIG_KEY not in record:
        raise ValueError(f"a secure-aggregation message needs a ConfigRecord under {CONFIG_KEY!r}; "
                         f"got records {sorted(record)}")
    cfg = record[CONFIG_KEY]
    kind = cfg.get("type")
    if kind == "setup":
        return setup_from_config(cfg)
    if kind == "adverts":
        return {int(c): KeyAdvert(int(c), bytes(e), bytes(m)) for c, e, m in zip(cfg["cid"], cfg["enc"], cfg["mask"])}
    if kind == "advert":
        return KeyAdvert(int(cfg["cid"]), bytes(cfg["enc"]), bytes(cfg["mask"]))
    if kind == "shares":
        return [SealedShare(int(s), int(d), bytes(b)) for s, d, b in zip(cfg["src"], cfg["dst"], cfg["sealed"])]
    if kind == "masked":
        return MaskedInput(int(cfg["cid"]), record[ARRAYS_KEY][VECTOR_KEY].numpy())
    if kind == "unmask-request":
        return UnmaskRequest(tuple(int(c) for c in cfg["survivors"]), tuple(int(c) for c in cfg["dropped"]))
    if kind == "unmask-reply":
        return UnmaskReply(int(cfg["cid"]), dict(zip(map(int, cfg["seed-owners"]), map(bytes, cfg["seed-shares"]))),
                           dict(zip(map(int, cfg["key-owners"]), map(bytes, cfg["key-shares"]))))
    raise ValueError(f"unknown secure-aggregation message type {kind!r}; expected setup, advert, adverts, shares, "
                     "masked, "
                     "unmask-request or unmask-reply")


def record_bytes(record: RecordDict) -> int:
    """Serialized size of a record (protobuf), what crosses the wire inside a Flower message."""
    from flwr.common.serde import recorddict_to_proto

    return len(recorddict_to_proto(record).SerializeToString())
