"""MQTT sessions and subscriptions, kept small and bounded.

mqchat's durability comes from the store and each device's cursor, not from the
broker, so a session holds only what MQTT needs between two packets: its
subscriptions (exact topics: the ACL grants no wildcard, so a dict finds every
subscriber) and the connection it is attached to. A ``clean session = 0`` session
outlives its connection with its subscriptions only: no message is queued for it
(the device catches up from its cursor when it comes back), it expires after
``limits.session_expiry_seconds`` offline, and a user keeps at most
``limits.max_offline_sessions_per_user`` of them (the oldest goes first).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from mqchat.core.ids import DeviceAddress

if TYPE_CHECKING:
    from mqchat.broker.connection import MqttConnection


class Session:
    __slots__ = ("clean", "connection", "device", "offline_since", "subscriptions")

    def __init__(self, device: DeviceAddress, clean: bool) -> None:
        self.device = device
        self.clean = clean
        self.subscriptions: dict[str, int] = {}
        self.connection: MqttConnection | None = None
        self.offline_since = 0.0

    @property
    def client_id(self) -> str:
        return self.device.client_id


class Subscriptions:
    """Topic -> {session: granted QoS}. ``on_empty`` hears of a topic's last subscriber leaving
    (cluster mode stops listening for it)."""

    def __init__(self) -> None:
        self._by_topic: dict[str, dict[Session, int]] = {}
        self.on_empty: Callable[[str], None] = lambda topic: None

    def add(self, session: Session, topic: str, qos: int) -> None:
        self._by_topic.setdefault(topic, {})[session] = qos
        session.subscriptions[topic] = qos

    def remove(self, session: Session, topic: str) -> None:
        session.subscriptions.pop(topic, None)
        subscribers = self._by_topic.get(topic)
        if subscribers is not None:
            subscribers.pop(session, None)
            if not subscribers:
                del self._by_topic[topic]
                self.on_empty(topic)

    def remove_all(self, session: Session) -> None:
        for topic in list(session.subscriptions):
            self.remove(session, topic)

    def of(self, topic: str) -> list[tuple[Session, int]]:
        """A copy: a delivery may close a slow reader, whose cleanup edits the table."""
        subscribers = self._by_topic.get(topic)
        return list(subscribers.items()) if subscribers else []

    def count(self, topic: str) -> int:
        return len(self._by_topic.get(topic, ()))

    @property
    def topics(self) -> int:
        return len(self._by_topic)


class SessionTable:
    """Sessions by client id; the offline persistent ones bounded per user and in time."""

    def __init__(self, subscriptions: Subscriptions, *, expiry_seconds: float, max_offline_per_user: int) -> None:
        self._subscriptions = subscriptions
        self._expiry = expiry_seconds
        self._max_offline = max_offline_per_user
        self._sessions: dict[str, Session] = {}
        # user id -> client ids of that user's offline persistent sessions, oldest first
        self._offline: dict[str, OrderedDict[str, None]] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, client_id: str) -> Session | None:
        return self._sessions.get(client_id)

    def open(self, device: DeviceAddress, clean: bool) -> tuple[Session, bool]:
        """The session for a new connection, and whether it was resumed (CONNACK's flag)."""
        existing = self._sessions.get(device.client_id)
        if existing is not None:
            self._leave_offline(existing)
            if not clean and not existing.clean and not self._expired(existing, time.monotonic()):
                existing.clean = False
                return existing, True
            self._drop(existing)
        session = Session(device, clean)
        self._sessions[device.client_id] = session
        return session, False

    def closed(self, session: Session) -> None:
        """Its connection ended: a clean session goes, a persistent one waits offline."""
        if self._sessions.get(session.client_id) is not session:
            return
        if session.clean:
            self._drop(session)
            return
        session.offline_since = time.monotonic()
        offline = self._offline.setdefault(session.device.user_id, OrderedDict())
        offline[session.client_id] = None
        while len(offline) > self._max_offline:
            oldest, _ = offline.popitem(last=False)
            self._drop(self._sessions[oldest])

    def expire(self) -> int:
        """Forget the persistent sessions offline for longer than the expiry; how many went."""
        now = time.monotonic()
        stale = [
            self._sessions[client_id]
            for offline in self._offline.values()
            for client_id in offline
            if self._expired(self._sessions[client_id], now)
        ]
        for session in stale:
            self._leave_offline(session)
            self._drop(session)
        return len(stale)

    def _expired(self, session: Session, now: float) -> bool:
        return session.connection is None and session.offline_since > 0 and now - session.offline_since > self._expiry

    def _leave_offline(self, session: Session) -> None:
        offline = self._offline.get(session.device.user_id)
        if offline is not None:
            offline.pop(session.client_id, None)
            if not offline:
                del self._offline[session.device.user_id]

    def _drop(self, session: Session) -> None:
        self._subscriptions.remove_all(session)
        if self._sessions.get(session.client_id) is session:
            del self._sessions[session.client_id]

    @property
    def offline(self) -> int:
        return sum(len(offline) for offline in self._offline.values())
