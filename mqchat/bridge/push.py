"""Push hooks for offline users: a durable outbox and a worker that delivers it to a webhook.

When a message is stored, each recipient that has no device connected gets a push event,
written by ``save_messages`` in the message's own transaction (``PushHook`` is the store's
``OfflineHook``): it commits with the message or not at all, so it is never lost, and it
survives a restart. "Connected" is asked of a ``PresenceView``, the chat service's presence
book: this node's devices on a single node, every node's in cluster mode (kept from the nodes'
presence announcements). The answer is a snapshot taken as the message is stored.

``PushService`` claims due events (storage/push.py) and POSTs each to ``push.webhook_url``:
a JSON body, its HMAC-SHA256 in ``X-Mqchat-Signature``, a stable ``Idempotency-Key``. A 2xx
answer deletes the event; anything else (another status, a timeout, no connection) is a failed
attempt, retried after ``push.backoff_seconds`` doubling up to ``push.backoff_max_seconds``,
and after ``push.max_attempts`` the event is dead-lettered. Delivery is at least once: a
worker that stops mid-delivery leaves the event due again when its claim lapses, and the
receiver de-duplicates by the key. docs/operations.md, "Push hooks".
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from mqchat import __version__
from mqchat.bridge.store import PushClaim
from mqchat.config import PushSettings
from mqchat.core.errors import StorageUnavailable
from mqchat.core.protocol import format_time
from mqchat.tasks import stop_task

log = logging.getLogger(__name__)

EVENT_TYPE = "offline_message"
SIGNATURE_HEADER = "X-Mqchat-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
POLL_SECONDS = 1.0
"""Longest idle wait: events written by other nodes, and retries, are found within it."""
MIN_WAIT_SECONDS = 0.05


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class PresenceView(Protocol):
    def is_online(self, user_id: str) -> bool:
        """Whether the user has a device connected. Called inside a write transaction (on the
        database's worker thread for SQLite): it must answer at once, from memory."""


class PushHook:
    """The store's ``OfflineHook``: which recipients get a push event, and a wake-up once
    some were written."""

    def __init__(self, presence: PresenceView, loop: asyncio.AbstractEventLoop) -> None:
        self.presence = presence
        self._loop = loop
        self.wake = asyncio.Event()

    def offline(self, user_id: str) -> bool:
        return not self.presence.is_online(user_id)

    def queued(self) -> None:
        # From the SQLite writer thread (or the loop itself, for PostgreSQL). On SQLite the
        # worker's next claim runs on the same writer thread, after this commit.
        self._loop.call_soon_threadsafe(self.wake.set)


class PushStore(Protocol):
    async def claim_push_events(self, now_ms: int, limit: int, lease_ms: int) -> list[PushClaim]: ...

    async def push_delivered(self, event_id: int) -> None: ...

    async def push_failed(self, event_id: int, error: str, retry_at_ms: int | None) -> None: ...

    async def expire_push_events(self, created_before_ms: int) -> int: ...

    async def push_depths(self) -> dict[str, int]: ...

    async def next_push_due(self) -> int | None: ...


@dataclass
class PushStats:
    """Counters since start-up, for metrics; ``PushService.queue_depths()`` gives the gauges."""

    delivered: int = 0
    """Events the webhook accepted (2xx)."""
    failed_attempts: int = 0
    """Attempts that failed (another status, a timeout, a connection error)."""
    dead_lettered: int = 0
    """Events given up after ``push.max_attempts``."""
    dropped: int = 0
    """Events not sent because their message was recalled or deleted, or the recipient's account deleted."""
    expired: int = 0
    """Events deleted unsent after ``retention.offline_days``."""


def sign(secret: str, body: bytes) -> str:
    """The ``X-Mqchat-Signature`` of a body: hex HMAC-SHA256 keyed with ``push.webhook_secret``."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class PushService:
    def __init__(self, store: PushStore, settings: PushSettings, hook: PushHook, *, offline_days: float) -> None:
        assert settings.webhook_url is not None and settings.webhook_secret is not None
        self._store = store
        self._settings = settings
        self._url = settings.webhook_url
        self._secret = settings.webhook_secret
        self._offline_ms = int(offline_days * 86_400_000)
        self.hook = hook
        self.stats = PushStats()
        # A claim outlives the delivery's deadline: only a worker that died leaves it to lapse.
        self._lease_ms = int((settings.timeout_seconds * 2 + 5) * 1000)
        self._worker: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ gauges

    async def queue_depths(self) -> dict[str, int]:
        """Events waiting (``pending``, being delivered included) and dead-lettered (``dead``)."""
        return await self._store.push_depths()

    async def expire(self, at_ms: int) -> int:
        """Delete the events older than ``retention.offline_days`` (the retention pass calls it)."""
        count = await self._store.expire_push_events(at_ms - self._offline_ms)
        self.stats.expired += count
        if count:
            log.info("push: %d events older than retention.offline_days expired unsent", count)
        return count

    # ------------------------------------------------------------ worker

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(self._run(), name="mqchat-push")

    async def stop(self) -> None:
        if self._worker is not None:
            await stop_task(self._worker)
            self._worker = None

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=self._settings.concurrency)
        headers = {"User-Agent": f"mqchat/{__version__}", "Content-Type": "application/json"}
        async with httpx.AsyncClient(timeout=self._settings.timeout_seconds, limits=limits, headers=headers) as client:
            try:
                while True:
                    try:
                        await self._round(client)
                    except StorageUnavailable:
                        log.warning("push: the database is unavailable; trying again in %g s", POLL_SECONDS)
                        await asyncio.sleep(POLL_SECONDS)
            finally:
                for task in self._inflight:
                    task.cancel()
                await asyncio.gather(*self._inflight, return_exceptions=True)

    async def _round(self, client: httpx.AsyncClient) -> None:
        """Claim what free slots and due events allow, start their deliveries, then wait for a
        wake-up (a new event here, a slot freed) or the next due time."""
        self.hook.wake.clear()
        free = self._settings.concurrency - len(self._inflight)
        if free > 0:
            claimed = await self._store.claim_push_events(now_ms(), free, self._lease_ms)
            for claim in claimed:
                task = asyncio.create_task(self._deliver(client, claim))
                self._inflight.add(task)
                task.add_done_callback(self._finished)
            if len(claimed) == free:
                return  # maybe more are due: claim again as soon as slots free up
        wait = POLL_SECONDS
        if free > 0:  # else only a freed slot (a wake-up) lets more go
            due = await self._store.next_push_due()
            if due is not None:
                # Not less than MIN_WAIT: due events that another node holds must not spin us.
                wait = min(POLL_SECONDS, max(MIN_WAIT_SECONDS, (due - now_ms()) / 1000))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self.hook.wake.wait()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self.hook.wake.set()

    async def _deliver(self, client: httpx.AsyncClient, claim: PushClaim) -> None:
        try:
            await self._attempt(client, claim)
        except StorageUnavailable:
            # The outcome was not recorded: the claim lapses and the event is delivered again.
            log.warning("push: could not record the outcome of event %d; it will be sent again", claim.id)
        except Exception:
            log.exception("push: delivering event %d failed", claim.id)

    async def _attempt(self, client: httpx.AsyncClient, claim: PushClaim) -> None:
        message = claim.message
        if message is None or message.recalled_at is not None:
            await self._store.push_delivered(claim.id)  # nothing to tell any more
            self.stats.dropped += 1
            return
        body = self.body(claim)
        headers = {
            SIGNATURE_HEADER: sign(self._secret, body),
            IDEMPOTENCY_HEADER: event_id(claim),
            "X-Mqchat-Event": EVENT_TYPE,
            "X-Mqchat-Attempt": str(claim.attempt),
        }
        try:
            response = await client.post(self._url, content=body, headers=headers)
        except httpx.TimeoutException:
            error = f"no answer within {self._settings.timeout_seconds:g} s"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        else:
            if 200 <= response.status_code < 300:
                await self._store.push_delivered(claim.id)
                self.stats.delivered += 1
                return
            error = f"HTTP {response.status_code}"
        self.stats.failed_attempts += 1
        if claim.attempt >= self._settings.max_attempts:
            await self._store.push_failed(claim.id, error, None)
            self.stats.dead_lettered += 1
            log.warning(
                "push: event %s dead-lettered after %d attempts (last: %s)", event_id(claim), claim.attempt, error
            )
            return
        await self._store.push_failed(claim.id, error, now_ms() + self.backoff_ms(claim.attempt))

    def backoff_ms(self, attempt: int) -> int:
        """The wait after failed attempt number ``attempt`` (1, 2, ...)."""
        delay = min(self._settings.backoff_max_seconds, self._settings.backoff_seconds * 2 ** (attempt - 1))
        return int(delay * 1000)

    def body(self, claim: PushClaim) -> bytes:
        message = claim.message
        assert message is not None
        payload: dict[str, Any] = {
            "type": EVENT_TYPE,
            "event_id": event_id(claim),
            "recipient": claim.recipient,
            "message_id": message.id,
            "sender": message.sender,
            "conversation_id": str(message.conversation_for(claim.recipient)),
            "group_id": message.group_id,
            "msg_type": message.msg_type,
            "created_at": format_time(message.created_at),
        }
        if self._settings.preview_chars:
            payload["preview"] = message.content[: self._settings.preview_chars]
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def event_id(claim: PushClaim) -> str:
    """Stable across attempts, restarts and nodes: the idempotency key."""
    return f"{claim.message_id}:{claim.recipient}"
