"""Schema migrations: a database from before migrations is upgraded without loss, several
processes migrating one empty database at once all succeed, a newer schema is refused."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import warnings
from pathlib import Path

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, make_url, text

from mqchat.bridge.composition import build_services
from mqchat.bridge.storage import SqlStore
from mqchat.bridge.storage.database import prepare_sqlite_connection
from mqchat.bridge.storage.schema import SchemaError, head
from mqchat.bridge.store import SendOutcome, SendRequest
from mqchat.bridge.tables import METADATA
from mqchat.cli import main
from mqchat.config import Settings
from mqchat.core.ids import ConversationId
from mqchat.core.protocol import GroupUpdated, NewMessage

LEGACY = Path(__file__).parent / "legacy"
FOLDED_INDEX = "uq_users_user_id_lower"
T = "'2026-01-01 00:00:00.000000'"
# What the old code stored for: ann and ben talking, a group g1 (cat left it), a cursor,
# a delivered watermark and a device revocation.
LEGACY_DATA = f"""
INSERT INTO users (user_id, password_hash, last_seq, created_at) VALUES
  ('ann', 'hash-ann', 3, {T}), ('ben', 'hash-ben', 2, {T}), ('cat', 'hash-cat', 0, {T});
INSERT INTO groups (group_id, name, owner, created_at) VALUES ('g1', 'crew', 'ann', {T});
INSERT INTO group_members (group_id, user_id, active, joined_at) VALUES
  ('g1', 'ann', true, {T}), ('g1', 'ben', true, {T}), ('g1', 'cat', false, {T});
INSERT INTO messages (sender, client_msg_id, to_user, group_id, content, msg_type, sender_seq, created_at) VALUES
  ('ann', 'c1', 'ben', NULL, 'hello ben', 'text', 1, {T}),
  ('ann', 'c2', NULL, 'g1', 'hello crew', 'text', 2, {T});
INSERT INTO stream_events (user_id, seq, kind, conversation_id, message_id, payload) VALUES
  ('ann', 1, 'new_message', 'user:ben', 1, NULL),
  ('ben', 1, 'new_message', 'user:ann', 1, NULL),
  ('ann', 2, 'new_message', 'group:g1', 2, NULL),
  ('ben', 2, 'new_message', 'group:g1', 2, NULL),
  ('ann', 3, 'group_updated', 'group:g1', NULL,
   '{{"group_id": "g1", "action": "member_left", "user_id": "cat", "by": "cat"}}');
INSERT INTO device_cursors (user_id, device_id, acked_seq, updated_at) VALUES ('ben', 'phone', 2, {T});
INSERT INTO conversation_marks (user_id, conversation_id, delivered_upto, delivered_at, read_upto, read_at)
  VALUES ('ben', 'user:ann', 1, {T}, 0, NULL);
INSERT INTO device_revocations (user_id, device_id, revoked_at_ms) VALUES ('ben', 'old-laptop', 1234);
"""


async def _create_legacy(url: str) -> None:
    """The tables exactly as the code before migrations made them, with data, and no
    ``alembic_version``."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        assert parsed.database is not None
        with sqlite3.connect(parsed.database) as db:
            db.executescript((LEGACY / "sqlite.sql").read_text() + LEGACY_DATA)
        return
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await conn.execute((LEGACY / "postgresql.sql").read_text())
        await conn.execute(LEGACY_DATA)
    finally:
        await conn.close()


async def test_a_database_from_before_migrations_is_upgraded_and_loses_nothing(database_url: str) -> None:
    await _create_legacy(database_url)
    store = SqlStore.from_url(database_url)
    try:
        assert (await store.schema_state()).current == "legacy"
        before = await store.migrate()
        assert before.current == "legacy"
        assert (await store.schema_state()).up_to_date

        assert await store.get_password_hash("ann") == "hash-ann"
        assert await store.device_revoked_at("ben", "old-laptop") == 1234
        assert await store.get_cursor("ben", "phone") == 2
        ann = await store.read_stream("ann", 0, 10)
        assert [e.seq for e in ann.events] == [1, 2, 3] and ann.latest_seq == 3
        first, second, third = ann.events
        assert isinstance(first, NewMessage) and first.content == "hello ben" and first.to_user == "ben"
        assert isinstance(second, NewMessage) and second.group_id == "g1"
        assert isinstance(third, GroupUpdated) and third.action == "member_left"
        assert [m.content for m in await store.history("ben", ConversationId.user("ann"), None, 10)] == ["hello ben"]
        [group] = await store.groups_of("ben")
        assert (group.name, group.members) == ("crew", ("ann", "ben"))
        [receipt] = await store.receipts("ann", 1)
        assert receipt.user_id == "ben" and receipt.delivered_at is not None and receipt.read_at is None

        # And the streams go on where they were: ids and seqs continue.
        [outcome] = await store.save_messages([SendRequest("ann", "c3", "again", "text", to_user="ben")])
        assert isinstance(outcome, SendOutcome)
        assert (outcome.message.id, outcome.message.sender_seq) == (3, 4)
        assert (await store.read_stream("ben", 2, 10)).events[0].seq == 3
    finally:
        await store.close()


async def test_the_migrations_build_exactly_the_tables_the_code_uses(database_url: str) -> None:
    store = SqlStore.from_url(database_url)
    try:
        await store.migrate()

        def differences(conn: Connection) -> list[object]:
            with conn.begin(), warnings.catch_warnings():
                # SQLAlchemy cannot reflect SQLite's expression indexes; checked below instead.
                warnings.filterwarnings("ignore", "Skipped unsupported reflection of expression-based index")
                warnings.filterwarnings("ignore", f"autogenerate skipping metadata-specified .* '{FOLDED_INDEX}'")
                found = compare_metadata(MigrationContext.configure(conn), METADATA)
                if conn.dialect.name == "sqlite":
                    indexes = conn.execute(text("SELECT sql FROM sqlite_master WHERE name = :n"), {"n": FOLDED_INDEX})
                    assert indexes.scalar_one() == f"CREATE UNIQUE INDEX {FOLDED_INDEX} ON users (lower(user_id))"
                return list(found)

        assert await store.database.run_schema(differences) == []
    finally:
        await store.close()


async def test_ten_processes_migrating_one_empty_database_at_once_all_succeed(database_url: str) -> None:
    # Separate engines and connections, as separate nodes would have: concurrent
    # CREATE TABLE on PostgreSQL failed about 1 start in 5 with a duplicate pg_type key.
    stores = [SqlStore.from_url(database_url) for _ in range(10)]
    try:
        states = await asyncio.gather(*(store.migrate() for store in stores))
        assert sum(state.current is None for state in states) == 1  # exactly one migrated
        assert all(state.up_to_date for state in await asyncio.gather(*(s.schema_state() for s in stores)))
    finally:
        for store in stores:
            await store.close()


async def _set_revision(url: str, revision: str) -> None:
    store = SqlStore.from_url(url)
    try:
        await store.migrate()

        def bump(conn: Connection) -> None:
            with conn.begin():
                conn.execute(text("UPDATE alembic_version SET version_num = :rev"), {"rev": revision})

        await store.database.run_schema(bump)
    finally:
        await store.close()


async def test_a_schema_newer_than_the_code_is_refused(
    database_url: str, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    await _set_revision(database_url, "9999")
    with pytest.raises(SchemaError, match="newer than this mqchat knows"):
        async with build_services(settings):
            pass
    code = await asyncio.to_thread(main, ["db", "upgrade", "--database-url", database_url])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "revision 9999, newer than this mqchat knows" in err


async def test_without_auto_migrate_an_old_schema_is_refused_until_db_upgrade(
    database_url: str, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings.model_copy(update={"database": settings.database.model_copy(update={"auto_migrate": False})})
    with pytest.raises(SchemaError, match="run `mqchat db upgrade`"):
        async with build_services(settings):
            pass
    assert await asyncio.to_thread(main, ["db", "current", "--database-url", database_url]) == 0
    assert "none (empty database)" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["db", "upgrade", "--database-url", database_url]) == 0
    assert f"to {head()} (head)" in capsys.readouterr().out
    async with build_services(settings) as services:
        await services.store.ping()


async def test_ids_differing_only_in_case_stop_the_upgrade_and_change_nothing(database_url: str) -> None:
    await _create_legacy(database_url)
    store = SqlStore.from_url(database_url)
    try:

        def clash(conn: Connection) -> None:
            with conn.begin():
                conn.execute(text(f"INSERT INTO users VALUES ('ANN', 'hash', 0, {T})"))

        await store.database.run_schema(clash)
        with pytest.raises(SchemaError, match=r"differ only in case: (ann, ANN|ANN, ann);"):
            await store.migrate()
        assert (await store.schema_state()).current == "legacy"  # one transaction: not even stamped
        assert await store.get_password_hash("ANN") == "hash"
    finally:
        await store.close()


def test_a_new_database_enters_wal_while_another_connection_writes(tmp_path: Path) -> None:
    """The first connection to a new database switches it to WAL, which needs an exclusive
    lock; while another connection writes, SQLite refuses that at once, without waiting for
    the busy timeout (CI: several stores opening one new file). The switch waits instead."""
    path = tmp_path / "new.db"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("CREATE TABLE t (x)")
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO t VALUES (1)")
    releases = threading.Timer(0.3, writer.execute, ("COMMIT",))
    releases.start()
    joining = sqlite3.connect(path, timeout=5, check_same_thread=False)
    try:
        prepare_sqlite_connection(joining)
        assert joining.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert joining.execute("SELECT x FROM t").fetchall() == [(1,)]  # it waited for the commit
    finally:
        releases.join()
        joining.close()
        writer.close()
