"""The composition root: builds the store, accounts and chat service, and closes them in order.

The broker plugin and the FastAPI app both receive the one ``Services`` made here;
nothing creates engines or clients at import time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from mqchat.bridge.auth import Accounts, EventKeys, TokenIssuer
from mqchat.bridge.chat import ChatService
from mqchat.bridge.files import Attachments, LocalFileStore
from mqchat.bridge.storage import SqlStore
from mqchat.bridge.store import MessageStore
from mqchat.config import Settings


@dataclass(frozen=True)
class Services:
    settings: Settings
    store: MessageStore
    accounts: Accounts
    chat: ChatService
    event_keys: EventKeys
    files: Attachments

    @property
    def tokens(self) -> TokenIssuer:
        return self.accounts.tokens


@asynccontextmanager
async def build_services(settings: Settings) -> AsyncIterator[Services]:
    settings.prepare_data_dir()
    sql = SqlStore.from_url(settings.resolved_database_url())
    store: MessageStore = sql
    try:
        # Pending migrations are applied under a database lock, so nodes starting together
        # are safe; a schema newer than this code is refused (SchemaError).
        await sql.migrate(apply=settings.database.auto_migrate)
        secret = settings.resolved_secret()
        tokens = TokenIssuer(secret, settings.auth.token_ttl_seconds)
        event_keys = EventKeys(secret)
        limits = settings.limits
        chat = ChatService(
            store,
            settings.bridge,
            max_payload_bytes=settings.mqtt.max_payload_bytes,
            limits=limits,
            event_keys=event_keys,
        )
        files_dir = settings.resolved_files_dir()
        files = Attachments(store, LocalFileStore(files_dir), settings.files, files_dir / "thumbs")
        await chat.start()
        try:
            yield Services(settings, store, Accounts(store, tokens, settings.auth), chat, event_keys, files)
        finally:
            await chat.stop()
    finally:
        await store.close()
