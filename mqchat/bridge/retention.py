"""The retention pruner: a background task that deletes old history in small batches.

What goes (docs/operations.md, "Retention"): a stream entry older than ``retention.days``,
unless a device of its user has not acked it yet and it is younger than
``retention.offline_days``; then every message no stream holds any more. Only the oldest
entries of a stream go, the head stays, so seq allocation is untouched; a device whose
cursor points before what is kept gets ``cursor_expired`` (sends.py ``page``).

Each deletion is one transaction of at most ``retention.batch_size`` rows, and the task
yields between them: on SQLite they queue on the one writer thread between the commits of
sends, never ahead of a whole pass. Several nodes may prune one PostgreSQL database at
once: the deletions are idempotent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from mqchat.bridge.store import PruneTarget
from mqchat.config import RetentionSettings
from mqchat.core.errors import StorageUnavailable
from mqchat.tasks import stop_task

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
USERS_PER_READ = 500


class RetentionStore(Protocol):
    async def user_ids_after(self, after: str, limit: int) -> list[str]: ...

    async def prune_targets(self, user_ids: list[str], days_cut_ms: int, offline_cut_ms: int) -> list[PruneTarget]: ...

    async def delete_stream_prefix(self, user_id: str, upto: int) -> int: ...

    async def delete_unheld_messages(
        self, after_id: int, limit: int, older_than: datetime
    ) -> tuple[int, int | None]: ...


@dataclass
class RetentionStats:
    """Counters since start-up, for metrics (plain numbers; the metrics layer exports them)."""

    passes: int = 0
    failed_passes: int = 0
    stream_entries_deleted: int = 0
    messages_deleted: int = 0
    last_pass_seconds: float = 0.0
    last_pass_finished: float | None = None
    """``time.time()`` when the last pass ended, None before the first."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class RetentionPruner:
    def __init__(
        self,
        store: RetentionStore,
        settings: RetentionSettings,
        *,
        also: Callable[[int], Awaitable[int]] | None = None,
    ) -> None:
        """``also(now_ms)`` runs at the end of every pass (the push outbox's own pruning)."""
        self._store = store
        self._settings = settings
        self._also = also
        self._task: asyncio.Task[None] | None = None
        self.stats = RetentionStats()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="mqchat-retention")

    async def stop(self) -> None:
        if self._task is not None:
            await stop_task(self._task)
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except StorageUnavailable:
                self.stats.failed_passes += 1
                log.warning("retention: the database failed during a pass; trying again in %g s",
                            self._settings.interval_seconds)  # fmt: skip
            except Exception:  # the pruner must outlive any one pass
                self.stats.failed_passes += 1
                log.exception("retention: a pass failed")
            await asyncio.sleep(self._settings.interval_seconds)

    async def run_once(self, now: int | None = None) -> tuple[int, int]:
        """One pass over every stream; ``now`` (ms since the epoch) for tests. Returns the
        stream entries and messages deleted."""
        started = time.monotonic()
        now = now_ms() if now is None else now
        entries = messages = 0
        days = self._settings.days
        if days is not None:
            offline_cut = now - int(self._settings.offline_days * DAY_MS)
            entries = await self._prune_streams(now - int(days * DAY_MS), offline_cut)
            older_than = datetime.fromtimestamp(now / 1000, UTC) - timedelta(days=days)
            messages = await self._prune_messages(older_than)
        if self._also is not None:
            await self._also(now)
        self.stats.passes += 1
        self.stats.stream_entries_deleted += entries
        self.stats.messages_deleted += messages
        self.stats.last_pass_seconds = time.monotonic() - started
        self.stats.last_pass_finished = time.time()
        if entries or messages:
            log.info("retention: deleted %d stream entries and %d messages in %.1f s",
                     entries, messages, self.stats.last_pass_seconds)  # fmt: skip
        return entries, messages

    async def _prune_streams(self, days_cut_ms: int, offline_cut_ms: int) -> int:
        batch = self._settings.batch_size
        deleted = 0
        after = ""
        while True:
            user_ids = await self._store.user_ids_after(after, USERS_PER_READ)
            if not user_ids:
                return deleted
            after = user_ids[-1]
            for target in await self._store.prune_targets(user_ids, days_cut_ms, offline_cut_ms):
                start = target.oldest
                while start <= target.upto:
                    upto = min(target.upto, start + batch - 1)
                    deleted += await self._store.delete_stream_prefix(target.user_id, upto)
                    start = upto + 1
                    await asyncio.sleep(0)  # let sends in between

    async def _prune_messages(self, older_than: datetime) -> int:
        deleted = 0
        after: int | None = 0
        while after is not None:
            count, after = await self._store.delete_unheld_messages(after, self._settings.batch_size, older_than)
            deleted += count
            await asyncio.sleep(0)
        return deleted
