"""Where every event leaves the chat service: this node's broker, and the other nodes.

One path out: stream events, replies to a device, typing, presence. Each goes to this
node's broker at once (``Publisher``); in cluster mode what other nodes' devices and
long-polls need goes through Redis too (``RedisCluster``): a user's events of one commit
batch as one message on the user's channel, typing on the user's or the group's channel,
presence and control messages on the control channel. What arrives from other nodes is
delivered here the same way, and a resync (after Redis was unreachable) makes every local
device and long-poll read its stream again: the cursor repairs what Redis lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from mqchat.bridge.auth import EventKeys
from mqchat.bridge.cluster import RedisCluster, group_channel, user_channel
from mqchat.bridge.notify import StreamNotifier
from mqchat.bridge.store import Emitted, MessageEntries
from mqchat.core.ids import DeviceAddress
from mqchat.core.protocol import AnyStreamEvent, Event, NewMessage, Presence, encode_event, format_time
from mqchat.core.topics import STREAM_PREFIX, device_topic, group_topic, id_after, presence_topic, stream_topic

log = logging.getLogger(__name__)
# A user's stream topic, checked and built once: every group message needs one per member.
_stream_topic = functools.lru_cache(maxsize=65_536)(stream_topic)


class Publisher(Protocol):
    """Delivers to this node's subscribers of a topic (the broker, in production)."""

    async def publish(self, topic: str, payload: bytes) -> None:
        """For any topic, a group's included (its members are looked up first)."""

    def deliver(self, topic: str, payload: bytes, users: frozenset[str] | None = None) -> int: ...


class SessionControl(Protocol):
    """This node's live connections (the broker, in production)."""

    async def close_device(self, device: DeviceAddress) -> bool:
        """Close the device's live MQTT connection here; False if it had none."""

    async def close_user(self, user_id: str) -> int:
        """Close every live MQTT connection of the user here; how many there were."""

    def take_over(self, client_id: str, epoch: int) -> None:
        """Another node accepted this client id with ``epoch``: close an older connection here."""

    def resync(self, users: set[str] | None) -> None:
        """Run catch-up again for the local devices of ``users`` (None: all of them)."""


class Fanout:
    def __init__(self, notifier: StreamNotifier, keys: EventKeys | None, cluster: RedisCluster | None) -> None:
        self.notifier = notifier
        self._keys = keys
        self.cluster = cluster
        self._publisher: Publisher | None = None
        self._sessions: SessionControl | None = None
        self.on_group_changed: Callable[[str], None] = lambda group_id: None
        self.on_presence: Callable[[Presence], None] = lambda presence: None
        self._tasks: set[asyncio.Task[Any]] = set()
        if cluster is not None:
            cluster.on_events = self._remote_events
            cluster.on_control = self._remote_control
            cluster.on_resync = self.resync

    def attach(self, publisher: Publisher | None, sessions: SessionControl | None) -> None:
        self._publisher = publisher
        self._sessions = sessions

    @property
    def sessions(self) -> SessionControl | None:
        return self._sessions

    # ------------------------------------------------------------- outgoing

    async def stream_events(self, *chunks: Emitted) -> None:
        """New stream entries, in seq order per user (each chunk, then the next): to this node's
        devices, then, per user and in one message, to the other nodes; then the long-polls
        wake up."""
        # Only the other nodes need the entries per user; on a single node, only who got some.
        by_user: dict[str, list[tuple[str, bytes]]] | None = None if self.cluster is None else {}
        users: list[str] = []
        encoded = _Encoded()
        for chunk in chunks:
            if isinstance(chunk, MessageEntries):
                self._message_entries(chunk, encoded.tail(chunk.event), by_user)
                users += chunk.users
                continue
            for user_id, event in chunk:
                topic, payload = _stream_topic(user_id), self.signed(user_id, encoded(event))
                self._deliver(topic, payload)
                users.append(user_id)
                if by_user is not None:
                    by_user.setdefault(user_id, []).append((topic, payload))
        if self.cluster is not None and by_user:
            for user_id, items in by_user.items():
                self.cluster.publish(user_channel(user_id), items, user_id=user_id)
        self.notifier.notify(users)

    def _message_entries(
        self, entries: MessageEntries, tail: bytes, by_user: dict[str, list[tuple[str, bytes]]] | None
    ) -> None:
        """A message's entries, encoded from its ``tail`` without an event per stream.

        Once per member of a group: what ``signed`` and ``_deliver`` do, without their calls."""
        sign = None if self._keys is None else self._keys.sign
        deliver = None if self._publisher is None else self._publisher.deliver
        for user_id, seq in zip(entries.users, entries.seqs, strict=True):
            topic, payload = _stream_topic(user_id), _NEW_MESSAGE % (seq, tail)
            if sign is not None:
                payload = sign(user_id, payload)
            if deliver is not None:
                deliver(topic, payload)
            if by_user is not None:
                by_user.setdefault(user_id, []).append((topic, payload))

    async def reply(self, device: DeviceAddress, event: Event) -> None:
        """To the device's own topic: it is connected here (it sent the command)."""
        self._deliver(device_topic(device), self.signed(device.user_id, encode_event(event)))

    def typing_to_user(self, user_id: str, event: Event) -> None:
        topic, payload = stream_topic(user_id), self.signed(user_id, encode_event(event))
        self._deliver(topic, payload)
        if self.cluster is not None:
            self.cluster.publish(user_channel(user_id), [(topic, payload)])

    async def typing_in_group(self, group_id: str, event: Event) -> None:
        topic, payload = group_topic(group_id), encode_event(event)
        if self._publisher is not None:
            await self._publisher.publish(topic, payload)
        if self.cluster is not None:
            self.cluster.publish(group_channel(group_id), [(topic, payload)])

    def presence(self, presence: Presence, *, tell_others: bool = True) -> None:
        self._deliver(presence_topic(presence.user_id), encode_event(presence))
        if self.cluster is not None and tell_others:
            self.cluster.control(
                "presence", user=presence.user_id, status=presence.status, last_seen=presence.last_seen
            )

    def close_elsewhere(self, op: str, **fields: Any) -> None:
        if self.cluster is not None:
            self.cluster.control(op, **fields)

    def signed(self, user_id: str, payload: bytes) -> bytes:
        return payload if self._keys is None else self._keys.sign(user_id, payload)

    def _deliver(self, topic: str, payload: bytes) -> None:
        if self._publisher is not None:
            self._publisher.deliver(topic, payload)

    # ------------------------------------------------------------ watching

    @contextlib.asynccontextmanager
    async def watching(self, user_id: str) -> AsyncIterator[None]:
        """While inside, the other nodes' events for ``user_id`` reach this node (a long-poll)."""
        if self.cluster is None:
            yield
            return
        channel = user_channel(user_id)
        await self.cluster.watch(channel)
        try:
            yield
        finally:
            self.cluster.unwatch(channel)

    # ----------------------------------------------------- from other nodes

    def _remote_events(self, items: list[tuple[str, bytes]]) -> None:
        users = []
        for topic, payload in items:
            if topic.startswith(STREAM_PREFIX):
                self._deliver(topic, payload)
                user_id = id_after(STREAM_PREFIX, topic)
                if user_id is not None:
                    users.append(user_id)
            elif self._publisher is not None:  # a group topic: only its current members here
                self._spawn(self._publisher.publish(topic, payload))
        self.notifier.notify(users)

    def _remote_control(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        try:
            if op == "presence":
                self._remote_presence(message)
            elif op == "takeover" and self._sessions is not None:
                self._sessions.take_over(str(message["client_id"]), int(message["epoch"]))
            elif op == "close_device" and self._sessions is not None:
                self._spawn(self._sessions.close_device(DeviceAddress(message["user"], message["device"])))
            elif op == "close_user" and self._sessions is not None:
                self._spawn(self._sessions.close_user(str(message["user"])))
            elif op == "group":
                self.on_group_changed(str(message["group"]))
            elif op == "resync":
                users = message.get("users")
                self.resync(None if users is None else {str(user) for user in users})
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("cluster: ignoring a malformed %r control message: %r", op, exc)

    def _remote_presence(self, message: dict[str, Any]) -> None:
        last_seen = message.get("last_seen")
        if isinstance(last_seen, int | float):
            last_seen = format_time(datetime.fromtimestamp(last_seen, UTC))
        presence = Presence(user_id=message["user"], status=message["status"], last_seen=last_seen)
        self.on_presence(presence)
        self.presence(presence, tell_others=False)

    def resync(self, users: set[str] | None) -> None:
        """Events may have been lost between nodes: every local device (of ``users``) catches
        up from its cursor, every long-poll reads again."""
        if self._sessions is not None:
            self._sessions.resync(users)
        if users is None:
            self.notifier.notify_all()
        else:
            self.notifier.notify(users)

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


_NEW_MESSAGE = b'{"type":"new_message","seq":%d%s'


class _Encoded:
    """Encodes the events of one batch, a message once whatever the number of its streams.

    A message lands in every member's stream, each time with its own ``seq``: only that
    field differs (it comes first after ``type``), so the rest (the ``tail``) is encoded
    once and the seq spliced in. A group message of 1,000 members is one encoding instead
    of 1,000."""

    def __init__(self) -> None:
        self._tails: dict[int, bytes] = {}

    def __call__(self, event: AnyStreamEvent) -> bytes:
        if not isinstance(event, NewMessage):
            return encode_event(event)
        return _NEW_MESSAGE % (event.seq, self.tail(event))

    def tail(self, event: NewMessage) -> bytes:
        """The message's encoding from the field after ``seq`` on."""
        tail = self._tails.get(event.server_msg_id)
        if tail is None:
            full = encode_event(event)
            cut = full.index(b',"server_msg_id":')
            tail = self._tails[event.server_msg_id] = full[cut:]
        return tail
