"""SQLite transactions run whole on a thread of their own: one hand-off per transaction.

Through aiosqlite every statement crosses from the event loop to the driver's thread and
back three or four times (cursor, execute, fetch, close): a 1:1 send's transaction was
about 26 crossings and 7 ms of CPU, most of it waking threads, and at 1,000 msgs/s that
was nearly all of the server's time and the whole of its latency (docs/performance.md).

Here the same transaction code runs on a worker thread against a synchronous
connection: the store's queries are coroutines that only ever await
``conn.execute``, which ``_SyncConnection`` answers at once, so the coroutine runs to its
end without suspending (``drive``). Writes have one thread (SQLite has one writer);
reads have a few (WAL lets them run beside the writer).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, make_url
from sqlalchemy.engine.interfaces import Dialect

_T = TypeVar("_T")

READERS = 2


class _SyncConnection:
    """The part of ``AsyncConnection`` the store's transactions use, answered synchronously."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    @property
    def dialect(self) -> Dialect:
        return self._conn.dialect

    async def execute(self, statement: Any, parameters: Any = None) -> Any:
        return self._conn.execute(statement, parameters)

    async def exec_driver_sql(self, statement: str, parameters: Any = None) -> Any:
        return self._conn.exec_driver_sql(statement, parameters)


def drive(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine that never suspends to its end and return its result."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("a store transaction awaited something other than its connection")


def sync_url(url: str) -> str | None:
    """The pysqlite URL of an aiosqlite file database; None for an in-memory one (a second
    engine would open a different, empty database)."""
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite") or parsed.database in (None, "", ":memory:"):
        return None
    return parsed.set(drivername="sqlite+pysqlite").render_as_string(hide_password=False)


class SqliteThreads:
    """A synchronous engine on the same file, with a writer thread and reader threads."""

    def __init__(self, url: str, configure: Callable[[Engine], None]) -> None:
        self.engine = create_engine(
            url, connect_args={"timeout": 30, "check_same_thread": False}, hide_parameters=True, pool_size=READERS + 1
        )
        configure(self.engine)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="mqchat-sqlite-write")
        self._readers = ThreadPoolExecutor(READERS, thread_name_prefix="mqchat-sqlite-read")

    async def run(self, work: Callable[[Any], Coroutine[Any, Any, _T]], *, write: bool) -> _T:
        pool = self._writer if write else self._readers
        return await asyncio.get_running_loop().run_in_executor(pool, self._transaction, work, write)

    def _transaction(self, work: Callable[[Any], Coroutine[Any, Any, _T]], write: bool) -> _T:
        with self.engine.connect() as conn:
            if write:
                conn = conn.execution_options(write=True)
            with conn.begin():
                return drive(work(_SyncConnection(conn)))

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self.engine.dispose()
