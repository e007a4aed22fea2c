"""The topic layout of protocol v1 (docs/protocol.md, "Topics")."""

from __future__ import annotations

from mqchat.core.ids import DeviceAddress, check_id, is_valid_id

INBOX_PREFIX = "chat/in/"
STREAM_PREFIX = "chat/user/"
DEVICE_PREFIX = "chat/device/"
GROUP_PREFIX = "chat/group/"
PRESENCE_PREFIX = "chat/presence/"


def inbox_topic(device: DeviceAddress) -> str:
    """Where a device publishes its commands."""
    return f"{INBOX_PREFIX}{device.user_id}/{device.device_id}"


def stream_topic(user_id: str) -> str:
    """The user's event stream, delivered to all of the user's devices."""
    return f"{STREAM_PREFIX}{check_id(user_id, 'user_id')}"


def device_topic(device: DeviceAddress) -> str:
    """Replies meant for one device: acks, sync pages, errors."""
    return f"{DEVICE_PREFIX}{device.user_id}/{device.device_id}"


def group_topic(group_id: str) -> str:
    """Ephemeral signals (typing) of a group, for its members."""
    return f"{GROUP_PREFIX}{check_id(group_id, 'group_id')}"


def presence_topic(user_id: str) -> str:
    """The retained presence of a user, for those who share a conversation or group with them."""
    return f"{PRESENCE_PREFIX}{check_id(user_id, 'user_id')}"


def id_after(prefix: str, topic: str) -> str | None:
    """``chat/group/g1`` -> ``g1`` for the group prefix; None if the topic is not ``prefix + id``."""
    if not topic.startswith(prefix):
        return None
    rest = topic[len(prefix) :]
    return rest if is_valid_id(rest) else None


def may_subscribe(device: DeviceAddress, topic_filter: str) -> bool:
    """The strict ACL for the device's own topics: exactly its stream and its device topic.

    Wildcard filters are refused outright: a filter such as ``chat/+/alice`` would be
    harmless today but could match a topic added tomorrow. Group and presence topics
    depend on membership and contacts and are checked by the broker's ``TopicAcl``.
    """
    return topic_filter in (stream_topic(device.user_id), device_topic(device))


def may_publish(device: DeviceAddress, topic: str) -> bool:
    return topic == inbox_topic(device)
