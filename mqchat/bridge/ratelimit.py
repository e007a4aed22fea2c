"""Token buckets per key (a device), bounded in memory."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator

from mqchat.core.errors import RateLimited


class TokenBuckets:
    """``burst`` tokens per key, refilled at ``rate`` per second; one send takes one.

    A bucket that has refilled completely is the same as no bucket at all, so when
    more than ``max_keys`` keys are held the full ones are forgotten; if that is not
    enough (a flood of distinct keys), the oldest half goes.
    """

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str, *, ref: str | None = None, what: str = "sends") -> None:
        """Take one token, or raise ``RateLimited`` saying when one will be there."""
        now = time.monotonic()
        tokens = self._level(key, now)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            raise RateLimited(
                f"more than {self._rate:g} {what} per second (bursts of {self._burst:g}); slow down",
                retry_after=(1 - tokens) / self._rate,
                ref=ref,
            )
        self._buckets[key] = (tokens - 1, now)
        if len(self._buckets) > self._max_keys:
            self._prune(now)

    def _level(self, key: str, now: float) -> float:
        held = self._buckets.get(key)
        if held is None:
            return self._burst
        tokens, at = held
        return min(self._burst, tokens + (now - at) * self._rate)

    def _prune(self, now: float) -> None:
        full = [key for key in self._buckets if self._level(key, now) >= self._burst]
        for key in full:
            del self._buckets[key]
        if len(self._buckets) > self._max_keys:
            for key in list(self._buckets)[: len(self._buckets) // 2]:
                del self._buckets[key]


class NewKeyBudget:
    """At most ``limit`` distinct new members per owner within ``window`` seconds (e.g. the
    device ids a user connects with): a member seen within the window is free again."""

    def __init__(self, limit: int, window: float, max_owners: int = 100_000) -> None:
        self._limit = limit
        self._window = window
        self._max_owners = max_owners
        self._seen: OrderedDict[str, OrderedDict[str, float]] = OrderedDict()

    def admit(self, owner: str, member: str) -> bool:
        now = time.monotonic()
        seen = self._seen.pop(owner, None) or OrderedDict()
        self._seen[owner] = seen  # most recently used last
        while seen and next(iter(seen.values())) <= now - self._window:
            seen.popitem(last=False)
        if member in seen:
            return True
        if len(seen) >= self._limit:
            return False
        seen[member] = now
        while len(self._seen) > self._max_owners:
            self._seen.popitem(last=False)
        return True


class ConcurrencyLimit:
    """At most ``per_key`` operations at once per key (a user's stream reads), and at most
    ``total`` at once overall, waiting in turn: one user's reads cannot fill the database's
    queue ahead of everyone's connects."""

    def __init__(self, per_key: int, total: int) -> None:
        self._per_key = per_key
        self._running: dict[str, int] = {}
        self._gate = asyncio.Semaphore(total)

    @contextlib.asynccontextmanager
    async def slot(self, key: str) -> AsyncIterator[None]:
        running = self._running.get(key, 0)
        if running >= self._per_key:
            raise RateLimited(f"more than {self._per_key} reads at once; wait for the answers", retry_after=0.1)
        self._running[key] = running + 1
        try:
            async with self._gate:
                yield
        finally:
            left = self._running[key] - 1
            if left:
                self._running[key] = left
            else:
                del self._running[key]
