"""Whether this node can do its job: the database takes a write, within a bound.

A ``SELECT 1`` answered from a full or read-only disk says nothing about sends, and one
sent to a database that went silent never returns. So the check is a write (this node's
row of the ``health`` table, one transaction through the same runner as every send) and
it is bounded: no answer within ``database.health_timeout_seconds`` is a failure too.

Checks run every ``INTERVAL`` seconds in the background (they keep ``mqchat_database_up``
current) and on each ``GET /healthz``. At most one write is in flight: a check that
finds one running waits for it (within its own bound) rather than queueing another
behind a stuck database. A change of state is logged once, not every check.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Literal, Protocol

from mqchat.bridge.metrics import Metrics
from mqchat.core.errors import StorageUnavailable
from mqchat.tasks import stop_task

log = logging.getLogger(__name__)

INTERVAL = 5.0
"""Seconds between background checks."""

Reason = Literal["storage_unavailable", "storage_timeout"]


class HealthWriter(Protocol):
    async def health_write(self, node_id: str) -> None: ...


class ClusterLink(Protocol):
    """Cluster mode's Redis link, as far as health goes."""

    @property
    def healthy(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class HealthReport:
    ok: bool
    reason: Reason | None = None
    """``storage_unavailable``: the write failed; ``storage_timeout``: no answer in time."""
    detail: str | None = None
    seconds: float = 0.0


class HealthMonitor:
    def __init__(
        self, store: HealthWriter, node_id: str, timeout: float, metrics: Metrics, cluster: ClusterLink | None = None
    ) -> None:
        self._store = store
        self._cluster = cluster
        self._node_id = node_id
        self._timeout = timeout
        self._metrics = metrics
        self._probe: asyncio.Future[HealthReport] | None = None
        self._task: asyncio.Task[None] | None = None
        self.last: HealthReport | None = None

    async def check(self) -> HealthReport:
        """Write, or wait for the write in flight, for at most the timeout."""
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._write())
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout):
                report = await asyncio.shield(self._probe)
        except TimeoutError:
            report = HealthReport(
                False,
                "storage_timeout",
                f"the database did not answer a write within {self._timeout:g} s",
                time.perf_counter() - started,
            )
        self._record(report)
        return report

    async def _write(self) -> HealthReport:
        started = time.perf_counter()
        try:
            await self._store.health_write(self._node_id)
        except StorageUnavailable:  # the runner has logged the driver's error
            return HealthReport(False, "storage_unavailable", "the database refused a write", _since(started))
        except Exception:
            log.exception("the health write failed")
            return HealthReport(False, "storage_unavailable", "the health write failed", _since(started))
        return HealthReport(True, seconds=_since(started))

    @property
    def redis(self) -> Literal["ok", "unavailable"] | None:
        """Cluster mode's Redis link: a node without it still stores and acks every message, it
        only delivers across nodes late (by catch-up), so it is degraded, not down. None: single node."""
        if self._cluster is None:
            return None
        up = self._cluster.healthy
        self._metrics.redis_checked(up)
        return "ok" if up else "unavailable"

    def _record(self, report: HealthReport) -> None:
        previous, self.last = self.last, report
        self._metrics.database_checked(report.ok, report.seconds)
        _ = self.redis  # keeps mqchat_redis_up current
        if previous is None or previous.ok != report.ok:
            if report.ok:
                if previous is not None:
                    log.warning("database healthy again: a write committed in %.3f s", report.seconds)
            else:
                log.error("database unhealthy (%s): %s", report.reason, report.detail)

    # ------------------------------------------------------------ background

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="mqchat-health")

    async def _run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(INTERVAL)

    async def stop(self) -> None:
        if self._task is not None:
            await stop_task(self._task)
            self._task = None
        if self._probe is not None and not self._probe.done():
            # A write stuck on a silent database: the store's own timeouts end it.
            await stop_task(self._probe)


def _since(started: float) -> float:
    return time.perf_counter() - started
