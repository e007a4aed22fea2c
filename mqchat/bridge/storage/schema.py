"""Versioned schema migrations (Alembic), applied under a database lock.

The revisions live in ``migrations/versions/`` inside the package; Alembic runs them from
here, without an ini file or an ``env.py``. ``migrate`` runs in one transaction that
first takes a lock every migrating process takes (PostgreSQL: a transaction-scoped
advisory lock; SQLite: the database's write lock, ``BEGIN IMMEDIATE``), so several nodes
starting at once on an empty database run the migrations once and the others wait,
then find the schema current. PostgreSQL and SQLite both run DDL inside transactions:
a failed migration leaves the schema as it was.

A database made before migrations existed (mqchat's tables, no ``alembic_version``) is
recognized and stamped with the first revision, which is exactly that schema, and then
upgraded. A database at a revision this code does not know (made by a newer mqchat) is
refused, never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text

from mqchat.bridge.tables import METADATA

SCRIPTS = Path(__file__).parent / "migrations"
LEGACY = "0001"
"""The revision of a database created by ``create_all`` before migrations existed."""
# Any constant 64-bit key: the advisory lock that serializes migrating processes.
_PG_LOCK_KEY = 0x6D71636861740001


class SchemaError(Exception):
    """The database's schema is not one this code can serve; ``str()`` is a one-line reason."""


@dataclass(frozen=True, slots=True)
class SchemaState:
    current: str | None
    """The database's revision; None for an empty database, ``"legacy"`` for pre-migration tables."""
    head: str

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head


def _scripts() -> ScriptDirectory:
    config = Config()
    config.set_main_option("script_location", str(SCRIPTS))
    return ScriptDirectory.from_config(config)


def head() -> str:
    found = _scripts().get_current_head()
    assert found is not None
    return found


def _revision(conn: Connection) -> str | None:
    """The stored revision, ``"legacy"`` for mqchat's tables without one, None if empty."""
    found = MigrationContext.configure(conn).get_current_revision()
    if found is None and inspect(conn).has_table("users"):
        return "legacy"
    return found


def known_revisions() -> set[str]:
    """Every revision this code can upgrade from (or is at)."""
    return {script.revision for script in _scripts().walk_revisions()}


def _check_known(current: str | None, scripts: ScriptDirectory) -> None:
    known = {script.revision for script in scripts.walk_revisions()}
    if current not in (None, "legacy") and current not in known:
        raise SchemaError(
            f"the database's schema is at revision {current}, newer than this mqchat knows "
            f"(up to {scripts.get_current_head()}): upgrade mqchat, or point it at another database"
        )


def state(conn: Connection) -> SchemaState:
    """Where the database stands, read without a lock and without changing anything."""
    scripts = _scripts()
    with conn.begin():
        current = _revision(conn)
    _check_known(current, scripts)
    return SchemaState(current, head())


def migrate(conn: Connection, *, apply: bool = True) -> SchemaState:
    """Bring the schema to the head revision under the lock, and return the state before.

    ``apply=False`` only checks: a schema behind the head raises ``SchemaError``
    (``mqchat db upgrade`` applies it). Runs on a connection outside any transaction.
    """
    scripts = _scripts()
    target = head()
    conn.execution_options(write=True)  # SQLite: BEGIN IMMEDIATE takes the write lock
    with conn.begin():
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        before = _revision(conn)
        _check_known(before, scripts)
        if before == target:
            return SchemaState(before, target)
        if not apply:
            raise SchemaError(
                f"the database's schema is at revision {before or 'none'}, this mqchat needs {target}: "
                "run `mqchat db upgrade` (or set database.auto_migrate = true)"
            )
        if before == "legacy":
            MigrationContext.configure(conn).stamp(scripts, LEGACY)
        _upgrade(conn, scripts, target)
    return SchemaState(before, target)


def _upgrade(conn: Connection, scripts: ScriptDirectory, target: str) -> None:
    def steps(revision: Any, _context: MigrationContext) -> Any:
        return scripts._upgrade_revs(target, revision)

    config = Config()
    config.set_main_option("script_location", str(SCRIPTS))
    with EnvironmentContext(config, scripts, fn=steps, destination_rev=target) as env:
        # The transaction is ours (opened above, with the lock): Alembic runs inside it.
        env.configure(connection=conn, target_metadata=METADATA)
        with env.begin_transaction():
            env.run_migrations()
