"""One transaction runner per database: ``Database.run(name, fn, write=...)``.

Every transaction of the store is a plain synchronous function of a SQLAlchemy
``Connection`` (as Synapse's ``runInteraction``). The runner decides where it runs:

- **SQLite file database**: whole on a worker thread, against the standard library's
  ``sqlite3`` through a synchronous engine; one thread for writes (SQLite has one
  writer), two for reads (WAL lets them run beside the writer). One hand-off per
  transaction: through aiosqlite every statement crossed from the event loop to the
  driver's thread and back three or four times, which at 1,000 msgs/s was nearly all of
  the server's time and the whole of its latency (docs/performance.md). A small batch of
  sends may skip even that hand-off and run on the event loop's own thread (``run_raw``,
  ``here``): while the writer thread is idle, no other connection holds the lock, and
  those transactions stay quick.
- **SQLite in memory** (tests): the same, on one thread and one shared connection, since
  each new connection would open a different, empty database.
- **PostgreSQL**: the asyncpg engine; the function runs through ``run_sync``, which
  drives the async driver from the synchronous code with greenlets, no thread.

A write transaction whose set of streams to lock changed under it raises ``SetChanged``
(streams.py); ``run`` starts it over, up to ``RETRIES`` times. Driver failures become
``StorageUnavailable`` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, NullPool, StaticPool, create_engine, event, make_url, text
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from mqchat.bridge.storage.dialect import Dialect, dialect_for
from mqchat.core.errors import ChatError, StorageUnavailable

log = logging.getLogger(__name__)

_T = TypeVar("_T")
Transaction = Callable[[Connection], _T]

RETRIES = 5
READERS = 2
HERE_BUDGET_S = 0.002
HERE_SLOW_COMMITS, HERE_SLOW_WINDOW = 2, 8
"""When two of the last eight send transactions on the event loop's thread took longer than
``HERE_BUDGET_S`` (slow fsyncs, a busy disk), the next ones go to the writer thread for
``THREAD_AFTER_SLOW_S``. One alone does not: it has already stalled the loop, and the move costs
every send of those seconds the hand-off to the writer thread (docs/performance.md)."""
THREAD_AFTER_SLOW_S = 10.0
HERE_CHECKPOINT_EVERY = 200
"""The event loop's connection does not checkpoint the WAL (copying up to 40 MiB back into the
database file would stall the loop): after this many of its commits the writer thread does."""


class _LockedElsewhere(Exception):
    """Another connection holds the write lock (``SqliteDatabase._run_here``)."""


class SetChanged(Exception):
    """The set of streams a write transaction must lock grew between its read and its
    lock: the runner starts the transaction over (streams.py, ``lock_covering``)."""


def _unavailable(name: str, exc: SQLAlchemyError | OSError | sqlite3.Error) -> StorageUnavailable:
    """A driver failure, as the storage error callers get (logged unless a constraint refused)."""
    if not isinstance(exc, IntegrityError):  # a constraint is an answer, not an outage
        detail = str(exc) or ("no answer in time" if isinstance(exc, TimeoutError) else "no detail")
        log.warning("storage failure in %s: %s: %s", name, exc.__class__.__name__, detail)
    return StorageUnavailable("the database is unavailable; nothing was stored")


class Database:
    """Where transactions run. Subclasses: ``SqliteDatabase``, ``PostgresDatabase``."""

    dialect: Dialect

    async def run(self, name: str, fn: Transaction[_T], *, write: bool = False) -> _T:
        """``fn`` in one transaction (``write``: it takes the write locks up front)."""
        for _ in range(RETRIES if write else 1):
            try:
                return await self._run(fn, write)
            except SetChanged:
                continue
            except ChatError:
                raise
            except (SQLAlchemyError, OSError) as exc:
                raise _unavailable(name, exc) from exc
        raise StorageUnavailable("concurrent changes kept interfering; nothing was changed, try again")

    async def _run(self, fn: Transaction[_T], write: bool) -> _T:
        raise NotImplementedError

    async def run_schema(self, fn: Callable[[Connection], _T]) -> _T:
        """``fn`` on a connection outside any transaction (migrations manage their own)."""
        raise NotImplementedError

    async def unreachable(self) -> str | None:
        """None if the database answers a ``SELECT 1``, else why not, in one line (not logged:
        ``mqchat serve`` waiting for its database logs its own line per attempt)."""
        try:
            await self._run(ping, False)
        except (SQLAlchemyError, OSError) as exc:
            return f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else 'no answer'}"
        return None

    async def close(self) -> None:
        raise NotImplementedError


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def open_database(
    url: str, *, statement_timeout: float = 5.0, idle_in_transaction_timeout: float = 0.0, node_id: str | None = None
) -> Database:
    """SQLite or PostgreSQL, by URL (``sqlite+aiosqlite:///path`` and ``sqlite:///path`` alike).

    PostgreSQL only: ``statement_timeout`` (seconds) bounds every statement but the migrations';
    ``idle_in_transaction_timeout`` (seconds, 0: none) ends a session whose transaction waits that
    long for its next statement; ``node_id`` names the connections (``application_name``)."""
    if is_sqlite(url):
        return SqliteDatabase(url)
    return PostgresDatabase(
        url,
        statement_timeout=statement_timeout,
        idle_in_transaction_timeout=idle_in_transaction_timeout,
        node_id=node_id,
    )


# --------------------------------------------------------------------- SQLite


# A group message of 1,000 members dirties about 2,000 index pages (two indexes lead with the
# user id, so each member's entry lands on its own leaf page). With SQLite's default cache of
# 2 MiB those pages were read back from the file for every message; measured on a 1,000-member
# group (docs/performance.md, "Round 2"), 32 MiB halved the time of the stream insert.
SQLITE_CACHE_KIB = 32 * 1024
# The WAL is copied back into the database file when it reaches this many pages, by the
# transaction that commits then (the writer thread). At SQLite's default of 1,000 pages a
# 1,000-member group message triggered a checkpoint at nearly every commit; at 10,000 (a WAL
# of up to about 40 MiB) a page written by many commits is copied back once: 23 % less CPU
# per group message, measured with the larger cache above.
SQLITE_CHECKPOINT_PAGES = 10_000


def prepare_sqlite_connection(
    dbapi_connection: Any, *, busy_timeout_ms: int = 30_000, checkpoint_pages: int = SQLITE_CHECKPOINT_PAGES
) -> None:
    """How every connection to a SQLite database is set up, SQLAlchemy's and the raw ones (the
    event loop's waits for no lock and leaves checkpoints to the writer thread)."""
    # Let us issue BEGIN ourselves (below) instead of the driver's implicit one.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL: readers never block the writer. synchronous=FULL: a committed
    # transaction survives power loss, not only a crash of the process, which is
    # what an acked message promises. foreign_keys: SQLite's default is off.
    _enter_wal(cursor, busy_timeout_ms)
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
    cursor.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
    cursor.execute(f"PRAGMA wal_autocheckpoint={checkpoint_pages}")
    cursor.close()


def _enter_wal(cursor: Any, busy_timeout_ms: int) -> None:
    """``PRAGMA journal_mode=WAL``, retried while another connection holds the lock.

    Only the first connection to a new database changes the mode (it lasts in the file); to do
    so it needs an exclusive lock. While another connection is writing (creating the schema,
    say), SQLite answers SQLITE_BUSY at once, without the busy handler, which would deadlock
    there: seen when several processes start on one new data dir (tests/bridge/test_migrations.py).
    """
    deadline = time.monotonic() + busy_timeout_ms / 1000
    pause = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            busy = (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_BUSY  # extended codes too
            if not busy or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        prepare_sqlite_connection(dbapi_connection)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # A write transaction reads, then writes: it must take the write lock up front,
        # or a concurrent commit makes it fail with SQLITE_BUSY_SNAPSHOT.
        immediate = conn.get_execution_options().get("write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _private_file(path: Path) -> None:
    """Create the database file readable by its owner only, before SQLite opens it.

    SQLite gives the ``-wal`` and ``-shm`` files it creates the mode of the database
    file, so they follow. An existing file is narrowed, with its companions."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        for companion in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if companion.exists() and companion.stat().st_mode & 0o077:
                companion.chmod(0o600)


class SqliteDatabase(Database):
    def __init__(self, url: str) -> None:
        parsed = make_url(url).set(drivername="sqlite+pysqlite")
        memory = parsed.database in (None, "", ":memory:")
        # hide_parameters: a driver error's text would otherwise quote the bound values
        # (message content, password hashes) into the warning the runner logs.
        if memory:
            self.engine = create_engine(
                parsed,
                connect_args={"check_same_thread": False},
                poolclass=StaticPool,
                hide_parameters=True,
            )
        else:
            assert parsed.database is not None
            _private_file(Path(parsed.database))
            self.engine = create_engine(
                parsed,
                connect_args={"timeout": 30, "check_same_thread": False},
                hide_parameters=True,
                pool_size=READERS + 1,
            )
        configure_sqlite(self.engine)
        self.dialect = dialect_for("sqlite")
        self._path = None if memory else parsed.database
        # The writer thread's own sqlite3 connection, for the one transaction that runs on every
        # send (``run_raw``): no pool, no SQLAlchemy statement machinery.
        self._raw = threading.local()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="mqchat-sqlite-write")
        # One shared connection in memory: everything on the one thread.
        self._readers = self._writer if memory else ThreadPoolExecutor(READERS, thread_name_prefix="mqchat-sqlite-read")
        # Transactions handed to the writer thread and not finished (counted on the loop's thread).
        self._writer_busy = 0
        self._thread_until = 0.0
        self._here_slow: deque[bool] = deque(maxlen=HERE_SLOW_WINDOW)  # the last ones here: slow?
        self._here: sqlite3.Connection | None = None
        self._closing = False
        self._checkpoints: set[asyncio.Future[None]] = set()
        self.ran_here = 0
        """Send transactions run on the loop's thread (``run_raw(here=True)``)."""
        self.ran_on_writer = 0
        """Send transactions (``run_raw``) run on the writer thread."""
        self.moved = 0
        """Times slow commits on the loop's thread sent the next ones to the writer thread."""

    async def _on_writer(self, fn: Callable[..., _T], *args: Any) -> _T:
        self._writer_busy += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)
        finally:
            self._writer_busy -= 1

    async def _run(self, fn: Transaction[_T], write: bool) -> _T:
        if write:
            return await self._on_writer(self._transaction, fn, write)
        return await asyncio.get_running_loop().run_in_executor(self._readers, self._transaction, fn, write)

    def _transaction(self, fn: Transaction[_T], write: bool) -> _T:
        with self.engine.connect() as conn:
            if write:
                conn = conn.execution_options(write=True)
            with conn.begin():
                return fn(conn)

    async def run_schema(self, fn: Callable[[Connection], _T]) -> _T:
        def work() -> _T:
            with self.engine.connect() as conn:
                return fn(conn)

        return await self._on_writer(work)

    @property
    def raw_writes(self) -> bool:
        """Whether ``run_raw`` is available (a file database: memory has one shared connection)."""
        return self._path is not None

    async def run_raw(self, name: str, fn: Callable[[sqlite3.Connection], _T], *, here: bool = False) -> _T:
        """A write transaction (``BEGIN IMMEDIATE``) on the writer thread's own ``sqlite3``
        connection: for the transaction of every send, whose SQLAlchemy statement machinery
        (connection checkout, execution contexts, cache keys) cost more than SQLite's own work.
        The same retries and error translation as ``run``.

        ``here``: a small transaction (a send without a group) may run on the event loop's
        own thread, when the writer thread has nothing in hand and the last ones were quick:
        at everyday rates the hand-off to the writer thread and back, not SQLite, was the
        larger part of a send's CPU (docs/performance.md). It never waits for the write lock
        there (another process holding it sends the transaction to the writer thread)."""
        for _ in range(RETRIES):
            try:
                if here and self._may_run_here():
                    with contextlib.suppress(_LockedElsewhere):
                        return self._run_here(fn)
                result: _T = await self._on_writer(self._raw_transaction, fn)
                self.ran_on_writer += 1  # counted once committed, like ran_here
                return result
            except SetChanged:
                continue
            except ChatError:
                raise
            except (sqlite3.Error, OSError) as exc:
                raise _unavailable(name, exc) from exc
        raise StorageUnavailable("concurrent changes kept interfering; nothing was changed, try again")

    def _may_run_here(self) -> bool:
        return self._writer_busy == 0 and not self._closing and time.monotonic() >= self._thread_until

    def _run_here(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """The transaction on the loop's own connection, which never waits for the write lock."""
        raw = self._here
        try:
            if raw is None:
                assert self._path is not None
                raw = self._here = _raw_connection(self._path, busy_timeout_ms=0, checkpoint_pages=0)
            started = time.perf_counter()
            raw.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            raise _LockedElsewhere from None  # the writer thread waits for the lock instead
        result = _commit_after(raw, fn)
        self._stood_still(time.perf_counter() - started)
        self.ran_here += 1
        if self.ran_here % HERE_CHECKPOINT_EVERY == 0:
            checkpoint = asyncio.ensure_future(self._on_writer(self._checkpoint))
            self._checkpoints.add(checkpoint)
            checkpoint.add_done_callback(self._checkpoints.discard)
        return result

    def _stood_still(self, seconds: float) -> None:
        """The loop stood still for ``seconds`` in a transaction here. Measured on 2-core VMs at
        200 sends/s: 0.59 ms at the median, 0.9 at p99, 2.2 at p99.9; every 15-35 s one fsync of
        20-50 ms, and once a 10 s burst of them up to 172 ms."""
        self._here_slow.append(seconds > HERE_BUDGET_S)
        if sum(self._here_slow) >= HERE_SLOW_COMMITS:
            self._thread_until = time.monotonic() + THREAD_AFTER_SLOW_S
            self.moved += 1
            # After that while the count starts afresh. (A moving average did not forget a
            # burst: replayed over 140 s of measured commits, it moved 8 times and sent half the
            # sends the slower way, this rule 3 times and 17 %; docs/performance.md.)
            self._here_slow.clear()

    def _checkpoint(self) -> None:
        """On the writer thread: copy the WAL back as far as no reader needs it (never waits)."""
        try:
            self._writer_connection().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:  # the next one tries again; the WAL only grows meanwhile
            log.warning("a WAL checkpoint failed: %s", exc)

    def _writer_connection(self) -> sqlite3.Connection:
        raw: sqlite3.Connection | None = getattr(self._raw, "connection", None)
        if raw is None:
            assert self._path is not None
            raw = self._raw.connection = _raw_connection(self._path)
        return raw

    def _raw_transaction(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        raw = self._writer_connection()
        raw.execute("BEGIN IMMEDIATE")
        return _commit_after(raw, fn)

    def _close_raw(self) -> None:
        raw: sqlite3.Connection | None = getattr(self._raw, "connection", None)
        if raw is not None:
            raw.close()
            self._raw.connection = None

    async def close(self) -> None:
        self._closing = True  # from here on every write goes to the writer thread
        if self._checkpoints:
            await asyncio.gather(*self._checkpoints, return_exceptions=True)
        if self._here is not None:
            self._here.close()
            self._here = None
        if self.raw_writes:
            await asyncio.get_running_loop().run_in_executor(self._writer, self._close_raw)
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self.engine.dispose()


# ----------------------------------------------------------------- PostgreSQL


def _raw_connection(path: str, busy_timeout_ms: int = 30_000, **settings: int) -> sqlite3.Connection:
    raw = sqlite3.connect(path, timeout=busy_timeout_ms / 1000, check_same_thread=True, cached_statements=256)
    try:
        prepare_sqlite_connection(raw, busy_timeout_ms=busy_timeout_ms, **settings)
    except BaseException:
        raw.close()
        raise
    return raw


def _commit_after(raw: sqlite3.Connection, fn: Callable[[sqlite3.Connection], _T]) -> _T:
    """``fn`` in the write transaction just begun on ``raw``: committed, or else rolled back
    (a failed COMMIT too: an open transaction would keep the write lock)."""
    try:
        result = fn(raw)
        raw.execute("COMMIT")
    except BaseException:
        if raw.in_transaction:
            raw.rollback()
        raise
    return result


class PostgresDatabase(Database):
    """Every statement is bounded twice. The server cancels one that runs longer than
    ``statement_timeout`` (waiting for a lock included); the client gives up one second
    later on an answer that does not come at all (a silent network or server), and on a
    connection attempt likewise. Without these a partition held every send for as long as
    it lasted. Migrations run on connections of their own without either bound: a long
    ``ALTER`` or waiting for another node's migration lock is expected there.

    A process that stops between two statements of a transaction (frozen: SIGSTOP, a paused
    VM, a stop-the-world stall) keeps its row locks on the stream heads it wrote, and every
    other node's send to those streams waits on them, then fails at ``statement_timeout``,
    again and again, until it wakes up: PostgreSQL cannot tell a frozen client from a slow
    one. ``idle_in_transaction_timeout`` makes the server end such a session (and roll its
    transaction back) instead. The connections carry ``application_name`` ``mqchat:{node}``,
    so ``pg_stat_activity`` shows which node holds what."""

    def __init__(
        self,
        url: str,
        *,
        statement_timeout: float = 5.0,
        idle_in_transaction_timeout: float = 0.0,
        node_id: str | None = None,
    ) -> None:
        client_timeout = statement_timeout + 1
        settings = {
            "statement_timeout": _ms(statement_timeout),
            "idle_in_transaction_session_timeout": _ms(idle_in_transaction_timeout)
            if idle_in_transaction_timeout
            else "0",
            # PostgreSQL keeps 63 bytes of it.
            "application_name": f"mqchat:{node_id}" if node_id else "mqchat",
        }
        self.engine: AsyncEngine = create_async_engine(
            url,
            pool_size=10,
            max_overflow=10,
            pool_pre_ping=True,
            hide_parameters=True,
            connect_args={
                "timeout": client_timeout,  # connecting
                "command_timeout": client_timeout,  # every statement's answer
                "server_settings": settings,
            },
        )
        self._schema_engine: AsyncEngine = create_async_engine(
            url, poolclass=NullPool, hide_parameters=True, connect_args={"timeout": client_timeout}
        )
        self.dialect = dialect_for("postgresql")

    async def _run(self, fn: Transaction[_T], write: bool) -> _T:
        # Row locks (FOR UPDATE) order the writers; nothing to do up front for ``write``.
        async with self.engine.connect() as conn, conn.begin():
            return await conn.run_sync(fn)

    async def run_schema(self, fn: Callable[[Connection], _T]) -> _T:
        async with self._schema_engine.connect() as conn:
            return await conn.run_sync(fn)

    async def close(self) -> None:
        await self.engine.dispose()
        await self._schema_engine.dispose()


def _ms(seconds: float) -> str:
    return str(max(1, round(seconds * 1000)))


def ping(conn: Connection) -> None:
    conn.execute(text("SELECT 1"))
