"""amqtt plugins: token authentication, the strict topic ACL, and the bridge shim.

amqtt builds plugins itself from dotted paths; the ``Services`` of the running
server reach them through each plugin's ``Config.services``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from amqtt.broker import BrokerContext
from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BasePlugin, BaseTopicPlugin
from amqtt.session import ApplicationMessage, Session

from mqchat.bridge.service import ChatService
from mqchat.bridge.services import Services
from mqchat.core.errors import ChatError, NotAllowed, StorageUnavailable
from mqchat.core.ids import DeviceAddress
from mqchat.core.protocol import error_event
from mqchat.core.topics import (
    GROUP_PREFIX,
    PRESENCE_PREFIX,
    device_topic,
    id_after,
    inbox_topic,
    may_subscribe,
    stream_topic,
)

log = logging.getLogger(__name__)

# CONNACK return codes (MQTT 3.1.1, 3.2.2.3)
IDENTIFIER_REJECTED = 0x02
SERVER_UNAVAILABLE = 0x03
NOT_AUTHORIZED = 0x05
REFUSAL_ATTR = "mqchat_refusal"
REPLACED_ATTR = "mqchat_replaced"
"""Set on a session whose connection was closed because its device reconnected."""
DEVICE_ATTR = "mqchat_device"


def session_device(session: Session | None) -> DeviceAddress | None:
    """The device an authenticated session belongs to (set by ``TokenAuthPlugin``)."""
    device = getattr(session, DEVICE_ATTR, None)
    return device if isinstance(device, DeviceAddress) else None


class TokenAuthPlugin(BaseAuthPlugin):
    """CONNECT: client id ``{user}:{device}``, username = user, password = access token
    (of this user, for any device or for this one, and not revoked for this device)."""

    @dataclass
    class Config:
        services: Any = None

    async def authenticate(self, *, session: Session) -> bool:
        services: Services = self.config.services
        try:
            device = DeviceAddress.from_client_id(session.client_id or "")
        except ChatError:
            setattr(session, REFUSAL_ATTR, IDENTIFIER_REJECTED)
            return False
        setattr(session, REFUSAL_ATTR, NOT_AUTHORIZED)
        if session.username != device.user_id or not session.password:
            return False
        try:
            # Checks the token's device scope and the device's revocation too.
            claims = await services.accounts.authorize(str(session.password), device.device_id)
        except StorageUnavailable:
            setattr(session, REFUSAL_ATTR, SERVER_UNAVAILABLE)
            return False
        except ChatError:
            return False
        if claims.user_id != device.user_id:
            return False
        setattr(session, DEVICE_ATTR, device)
        setattr(session, REFUSAL_ATTR, None)
        return True


class ChatAclPlugin(BaseTopicPlugin):
    """Publish: own ``chat/in`` only. Subscribe: own stream and device topic; the topic
    of a group the user is in (checked again on every delivery, so a removed member
    stops receiving at once); the presence of a user one shares a conversation with."""

    @dataclass
    class Config:
        services: Any = None

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._services: Services = self.config.services

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool:
        device = session_device(session)
        if device is None or topic is None:
            return False
        decided = acl_decision(device, topic, action)
        if decided is not None:
            return decided
        chat = self._services.chat
        group_id = id_after(GROUP_PREFIX, topic)
        if group_id is not None:
            return await chat.groups.is_member(group_id, device.user_id)
        user_id = id_after(PRESENCE_PREFIX, topic)
        return user_id is not None and await chat.store.are_contacts(device.user_id, user_id)


def acl_decision(device: DeviceAddress, topic: str, action: Action | None) -> bool | None:
    """The ACL's answer where it needs no lookup; None where it does (group membership,
    contacts). The broker's delivery path uses it to skip amqtt's task per ACL call."""
    if action == Action.PUBLISH:
        return topic == inbox_topic(device)
    if may_subscribe(device, topic):
        return True
    if id_after(GROUP_PREFIX, topic) is not None:
        return None
    if id_after(PRESENCE_PREFIX, topic) is not None:
        # Presence is vetted once, at SUBSCRIBE; a delivery on a vetted filter passes.
        return True if action == Action.RECEIVE else None
    return False


@dataclass
class _DeviceState:
    session: Session
    topics: set[str] = field(default_factory=set)
    catch_up: asyncio.Task[None] | None = None
    again: bool = False


class ChatBridgePlugin(BasePlugin[BrokerContext]):
    """Hands commands to the chat service and starts offline catch-up on subscribe.

    amqtt runs each event hook as its own task; ``on_broker_message_received`` hands
    the payload over before its first ``await``, so a device's commands keep their order.
    """

    @dataclass
    class Config:
        services: Any = None

    def __init__(self, context: BrokerContext) -> None:
        super().__init__(context)
        self._services: Services = self.config.services
        self._devices: dict[str, _DeviceState] = {}

    @property
    def _chat(self) -> ChatService:
        return self._services.chat

    async def on_broker_pre_shutdown(self) -> None:
        self._chat.attach_publisher(None)
        for state in self._devices.values():
            if state.catch_up is not None:
                state.catch_up.cancel()

    async def on_broker_message_received(self, *, client_id: str, message: ApplicationMessage | None) -> None:
        if message is None:
            return
        device = session_device(self.context.get_session(client_id))
        if device is None:
            return
        if message.topic == inbox_topic(device):
            self._chat.accept(device, message.data)
        elif not message.topic.startswith("$") and "+" not in message.topic and "#" not in message.topic:
            refusal = NotAllowed(f"devices publish only on {inbox_topic(device)}; refused {message.topic!r}")
            await self._chat.reply(device, error_event(refusal))

    async def on_broker_client_subscribed(self, *, client_id: str, topic: str, qos: int) -> None:
        device = session_device(self.context.get_session(client_id))
        if device is None or topic not in (stream_topic(device.user_id), device_topic(device)):
            return
        state = self._state(client_id, client_session_of(self.context, client_id))
        state.topics.add(topic)
        if device_topic(device) in state.topics:
            self._schedule_catch_up(client_id, device, state)

    async def on_broker_client_unsubscribed(self, *, client_id: str, topic: str) -> None:
        state = self._devices.get(client_id)
        if state is not None:
            state.topics.discard(topic)

    async def on_broker_client_connected(self, *, client_id: str, client_session: Session) -> None:
        device = session_device(client_session)
        if device is None:
            return
        await self._chat.device_connected(device)
        # A resumed session (clean_session=false) keeps its subscriptions and sends no
        # SUBSCRIBE: catch up from the cursor now.
        if client_session.parent and self._subscribed(client_session, device_topic(device)):
            state = self._state(client_id, client_session)
            state.topics.add(device_topic(device))
            self._schedule_catch_up(client_id, device, state)

    def _subscribed(self, session: Session, topic: str) -> bool:
        return any(s is session for s, _ in self.context.subscriptions.get(topic, ()))

    def _state(self, client_id: str, session: Session | None) -> _DeviceState:
        state = self._devices.get(client_id)
        if state is None or state.session is not session:
            if state is not None and state.catch_up is not None:
                state.catch_up.cancel()
            state = self._devices[client_id] = _DeviceState(session=session)
        return state

    async def on_broker_client_disconnected(self, *, client_id: str, client_session: Session) -> None:
        state = self._devices.get(client_id)
        if state is not None and state.session is client_session:
            del self._devices[client_id]
            if state.catch_up is not None:
                state.catch_up.cancel()
        if getattr(client_session, REPLACED_ATTR, False):
            return  # the device is still online, on its new connection
        device = session_device(client_session)
        if device is not None:
            await self._chat.device_disconnected(device)

    def _schedule_catch_up(self, client_id: str, device: DeviceAddress, state: _DeviceState) -> None:
        # One SUBSCRIBE for both topics fires two events: coalesce them, and run again
        # if a subscription lands while a catch-up is already sending.
        if state.catch_up is not None and not state.catch_up.done():
            state.again = True
            return
        state.catch_up = asyncio.create_task(self._catch_up(client_id, device, state))

    async def _catch_up(self, client_id: str, device: DeviceAddress, state: _DeviceState) -> None:
        while True:
            state.again = False
            try:
                await self._chat.catch_up(device)
            except ChatError as exc:
                await self._chat.reply(device, error_event(exc))
            if not state.again or self._devices.get(client_id) is not state:
                return


def client_session_of(context: BrokerContext, client_id: str) -> Session | None:
    return context.get_session(client_id)
