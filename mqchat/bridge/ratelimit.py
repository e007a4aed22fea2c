"""Token buckets per key (a device), bounded in memory."""

from __future__ import annotations

import time

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

    def take(self, key: str, *, ref: str | None = None) -> None:
        """Take one token, or raise ``RateLimited`` saying when one will be there."""
        now = time.monotonic()
        tokens = self._level(key, now)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            raise RateLimited(
                f"more than {self._rate:g} sends per second (bursts of {self._burst:g}); slow down",
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
