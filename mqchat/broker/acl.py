"""The strict topic ACL, in one place, for every path into and out of the broker.

Publish (a PUBLISH and a Last Will alike): only the device's own ``chat/in/{user}/{device}``.
Subscribe: exactly the device's stream and device topics; the topic of a group the user
is an active member of; the presence of a user it shares a conversation or group with.
No wildcard filter is ever granted, so every subscription is an exact topic.
Receive: checked again per delivery on group topics (a removed member stops at once).
"""

from __future__ import annotations

from mqchat.bridge.chat import ChatService
from mqchat.core.ids import DeviceAddress
from mqchat.core.topics import GROUP_PREFIX, PRESENCE_PREFIX, id_after, may_subscribe


def group_of(topic: str) -> str | None:
    """The group id of a group topic, None for any other topic."""
    return id_after(GROUP_PREFIX, topic)


class TopicAcl:
    """The lookups the ACL needs (membership, contacts) come from the chat service's caches."""

    def __init__(self, chat: ChatService) -> None:
        self._chat = chat

    async def may_subscribe(self, device: DeviceAddress, topic_filter: str) -> bool:
        if may_subscribe(device, topic_filter):
            return True
        group_id = id_after(GROUP_PREFIX, topic_filter)
        if group_id is not None:
            return await self._chat.groups.is_member(group_id, device.user_id)
        user_id = id_after(PRESENCE_PREFIX, topic_filter)
        return user_id is not None and await self._chat.store.are_contacts(device.user_id, user_id)

    async def group_members(self, group_id: str) -> frozenset[str]:
        """Who may receive on the group's topic now (a subscriber removed since gets nothing)."""
        return await self._chat.groups.members(group_id)
