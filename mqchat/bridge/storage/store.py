"""``SqlStore``: the concern classes combined in one store, over one database."""

from __future__ import annotations

from sqlalchemy import Connection

from mqchat.bridge.storage.accounts import AccountsStore
from mqchat.bridge.storage.conversations import ConversationsStore
from mqchat.bridge.storage.database import Database, open_database, ping
from mqchat.bridge.storage.groups import GroupsStore
from mqchat.bridge.storage.recall import RecallStore
from mqchat.bridge.storage.receipts import ReceiptsStore
from mqchat.bridge.storage.sends import SendsStore
from mqchat.bridge.tables import METADATA


class SqlStore(AccountsStore, SendsStore, ReceiptsStore, RecallStore, ConversationsStore, GroupsStore):
    """``MessageStore`` on SQLite or PostgreSQL, picked by the URL."""

    @classmethod
    def from_url(cls, url: str) -> SqlStore:
        return cls(open_database(url))

    @property
    def database(self) -> Database:
        return self.db

    async def create_schema(self) -> None:
        def create(conn: Connection) -> None:
            with conn.begin():
                METADATA.create_all(conn)

        await self.db.run_schema(create)

    async def ping(self) -> None:
        await self.db.run("ping", ping)

    async def close(self) -> None:
        await self.db.close()
