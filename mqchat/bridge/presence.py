"""Who is online: a user is online while at least one device is connected (anywhere in a cluster)."""

from __future__ import annotations

import time
from collections import defaultdict
from datetime import UTC, datetime
from typing import Protocol

from mqchat.bridge.cluster import Degraded, RedisCluster
from mqchat.core.ids import ConversationId, DeviceAddress
from mqchat.core.protocol import Presence, format_time


class PresenceBook(Protocol):
    async def connected(self, device: DeviceAddress, epoch: int, limit: int) -> tuple[bool, Presence | None]:
        """Record a connection unless the user has ``limit`` other devices connected; (allowed,
        the presence to publish when the user just came online)."""
        ...

    async def disconnected(self, device: DeviceAddress, epoch: int, *, replaced: bool) -> Presence | None:
        """Record a disconnection; the presence to publish when the user's last device went.
        ``replaced``: the device reconnected (takeover) and is still online."""
        ...

    async def of(self, user_id: str) -> Presence: ...

    def devices_of(self, user_id: str) -> list[str]:
        """The ids of the user's devices connected to this node."""
        ...

    def is_online(self, user_id: str) -> bool:
        """Whether any device of the user is connected (anywhere in a cluster), without waiting:
        the push hook asks it from the SQLite writer thread, inside the message's transaction."""
        ...

    def note(self, presence: Presence) -> None:
        """Another node published this presence change."""
        ...


class PresenceTracker:
    def __init__(self) -> None:
        self._devices: dict[str, set[str]] = defaultdict(set)
        self._last_seen: dict[str, datetime] = {}

    def connected(self, device: DeviceAddress) -> Presence | None:
        """Record a connection; returns the presence to publish when the user comes online."""
        devices = self._devices[device.user_id]
        first = not devices
        devices.add(device.device_id)
        if not first:
            return None
        # ``last_seen`` is when the status last changed, the same on every node and in Redis.
        self._last_seen[device.user_id] = datetime.now(UTC)
        return self.of(device.user_id)

    def disconnected(self, device: DeviceAddress) -> Presence | None:
        """Record a disconnection; returns the presence to publish when the last device goes."""
        devices = self._devices.get(device.user_id)
        if not devices or device.device_id not in devices:
            return None
        devices.discard(device.device_id)
        if devices:
            return None
        del self._devices[device.user_id]
        self._last_seen[device.user_id] = datetime.now(UTC)
        return self.of(device.user_id)

    def devices_of(self, user_id: str) -> list[str]:
        """The ids of the user's devices connected to this node."""
        return sorted(self._devices.get(user_id, ()))

    def of(self, user_id: str) -> Presence:
        seen = self._last_seen.get(user_id)
        return Presence(
            user_id=user_id,
            status="online" if self._devices.get(user_id) else "offline",
            last_seen=format_time(seen) if seen else None,
        )


class LocalPresence:
    """A single node: the tracker is the truth (the broker enforces connections per user)."""

    def __init__(self) -> None:
        self.tracker = PresenceTracker()

    async def connected(self, device: DeviceAddress, epoch: int, limit: int) -> tuple[bool, Presence | None]:
        return True, self.tracker.connected(device)

    async def disconnected(self, device: DeviceAddress, epoch: int, *, replaced: bool) -> Presence | None:
        return None if replaced else self.tracker.disconnected(device)

    async def of(self, user_id: str) -> Presence:
        return self.tracker.of(user_id)

    def devices_of(self, user_id: str) -> list[str]:
        return self.tracker.devices_of(user_id)

    def is_online(self, user_id: str) -> bool:
        # One C-level read of the tracker's dict and set: safe from the SQLite writer thread.
        return bool(self.tracker.devices_of(user_id))

    def note(self, presence: Presence) -> None:
        pass  # a single node publishes only its own changes


class ClusterPresence:
    """Cluster mode: Redis knows every node's devices (``RedisCluster.register``); while Redis
    cannot answer, this node's own tracker stands in (and the node reports itself degraded)."""

    def __init__(self, cluster: RedisCluster) -> None:
        self._cluster = cluster
        self._local = PresenceTracker()
        # Users online anywhere, as the presence changes of every node announce them: what the
        # push hook needs at once, without a round trip to Redis inside a transaction.
        self._online: set[str] = set()
        # The connection (epoch) of each device held here, changed before Redis is told: what
        # ``rejoin`` makes Redis record again after it lost it or missed a change.
        self._held: dict[DeviceAddress, int] = {}

    async def connected(self, device: DeviceAddress, epoch: int, limit: int) -> tuple[bool, Presence | None]:
        local = self._local.connected(device)
        self._held[device] = epoch
        try:
            allowed, before = await self._cluster.register(device, epoch, limit)
        except Degraded:
            return True, local
        if not allowed:
            self._local.disconnected(device)
            if self._held.get(device) == epoch:
                del self._held[device]
            return False, None
        self._online.add(device.user_id)
        return True, (_presence(device.user_id, "online", time.time()) if before == 0 else None)

    async def disconnected(self, device: DeviceAddress, epoch: int, *, replaced: bool) -> Presence | None:
        # Redis removes the device only if this connection (epoch) still holds it.
        local = None if replaced else self._local.disconnected(device)
        if self._held.get(device) == epoch:  # not if a newer connection of it is here
            del self._held[device]
        try:
            left = await self._cluster.unregister(device, epoch)
        except Degraded:
            return local
        if left == 0:
            self._online.discard(device.user_id)
            return _presence(device.user_id, "offline", time.time())
        return None

    async def rejoin(self) -> list[Presence]:
        """Redis is back: make it record this node's devices again (see ``RedisCluster.rejoin``);
        the presence changes that makes, to publish."""
        try:
            came, went = await self._cluster.rejoin(self._held)  # live: connects meanwhile count
        except Degraded:
            return []  # still unreachable: the next recovery tries again
        now = time.time()
        self._online |= came
        self._online -= went
        return [_presence(user, "online", now) for user in sorted(came)] + [
            _presence(user, "offline", now) for user in sorted(went)
        ]

    async def of(self, user_id: str) -> Presence:
        try:
            online, seen = await self._cluster.presence(user_id)
        except Degraded:
            return self._local.of(user_id)
        return _presence(user_id, "online" if online else "offline", seen)

    def devices_of(self, user_id: str) -> list[str]:
        return self._local.devices_of(user_id)

    def is_online(self, user_id: str) -> bool:
        return user_id in self._online or bool(self._local.devices_of(user_id))

    def note(self, presence: Presence) -> None:
        if presence.status == "online":
            self._online.add(presence.user_id)
        else:
            self._online.discard(presence.user_id)


def _presence(user_id: str, status: str, seen: float | None) -> Presence:
    last_seen = None if seen is None else format_time(datetime.fromtimestamp(seen, UTC))
    return Presence(user_id=user_id, status="online" if status == "online" else "offline", last_seen=last_seen)


class TypingThrottle:
    """At most one typing signal per device, target and state per interval; a change of
    state always passes, so "stopped" is never swallowed after "started"."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._last: dict[tuple[str, ConversationId], tuple[str, float]] = {}

    def allow(self, client_id: str, target: ConversationId, state: str) -> bool:
        now = time.monotonic()
        key = (client_id, target)
        previous = self._last.get(key)
        if previous is not None and previous[0] == state and now - previous[1] < self._interval:
            return False
        self._last[key] = (state, now)
        if len(self._last) > 100_000:  # bounded: forget the oldest half
            for stale in list(self._last)[: len(self._last) // 2]:
                del self._last[stale]
        return True
