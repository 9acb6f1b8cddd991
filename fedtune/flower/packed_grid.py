"""Server side of packed training: a Grid wrapper that sends one message per *group* of devices and
hands the strategy one reply per device, as if every device had trained on its own node.

    strategy.configure_train -> one train message per device (unchanged strategy)
      PackedGrid.send_and_receive:
        1. give each message the device index of its node (sorted node ids, as fleet simulations do);
        2. cut the messages into groups of ``group_size`` (sharing steps and lr, in order) and send each
           group to its first device's node as one ``train.packed`` message: ``arrays.<i>`` / ``config.<i>``
           (an adapter several devices were sent, the same record, travels once: the group's ``arrays-of``
           names the part that carries each device's arrays);
        3. that node's ClientApp trains the group packed (``fedtune.packed``) and replies with
           ``arrays.<i>`` / ``metrics.<i>`` (or ``declined.<i>`` / ``error.<i>``) per device;
        4. split each group reply into per-device replies ``Message(..., reply_to=<device's message>)``:
           same source node, same content keys as an unpacked reply (a decline, as ``flower.device.decline``).
    strategy.aggregate_train <- per-device replies (the same updates as without packing)

Non-train messages (evaluate) pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict

from fedtune.flower.device import DECLINED_KEY, decline
from fedtune.flower.records import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, pass_through_non_train

PACKED_TRAIN = f"{MessageType.TRAIN}.packed"
GROUP_KEY = "group"
ARRAYS_OF_KEY = "arrays-of"
PACKED_ERROR_CODE = 0  # flwr ErrorCode.UNKNOWN: the device's part of the group failed


def part_key(kind: str, i: int) -> str:
    return f"{kind}.{i}"


def pack_group(messages: list[Message], devices: list[int]) -> Message:
    """One ``train.packed`` message to the first device's node carrying every device's arrays and config.

    A config without a ``device-index`` (plain simulations) gets ``devices[i]``; the strategy's own
    records are not modified (strategies share one record between messages). Devices sent the same
    ArrayRecord (the global adapter, a fleet tier's) share one ``arrays.<j>``: ``arrays-of[i] = j``.
    """
    content = RecordDict()
    first: dict[int, int] = {}  # id of an ArrayRecord -> the part that carries it
    arrays_of = []
    for i, (m, device) in enumerate(zip(messages, devices)):
        cfg = dict(m.content[CONFIG_KEY])
        cfg.setdefault("device-index", device)
        arrays = m.content[ARRAYS_KEY]
        arrays_of.append(first.setdefault(id(arrays), i))
        if arrays_of[-1] == i:
            content[part_key(ARRAYS_KEY, i)] = arrays
        content[part_key(CONFIG_KEY, i)] = ConfigRecord(cfg)
    content[GROUP_KEY] = ConfigRecord({"size": len(messages), ARRAYS_OF_KEY: arrays_of})
    return Message(content=content, dst_node_id=messages[0].metadata.dst_node_id, message_type=PACKED_TRAIN)


def arrays_part(group: ConfigRecord, i: int) -> int:
    """The part whose ``arrays.<j>`` device ``i`` of a group was sent (itself, in a group packed without sharing)."""
    return int(group[ARRAYS_OF_KEY][i]) if ARRAYS_OF_KEY in group else i


def unpack_reply(reply: Message, messages: list[Message]) -> list[Message]:
    """Per-device replies from one group reply; a failed group fails each of its devices."""
    if reply.has_error():
        return [Message(Error(reply.error.code, f"packed group failed: {reply.error.reason}"), reply_to=m)
                for m in messages]
    out = []
    for i, m in enumerate(messages):
        if part_key("error", i) in reply.content:
            reason = str(reply.content[part_key("error", i)]["reason"])
            out.append(Message(Error(PACKED_ERROR_CODE, reason), reply_to=m))
        elif part_key(DECLINED_KEY, i) in reply.content:
            out.append(decline(m, str(reply.content[part_key(DECLINED_KEY, i)]["reason"])))
        else:
            out.append(Message(RecordDict({ARRAYS_KEY: reply.content[part_key(ARRAYS_KEY, i)],
                                           METRICS_KEY: reply.content[part_key(METRICS_KEY, i)]}), reply_to=m))
    return out


def _group_key(m: Message) -> tuple:
    cfg = m.content[CONFIG_KEY]
    # a fleet's tier: devices of one rank and base quantization share one packed model
    return (cfg.get("local-steps"), cfg.get("lr"), cfg.get("server-round"), cfg.get("rank"), cfg.get("quantization"))


def make_groups(messages: list[Message], group_size: int) -> list[list[Message]]:
    """Consecutive groups of at most ``group_size`` devices that share steps, lr, round and (in a fleet)
    rank and quantization: the packed engine trains one adapter layout around one base."""
    by_key: dict[tuple, list[Message]] = {}
    for m in messages:
        by_key.setdefault(_group_key(m), []).append(m)
    return [ms[s:s + group_size] for ms in by_key.values() for s in range(0, len(ms), group_size)]


class PackedGrid:
    """Wraps a Flower Grid (composition): train messages travel packed, everything else as is."""

    def __init__(self, grid, group_size: int):
        if group_size < 1:
            raise ValueError(f"packed.group_size must be at least 1, got {group_size}")
        self.grid = grid
        self.group_size = group_size

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        train, replies = pass_through_non_train(self.grid, messages, timeout)
        if not train:
            return replies
        index = {node: i for i, node in enumerate(sorted(self.grid.get_node_ids()))}
        groups = make_groups(train, self.group_size)
        packed = [pack_group(g, [index[m.metadata.dst_node_id] for m in g]) for g in groups]
        by_node = {p.metadata.dst_node_id: g for p, g in zip(packed, groups)}
        for reply in self.grid.send_and_receive(packed, timeout=timeout):
            replies += unpack_reply(reply, by_node[reply.metadata.src_node_id])
        return replies
