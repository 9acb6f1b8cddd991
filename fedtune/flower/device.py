"""A real device's Flower side: its settings from the node config, a clean decline, reading a decline back.

The Flower-free part (settings, data, eligibility, the micro-batch cap) is ``fedtune.deploy.device``.
An ineligible device answers with a reply that holds only ``declined`` (a ConfigRecord with its reason);
the strategy counts it per reason, apart from failures and rejections.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedtune.deploy.device import (  # noqa: F401 (re-exported: the ClientApp's device API)
    DeviceSettings, check_eligibility, device_data, device_micro_batch, device_profile, settings_from_node_config,
)

DECLINED_KEY = "declined"


def device_settings(context: Context) -> DeviceSettings | None:
    """This SuperNode's deployment settings, or None for a simulation's virtual node."""
    return settings_from_node_config(context.node_config, context.node_id)


def decline(msg: Message, reason: str) -> Message:
    return Message(content=RecordDict({DECLINED_KEY: ConfigRecord({"reason": reason})}), reply_to=msg)


def declined_reason(msg: Message) -> str | None:
    """The reason of a decline reply; None for any other reply."""
    if msg.has_error() or DECLINED_KEY not in msg.content.config_records:
        return None
    return str(msg.content.config_records[DECLINED_KEY].get("reason", "declined"))
