"""The topic layout of protocol v1 (docs/protocol.md, "Topics")."""

from __future__ import annotations

from mqchat.core.ids import DeviceAddress, check_id

INBOX_PREFIX = "chat/in/"
STREAM_PREFIX = "chat/user/"
DEVICE_PREFIX = "chat/device/"


def inbox_topic(device: DeviceAddress) -> str:
    """Where a device publishes its commands."""
    return f"{INBOX_PREFIX}{device.user_id}/{device.device_id}"


def stream_topic(user_id: str) -> str:
    """The user's event stream, delivered to all of the user's devices."""
    return f"{STREAM_PREFIX}{check_id(user_id, 'user_id')}"


def device_topic(device: DeviceAddress) -> str:
    """Replies meant for one device: acks, sync pages, errors."""
    return f"{DEVICE_PREFIX}{device.user_id}/{device.device_id}"


def may_subscribe(device: DeviceAddress, topic_filter: str) -> bool:
    """The strict ACL: a device subscribes to exactly its stream and its device topic.

    Wildcard filters are refused outright: a filter such as ``chat/+/alice`` would be
    harmless today but could match a topic added tomorrow.
    """
    return topic_filter in (stream_topic(device.user_id), device_topic(device))


def may_publish(device: DeviceAddress, topic: str) -> bool:
    return topic == inbox_topic(device)
