"""``SqlStore``: the concern classes combined in one store, over one database."""

from __future__ import annotations

from mqchat.bridge.storage.accounts import AccountsStore
from mqchat.bridge.storage.admin import AdminStore
from mqchat.bridge.storage.attachments import AttachmentsStore
from mqchat.bridge.storage.conversations import ConversationsStore
from mqchat.bridge.storage.database import Database, open_database, ping
from mqchat.bridge.storage.groups import GroupsStore
from mqchat.bridge.storage.health import HealthStore
from mqchat.bridge.storage.push import PushStore
from mqchat.bridge.storage.recall import RecallStore
from mqchat.bridge.storage.receipts import ReceiptsStore
from mqchat.bridge.storage.retention import RetentionStore
from mqchat.bridge.storage.schema import SchemaState, migrate, state
from mqchat.bridge.storage.sends import SendsStore


class SqlStore(
    AccountsStore,
    SendsStore,
    ReceiptsStore,
    RecallStore,
    ConversationsStore,
    GroupsStore,
    RetentionStore,
    AdminStore,
    PushStore,
    AttachmentsStore,
    HealthStore,
):
    """``MessageStore`` on SQLite or PostgreSQL, picked by the URL."""

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        statement_timeout: float = 5.0,
        idle_in_transaction_timeout: float = 0.0,
        node_id: str | None = None,
    ) -> SqlStore:
        return cls(
            open_database(
                url,
                statement_timeout=statement_timeout,
                idle_in_transaction_timeout=idle_in_transaction_timeout,
                node_id=node_id,
            )
        )

    @property
    def database(self) -> Database:
        return self.db

    async def create_schema(self) -> None:
        """Apply the pending migrations (schema.py)."""
        await self.migrate()

    async def migrate(self, *, apply: bool = True) -> SchemaState:
        """Bring the schema to the head revision under the migration lock (``apply=False``:
        only check that it is there); returns the state found. Raises ``SchemaError``."""
        return await self.db.run_schema(lambda conn: migrate(conn, apply=apply))

    async def schema_state(self) -> SchemaState:
        return await self.db.run_schema(state)

    async def ping(self) -> None:
        await self.db.run("ping", ping)

    async def unreachable(self) -> str | None:
        """None if the database answers, else why not (one line, not logged)."""
        return await self.db.unreachable()

    async def close(self) -> None:
        await self.db.close()
