"""The composition root: builds the store, accounts and chat service, and closes them in order.

The broker (``MqttServer``) and the FastAPI app both receive the one ``Services`` made here;
nothing creates engines or clients at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from mqchat.bridge.admin import Administration
from mqchat.bridge.auth import Accounts, EventKeys, TokenIssuer
from mqchat.bridge.chat import ChatService
from mqchat.bridge.cluster import RedisCluster
from mqchat.bridge.files import Attachments, LocalFileStore
from mqchat.bridge.health import HealthMonitor
from mqchat.bridge.metrics import Metrics
from mqchat.bridge.operations import Operations
from mqchat.bridge.push import PushHook, PushService
from mqchat.bridge.retention import RetentionPruner
from mqchat.bridge.storage import SqlStore
from mqchat.bridge.storage.backup import database_file, in_use
from mqchat.bridge.storage.database import SqliteDatabase
from mqchat.bridge.store import MessageStore
from mqchat.config import Settings

log = logging.getLogger(__name__)

WAIT_FIRST_SECONDS = 0.5
WAIT_MAX_SECONDS = 10.0
"""Backoff of ``mqchat serve`` waiting for its database at start: doubling, up to this."""


@dataclass(frozen=True)
class Services:
    settings: Settings
    store: MessageStore
    accounts: Accounts
    chat: ChatService
    event_keys: EventKeys
    ops: Operations
    """Retention, push hooks, administration (background tasks started by ``run_server``)."""
    files: Attachments
    metrics: Metrics
    health: HealthMonitor

    @property
    def tokens(self) -> TokenIssuer:
        return self.accounts.tokens


async def wait_for_database(store: SqlStore) -> None:
    """Return once the database answers; until then log each failed attempt and back off."""
    delay = WAIT_FIRST_SECONDS
    attempt = 1
    while (why := await store.unreachable()) is not None:
        log.warning("waiting for the database (attempt %d): %s; next try in %g s", attempt, why, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, WAIT_MAX_SECONDS)
        attempt += 1
    if attempt > 1:
        log.warning("the database answers after %d attempts: starting", attempt)


@asynccontextmanager
async def build_services(settings: Settings, *, serving: bool = False) -> AsyncIterator[Services]:
    """``serving`` (``mqchat serve``): wait for a database that does not answer yet rather than
    fail, check its health in the background, and in cluster mode join the cluster (subscribe,
    heartbeat); a one-shot command does none of that (in cluster mode it may only tell the nodes
    things, such as closing a disabled user's connections)."""
    settings.prepare_data_dir()
    url = settings.resolved_database_url()
    database = database_file(url)
    # Every process with a SQLite database open holds its lock (shared): a restore waits for none.
    with in_use(database) if database is not None else contextlib.nullcontext():
        async with _services(settings, url, serving=serving) as services:
            yield services


@asynccontextmanager
async def _services(settings: Settings, url: str, *, serving: bool) -> AsyncIterator[Services]:
    node_id = settings.resolved_node_id()
    metrics = Metrics(node_id)
    sql = SqlStore.from_url(
        url,
        statement_timeout=settings.database.statement_timeout_seconds,
        idle_in_transaction_timeout=settings.database.idle_in_transaction_timeout_seconds,
        node_id=node_id,
    )
    store: MessageStore = sql
    if isinstance(sql.db, SqliteDatabase):
        metrics.watch_send_threads(sql.db)
    cluster = None
    if settings.redis_url:
        cluster = RedisCluster(settings.redis_url, settings.node_id, settings.cluster)
    try:
        if serving:
            await wait_for_database(sql)
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
            cluster=cluster,
            group_cache_seconds=settings.cluster.group_cache_seconds,
            metrics=metrics,
        )
        health = HealthMonitor(store, node_id, settings.database.health_timeout_seconds, metrics, cluster)
        if cluster is not None:
            await cluster.start(serve=serving)
        accounts = Accounts(store, tokens, settings.auth, cluster)
        push = None
        if settings.push.webhook_url is not None:
            # Push events are written with the messages from now on, whether or not this
            # process delivers them (only `mqchat serve` runs the worker).
            hook = PushHook(chat.presence, asyncio.get_running_loop())
            sql.push_hook = hook
            push = PushService(sql, settings.push, hook, offline_days=settings.retention.offline_days)
        ops = Operations(
            RetentionPruner(sql, settings.retention, also=push.expire if push is not None else None),
            Administration(sql, accounts, chat, batch_size=settings.retention.batch_size),
            push,
        )
        files_dir = settings.resolved_files_dir()
        files = Attachments(store, LocalFileStore(files_dir), settings.files, files_dir / "thumbs")
        await chat.start()
        if serving:
            health.start()
        try:
            yield Services(settings, store, accounts, chat, event_keys, ops, files, metrics, health)
        finally:
            await health.stop()
            await ops.stop()
            await chat.stop()
    finally:
        if cluster is not None:
            await cluster.stop()
        await store.close()
