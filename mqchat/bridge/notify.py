"""Wakes long-polls waiting on a user's stream."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Iterable, Iterator


class StreamNotifier:
    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Future[None]]] = defaultdict(set)

    def waiting(self) -> int:
        """Long-polls waiting now."""
        return sum(len(waiters) for waiters in self._waiters.values())

    def notify(self, user_ids: Iterable[str]) -> None:
        if not self._waiters:  # no long-poll waits: the usual case, and a group names every member
            return
        for user_id in self._waiters.keys() & user_ids:
            for waiter in self._waiters.pop(user_id, ()):
                if not waiter.done():
                    waiter.set_result(None)

    def notify_all(self) -> None:
        """Wake every waiting long-poll (after events may have been lost between nodes)."""
        self.notify(list(self._waiters))

    @contextlib.contextmanager
    def watch(self, user_id: str) -> Iterator[asyncio.Future[None]]:
        """Register before reading the store, so an event between read and wait is not missed."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[user_id].add(waiter)
        try:
            yield waiter
        finally:
            waiters = self._waiters.get(user_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[user_id]
