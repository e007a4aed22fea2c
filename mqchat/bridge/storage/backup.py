"""Backups: ``mqchat backup FILE`` and ``mqchat restore FILE`` (docs/operations.md, "Backups").

**SQLite.** The backup is taken with SQLite's online backup API from a separate connection
(a separate process, while ``mqchat serve`` writes): in one step, so it copies one read
transaction's snapshot of the database, which in WAL mode does not stop the writer. Every
transaction committed before that snapshot began (every acked message) is in it, none is
half in it. The copy is written next to its destination, checked (``integrity_check``),
turned into a single self-contained file (rollback journal, no ``-wal``), made private
(mode 0600: it holds password hashes) and renamed into place.

A restore must not run under a server: every process that opens a SQLite database through
``build_services`` holds a shared ``flock`` on ``{database}.lock`` while it runs, and a
restore takes it exclusively, or refuses. The current database is first copied aside
(``{database}.before-restore-{time}``), then the backup is written into it through the
backup API (so SQLite's own locking and WAL handling apply).

**PostgreSQL.** ``backup`` runs ``pg_dump`` (custom format, one snapshot) when it is on the
PATH; a restore is ``pg_restore`` into a database no node uses, which mqchat cannot check, so
``restore`` refuses and points to the documented commands.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import make_url

from mqchat.bridge.storage.database import is_sqlite

DOCS = "docs/operations.md, section Backups"


class BackupError(Exception):
    """A backup or restore that cannot be done; ``str()`` is a one-line reason."""


@dataclass(frozen=True, slots=True)
class Summary:
    revision: str | None
    users: int
    messages: int
    size: int

    def describe(self) -> str:
        return f"schema {self.revision}, {self.users} users, {self.messages} messages, {self.size:,} bytes"


def database_file(url: str) -> Path | None:
    """The file of a SQLite URL; None for PostgreSQL and for an in-memory SQLite database."""
    if not is_sqlite(url):
        return None
    database = make_url(url).database
    return None if database in (None, "", ":memory:") else Path(str(database))


# --------------------------------------------------------------------- the lock


def lock_path(database: Path) -> Path:
    return database.with_name(database.name + ".lock")


@contextlib.contextmanager
def in_use(database: Path) -> Iterator[None]:
    """Held (shared) by every mqchat process that has the database open: a restore waits for none."""
    with _locked(database, fcntl.LOCK_SH) as held:
        if not held:
            raise BackupError(f"a restore of {database} is in progress; start mqchat again when it is done")
        yield


@contextlib.contextmanager
def _locked(database: Path, mode: int) -> Iterator[bool]:
    database.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(lock_path(database), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing releases the lock


# ------------------------------------------------------------------- SQLite


def _summary(conn: sqlite3.Connection, path: Path) -> Summary:
    def count(table: str) -> int:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])

    revision = None
    with contextlib.suppress(sqlite3.Error):
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        revision = None if row is None else str(row[0])
    return Summary(revision, count("users"), count("messages"), path.stat().st_size)


def _check(conn: sqlite3.Connection, what: str) -> None:
    found = conn.execute("PRAGMA integrity_check").fetchall()
    if found != [("ok",)]:
        raise BackupError(f"{what} is damaged: {'; '.join(str(row[0]) for row in found[:3])}")


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def backup_sqlite(database: Path, target: Path) -> Summary:
    """A consistent copy of a (possibly serving) SQLite database at ``target``."""
    if not database.is_file():
        raise BackupError(f"there is no database at {database}")
    if target.resolve() == database.resolve():
        raise BackupError("the backup file cannot be the database itself")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    partial.unlink(missing_ok=True)
    os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        source = _connect(database)
        copy = _connect(partial)
        try:
            # pages=-1: the whole database in one step, one read transaction: one snapshot.
            source.backup(copy, pages=-1)
            copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            _check(copy, "the copy")
            summary = _summary(copy, partial)
        finally:
            copy.close()
            source.close()
        _fsync(partial)
        os.replace(partial, target)
        _fsync(target.parent)
        return summary
    finally:
        partial.unlink(missing_ok=True)


def restore_sqlite(backup: Path, database: Path, known_revisions: set[str]) -> tuple[Summary, Path | None]:
    """Replace ``database`` with ``backup``; returns the restored summary and where the
    database that was there has been kept (None if there was none)."""
    if not backup.is_file():
        raise BackupError(f"there is no backup at {backup}")
    try:
        with contextlib.closing(_connect(backup)) as check:
            _check(check, f"{backup}")
            found = _summary(check, backup)
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{backup} is not an mqchat backup ({exc})") from None
    if found.revision not in known_revisions:
        raise BackupError(
            f"{backup} is at schema revision {found.revision}, which this mqchat does not know: "
            "restore it with the mqchat version that made it"
        )
    with _locked(database, fcntl.LOCK_EX) as held:
        if not held:
            raise BackupError(f"a server (or another mqchat command) is using {database}: stop it, then restore")
        kept = None
        if database.exists():
            kept = database.with_name(f"{database.name}.before-restore-{time.strftime('%Y%m%dT%H%M%S')}")
            backup_sqlite(database, kept)
        else:
            database.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        source, target = _connect(backup), _connect(database)
        try:
            try:
                # Nobody may be writing: a process that writes without our lock (an older mqchat).
                target.execute("PRAGMA busy_timeout=2000")
                target.execute("BEGIN IMMEDIATE")
                target.execute("ROLLBACK")
                target.execute("PRAGMA busy_timeout=30000")
            except sqlite3.OperationalError as exc:
                raise BackupError(f"{database} is in use by another process ({exc}): stop it, then restore") from None
            source.backup(target, pages=-1)
            _check(target, "the restored database")
            restored = _summary(target, database)
        finally:
            target.close()
            source.close()
        return restored, kept


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------- PostgreSQL


def backup_postgres(url: str, target: Path) -> int:
    """``pg_dump`` of the database into ``target`` (custom format); its size in bytes."""
    pg_dump = shutil.which("pg_dump")
    if pg_dump is None:
        raise BackupError(f"pg_dump is not on the PATH; back up PostgreSQL with pg_dump or PITR ({DOCS})")
    parsed = make_url(url)
    env = os.environ.copy()
    if parsed.password:
        env["PGPASSWORD"] = str(parsed.password)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    args = [pg_dump, "--format=custom", "--no-owner", "--file", str(partial), "--dbname", str(parsed.database or "")]
    if parsed.host:
        args += ["--host", parsed.host]
    if parsed.port:
        args += ["--port", str(parsed.port)]
    if parsed.username:
        args += ["--username", parsed.username]
    try:
        done = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise BackupError(f"pg_dump failed: {last}")
        os.chmod(partial, 0o600)
        _fsync(partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target.stat().st_size
