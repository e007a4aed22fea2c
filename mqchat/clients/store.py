"""The client's local SQLite file: the outbox of unacknowledged sends and the stream cursor.

Why plain synchronous ``sqlite3`` calls on the event loop, and not a thread: every call is one
small statement on a local file (about 60 µs, or about 0.6 ms with ``durable=True`` where the
commit waits for an fsync, measured on the CI disk). More importantly, ``send()`` must give an
outbox entry its position *before it first awaits*: then concurrent ``send()`` calls keep the
order they were made in, and resends after a reconnect go out in that same order. A thread
pool could reorder two inserts.

WAL journal: a reader never blocks the writer, and a commit is one append. With
``synchronous=FULL`` (``durable=True``, the default) a queued message survives a power cut;
``synchronous=NORMAL`` survives a crash or ``kill -9`` of the process but may lose the last few
commits on a power cut.

One process at a time: the file is locked (``flock`` on ``<file>.lock``) while a client has it
open; the operating system drops the lock when the process dies, however it dies.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from mqchat.clients.errors import StoreInUse

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock; the lock is then advisory only
    fcntl = None  # type: ignore[assignment]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    position      INTEGER PRIMARY KEY AUTOINCREMENT,
    client_msg_id TEXT NOT NULL UNIQUE,
    payload       BLOB NOT NULL,
    created_at    REAL NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    position: int
    client_msg_id: str
    payload: bytes
    created_at: float


class LocalStore:
    def __init__(self, path: str | Path, *, durable: bool = True) -> None:
        self.path = str(path)
        self._lock: IO[bytes] | None = None
        if self.path != ":memory:":
            self._lock = _lock_file(self.path + ".lock")
            # Message texts are private: create the file (and so its WAL files) owner-only.
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        try:
            # isolation_level=None: autocommit, each statement is its own transaction.
            self._db = sqlite3.connect(self.path, isolation_level=None)
            if self.path != ":memory:":
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._db.executescript(_SCHEMA)
        except BaseException:
            self._release()
            raise

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the descriptor drops the flock
            self._lock = None

    # ------------------------------------------------------------------ identity

    def claim(self, user_id: str, device_id: str | None) -> str:
        """Bind the file to ``user_id`` (a file holds one user's state) and return the device
        id to use: the one given, else the one stored, else a new one."""
        owner = self._get("user_id")
        if owner is None:
            self._set("user_id", user_id)
        elif owner != user_id:
            raise ValueError(f"{self.path} holds the state of user {owner!r}, not {user_id!r}")
        if device_id is None:
            device_id = self._get("device_id") or f"py-{uuid.uuid4().hex[:12]}"
        self._set("device_id", device_id)
        return device_id

    # -------------------------------------------------------------------- outbox

    def enqueue(self, client_msg_id: str, payload: bytes) -> int:
        cur = self._db.execute(
            "INSERT INTO outbox (client_msg_id, payload, created_at) VALUES (?, ?, ?)",
            (client_msg_id, payload, time.time()),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def remove(self, client_msg_id: str) -> bool:
        return self._db.execute("DELETE FROM outbox WHERE client_msg_id = ?", (client_msg_id,)).rowcount > 0

    def has(self, client_msg_id: str) -> bool:
        row = self._db.execute("SELECT 1 FROM outbox WHERE client_msg_id = ?", (client_msg_id,)).fetchone()
        return row is not None

    def pending(self, after: int = 0) -> list[OutboxEntry]:
        """Entries after outbox position ``after``, oldest first."""
        rows = self._db.execute(
            "SELECT position, client_msg_id, payload, created_at FROM outbox WHERE position > ? ORDER BY position",
            (after,),
        ).fetchall()
        return [OutboxEntry(int(p), str(c), bytes(b), float(t)) for p, c, b, t in rows]

    # -------------------------------------------------------------------- cursor

    @property
    def cursor(self) -> int:
        """The highest seq of the stream that the application has processed."""
        return int(self._get("cursor") or 0)

    def save_cursor(self, seq: int) -> None:
        if seq > self.cursor:  # never moves back
            self._set("cursor", str(seq))

    # ------------------------------------------------------------------- helpers

    def _get(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set(self, key: str, value: str) -> None:
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )


def _lock_file(path: str) -> IO[bytes]:
    handle = open(path, "ab")  # noqa: SIM115 - held open for the store's lifetime
    if fcntl is not None:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise StoreInUse(f"{path.removesuffix('.lock')} is in use by another client process") from None
    with contextlib.suppress(OSError):
        os.chmod(path, 0o600)
    return handle
