"""Who is online on this node: a user is online while at least one device is connected."""

from __future__ import annotations

import time
from collections import defaultdict
from datetime import UTC, datetime

from mqchat.core.ids import ConversationId, DeviceAddress
from mqchat.core.protocol import Presence, format_time


class PresenceTracker:
    def __init__(self) -> None:
        self._devices: dict[str, set[str]] = defaultdict(set)
        self._last_seen: dict[str, datetime] = {}

    def connected(self, device: DeviceAddress) -> Presence | None:
        """Record a connection; returns the presence to publish when the user comes online."""
        devices = self._devices[device.user_id]
        first = not devices
        devices.add(device.device_id)
        self._last_seen[device.user_id] = datetime.now(UTC)
        return self.of(device.user_id) if first else None

    def disconnected(self, device: DeviceAddress) -> Presence | None:
        """Record a disconnection; returns the presence to publish when the last device goes."""
        devices = self._devices.get(device.user_id)
        if not devices or device.device_id not in devices:
            return None
        devices.discard(device.device_id)
        self._last_seen[device.user_id] = datetime.now(UTC)
        if devices:
            return None
        del self._devices[device.user_id]
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
