"""``ChatClient``: the asyncio client of mqchat, with the client half of the reliability story.

How it is put together (one event loop, no locks: every handler below runs to completion
between two ``await``s):

* ``_run`` owns the connection: log in over HTTP when it has no token, connect (TCP or
  WebSocket, optionally TLS), subscribe to the stream and device topics, and on any failure
  wait ``Backoff.delay(n)`` and start again. Each connection runs three tasks: the reader
  (``_dispatch`` of every incoming payload), the sender (the outbox, in order) and the sync
  watchdog; the first one to fail ends the connection.
* ``send()`` writes the command to the outbox (SQLite) and waits for its ``message_ack``.
  The sender publishes outbox entries in outbox order; after every (re)connect it starts
  again from the oldest unacknowledged entry, always with the entry's ``client_msg_id``, so
  the server's idempotency turns a resend of a stored message into a duplicate ack.
* Stream events go through a ``StreamSequencer`` (order, de-duplication, holes) into the
  queue behind ``events()``. An event counts as processed when the application asks for the
  next one; the acker persists that cursor and then acks it to the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Literal, NoReturn, TypeVar

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import ValidationError

from mqchat.clients.backoff import Backoff
from mqchat.clients.errors import ClientClosed, ClientError, LoginFailed, chat_error
from mqchat.clients.http import Conversation, HttpApi, Message
from mqchat.clients.sequencer import StreamSequencer
from mqchat.clients.store import LocalStore, OutboxEntry
from mqchat.core.errors import ChatError, InvalidCommand, NotAuthorized, PayloadTooLarge
from mqchat.core.ids import DeviceAddress, check_id
from mqchat.core.protocol import (
    MAX_PAYLOAD_BYTES,
    SYNC_MAX_LIMIT,
    Ack,
    AnyStreamEvent,
    ErrorEvent,
    MarkAsRead,
    MessageAck,
    MsgType,
    NewMessage,
    RecallMessage,
    SendGroupMessage,
    SendMessage,
    SyncMessages,
    SyncResponse,
    Typing,
    TypingEvent,
    decode_event,
)
from mqchat.core.topics import device_topic, group_topic, inbox_topic, stream_topic

log = logging.getLogger(__name__)

#: Error codes after which a send is retried (same ``client_msg_id``); any other code is final.
#: All three say "nothing was stored, not now": overload, a database failure, the per-device
#: send rate (``rate_limited`` comes with ``retry_after``, which the client honours).
RETRYABLE_CODES = frozenset({"server_busy", "storage_unavailable", "rate_limited"})

# CONNACK refusals: MQTT 3.1.1 return codes, and the MQTT 5 reason codes paho maps them to.
_BAD_CREDENTIALS = frozenset({4, 5, 134, 135})
_BAD_IDENTIFIER = frozenset({2, 133})

Transport = Literal["tcp", "websockets"]
T = TypeVar("T")


class _End:
    """Put into a feed when it ends; stays there so every consumer sees it."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class _Feed(Generic[T]):
    """A queue that can be ended (closed, or failed with an error) for all its consumers."""

    def __init__(self, maxsize: int = 0) -> None:
        self._queue: asyncio.Queue[T | _End] = asyncio.Queue(maxsize)
        self._end: _End | None = None

    def put(self, item: T) -> None:
        if self._end is not None:
            return
        if self._queue.full():  # only bounded feeds (ephemeral events): drop the oldest
            self._queue.get_nowait()
        self._queue.put_nowait(item)

    def end(self, error: BaseException | None = None) -> None:
        if self._end is None:
            self._end = _End(error)
            if self._queue.full():
                self._queue.get_nowait()
            self._queue.put_nowait(self._end)

    async def get(self) -> T:
        if self._end is not None:
            self._raise(self._end)
        item = await self._queue.get()
        if isinstance(item, _End):
            self._queue.put_nowait(item)
            self._raise(item)
        return item

    @staticmethod
    def _raise(end: _End) -> NoReturn:
        if end.error is not None:
            raise end.error
        raise StopAsyncIteration


class _StreamEvents:
    """``async for event in client.events()``: taking the next event commits the previous one."""

    def __init__(self, client: ChatClient) -> None:
        self._client = client

    def __aiter__(self) -> _StreamEvents:
        return self

    async def __anext__(self) -> AnyStreamEvent:
        self._client._commit()
        event = await self._client._stream.get()
        self._client._handed_out = max(self._client._handed_out, event.seq)
        return event


class _Typing:
    def __init__(self, client: ChatClient) -> None:
        self._client = client

    def __aiter__(self) -> _Typing:
        return self

    async def __anext__(self) -> TypingEvent:
        return await self._client._typing.get()


@dataclass(slots=True)
class _InFlight:
    position: int
    payload: bytes
    due: float
    """When to publish it again if no answer came (loop time)."""


@dataclass(slots=True)
class _Connection:
    mqtt: aiomqtt.Client
    ready: bool = False
    """Subscribed: commands may be published, replies will be heard."""
    inflight: dict[str, _InFlight] = field(default_factory=dict)
    published_upto: int = 0
    catch_up_running: bool = True
    syncing: bool = True
    sync_deadline: float = 0.0
    sync_from: int = -1
    acked: int = 0
    paused_until: float = 0.0
    """After a retryable refusal nothing new is published before this (loop time)."""
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class ChatClient:
    """An mqchat device.

    ::

        async with ChatClient("alice", password="...", host="chat.example", store_path="alice.db") as chat:
            ack = await chat.send(to_user="bob", content="Hello Bob!")
            async for event in chat.events():
                ...

    ``store_path`` is the local SQLite file (outbox and cursor) and must not be shared by two
    running clients. Give ``password`` (the client logs in over HTTP, again whenever a token is
    refused) or ``token``. ``mqtt_port`` defaults to 1883, or 8083 with
    ``transport="websockets"``; ``tls`` is an ``ssl.SSLContext`` for both MQTT and HTTP.
    """

    def __init__(
        self,
        user_id: str,
        *,
        store_path: str | Path,
        password: str | None = None,
        token: str | None = None,
        host: str = "127.0.0.1",
        mqtt_port: int | None = None,
        http_port: int = 8080,
        http_url: str | None = None,
        transport: Transport = "tcp",
        websocket_path: str = "/mqtt",
        tls: ssl.SSLContext | None = None,
        device_id: str | None = None,
        backoff: Backoff | None = None,
        keepalive: int = 30,
        connect_timeout: float = 10.0,
        ack_timeout: float = 15.0,
        sync_timeout: float = 10.0,
        probe_interval: float | None = 60.0,
        ack_interval: float = 0.1,
        durable: bool = True,
        on_error: Callable[[ChatError], None] | None = None,
    ) -> None:
        if password is None and token is None:
            raise ValueError("give a password or a token")
        self.user_id = check_id(user_id, "user_id")
        if device_id is not None:
            check_id(device_id, "device_id")
        self._requested_device = device_id
        self._store_path = store_path
        self._durable = durable
        self._password = password
        self._token = token
        self._host = host
        self._transport: Transport = transport
        self._mqtt_port = mqtt_port or (8083 if transport == "websockets" else 1883)
        self._websocket_path = websocket_path
        self._tls = tls
        scheme = "https" if tls is not None else "http"
        self.http = HttpApi(http_url or f"{scheme}://{_host_for_url(host)}:{http_port}", ssl_context=tls)
        self._backoff = backoff or Backoff()
        self._keepalive = keepalive
        self._connect_timeout = connect_timeout
        self._ack_timeout = ack_timeout
        self._sync_timeout = sync_timeout
        self._probe_interval = probe_interval
        self._last_heard = 0.0
        self._ack_interval = ack_interval
        self._error_callback = on_error
        self._rng = random.Random()

        self._store: LocalStore | None = None
        self._device: DeviceAddress | None = None
        self._sequencer = StreamSequencer()
        self._stream: _Feed[AnyStreamEvent] = _Feed()
        self._typing: _Feed[TypingEvent] = _Feed(maxsize=1000)
        self._handed_out = 0
        self._committed = 0
        self._waiters: dict[str, asyncio.Future[MessageAck]] = {}
        self._retries: dict[str, int] = {}
        self._groups: set[str] = set()
        self._conn: _Connection | None = None
        self._outbox_changed = asyncio.Event()
        self._ack_needed = asyncio.Event()
        self._state = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._acker_task: asyncio.Task[None] | None = None
        self._closed = False
        self._fatal: BaseException | None = None
        self._failures = 0
        #: How many connections were established so far (for logs and tests).
        self.connections = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the local store and start connecting in the background; returns at once.

        Use ``wait_connected()`` to wait for the first connection. Sends made before it are
        kept in the outbox and go out as soon as the client is connected.
        """
        if self._closed:
            raise ClientClosed("this client was closed; create a new one")
        if self._store is not None:
            return
        store = LocalStore(self._store_path, durable=self._durable)
        try:
            device_id = store.claim(self.user_id, self._requested_device)
        except BaseException:
            store.close()
            raise
        self._store = store
        self._device = DeviceAddress(self.user_id, device_id)
        self._committed = self._handed_out = store.cursor
        self._sequencer = StreamSequencer(store.cursor)
        self._runner = asyncio.create_task(self._run(), name=f"mqchat-client-{self._device.client_id}")
        self._acker_task = asyncio.create_task(self._acker(), name="mqchat-client-acker")

    async def close(self) -> None:
        """Persist and ack what the application has taken from ``events()``, then disconnect.

        Unacknowledged sends stay in the outbox for the next client on the same file; their
        ``send()`` calls fail with ``ClientClosed``.
        """
        if self._closed:
            return
        self._closed = True
        self._commit()
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError, OSError):
                async with asyncio.timeout(2):
                    await self._flush_ack(conn)
        await _stop(task for task in (self._acker_task, self._runner) if task is not None)
        self._end_all(ClientClosed("the client was closed"), for_feeds=None)
        if self._store is not None:
            self._store.save_cursor(self._committed)
            self._store.close()
        self._changed()

    async def __aenter__(self) -> ChatClient:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def device_id(self) -> str:
        return self._require_device().device_id

    @property
    def token(self) -> str | None:
        """The access token in use (after the first login, when logging in with a password)."""
        return self._token

    @property
    def connected(self) -> bool:
        return self._ready_connection() is not None

    @property
    def cursor(self) -> int:
        """The highest seq the application has processed (taken from ``events()`` and moved on)."""
        return self._committed

    def outbox(self) -> list[OutboxEntry]:
        """Sends not yet acknowledged by the server, oldest first."""
        return self._require_store().pending()

    async def wait_connected(self) -> None:
        """Wait until the client is connected and subscribed (bound it with ``asyncio.timeout``).
        Raises ``LoginFailed`` if the server refused the credentials, ``ClientClosed`` after
        ``close()``."""
        await self._connection()

    # ---------------------------------------------------------------- messaging

    async def send(self, to_user: str, content: str, *, msg_type: MsgType = "text") -> MessageAck:
        """Send a 1:1 message; returns its ``message_ack`` (the message is stored).

        The message is in the local outbox when this coroutine first yields, and stays there
        until acknowledged, across reconnects and restarts of the application. Cancelling the
        call (e.g. a timeout) does not take it out. A final refusal by the server (unknown
        recipient, invalid content ...) raises that error as a ``ChatError`` subclass.
        """
        return await self._send(
            _build(SendMessage, client_msg_id=_new_id(), to_user=to_user, content=content, msg_type=msg_type)
        )

    async def send_to_group(self, group_id: str, content: str, *, msg_type: MsgType = "text") -> MessageAck:
        """Send to a group the user is a member of; otherwise as ``send()``."""
        return await self._send(
            _build(SendGroupMessage, client_msg_id=_new_id(), group_id=group_id, content=content, msg_type=msg_type)
        )

    def events(self) -> AsyncIterator[AnyStreamEvent]:
        """The user's stream (messages, receipts, read markers, recalls, group changes) in seq
        order, each event once.

        An event counts as processed when the loop asks for the next one (or the client is
        closed); the client then persists the cursor and acks it to the server. After a crash
        the event that was being processed is delivered again; nothing is skipped. Meant for
        one consumer at a time.
        """
        self._require_store()
        return _StreamEvents(self)

    def typing_events(self) -> AsyncIterator[TypingEvent]:
        """Ephemeral typing signals: from peers, and from groups given to ``watch_group_typing``.
        Not stored, not replayed; the oldest are dropped if nobody reads them."""
        return _Typing(self)

    async def mark_read(self, message_id: int) -> None:
        """Mark ``message_id`` and everything before it in its conversation read.

        Returns when the broker has the command (waiting for a connection if needed). The
        effect shows up in ``events()`` as a ``read_marker``; the sender gets ``message_read``.
        """
        await self._publish_command(_build(MarkAsRead, message_id=message_id).model_dump_json().encode())

    async def recall(self, message_id: int) -> None:
        """Recall one of the user's messages (within the server's recall window); shows up in
        ``events()`` as ``message_recalled``. A refusal is passed to ``on_error``."""
        await self._publish_command(_build(RecallMessage, message_id=message_id).model_dump_json().encode())

    async def typing(
        self, *, to_user: str | None = None, group_id: str | None = None, state: Literal["started", "stopped"]
    ) -> bool:
        """Tell a peer or a group that the user started or stopped typing. Ephemeral: when
        offline it is dropped and ``False`` is returned."""
        payload = _build(Typing, to_user=to_user, group_id=group_id, state=state).model_dump_json().encode()
        conn = self._ready_connection()
        if conn is None:
            return False
        try:
            await conn.mqtt.publish(self._inbox, payload, qos=0)
        except aiomqtt.MqttError:
            return False
        return True

    async def watch_group_typing(self, group_id: str) -> None:
        """Receive the typing signals of a group the user is in (kept across reconnects)."""
        self._groups.add(check_id(group_id, "group_id"))
        conn = self._ready_connection()
        if conn is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await conn.mqtt.subscribe(group_topic(group_id), qos=0)

    async def conversations(self) -> list[Conversation]:
        """The user's conversations with unread counts (HTTP ``GET /v1/conversations``)."""
        return await self.http.conversations(await self._access_token())

    async def history(self, conversation_id: str, *, limit: int = 50, before_id: int | None = None) -> list[Message]:
        """A page of a conversation (``user:{peer}`` or ``group:{id}``), newest first."""
        return await self.http.history(await self._access_token(), conversation_id, limit=limit, before_id=before_id)

    def drop_connection(self) -> bool:
        """Cut the current connection as a network failure would (the socket is shut down
        under the MQTT client); the client then reconnects and resends. For fault tests."""
        conn = self._conn
        if conn is None:
            return False
        sock: Any = conn.mqtt._client.socket()
        raw = getattr(sock, "_socket", sock)  # paho wraps the TCP socket for WebSocket
        if raw is None:
            return False
        with contextlib.suppress(OSError):
            raw.shutdown(socket.SHUT_RDWR)
        return True

    # ------------------------------------------------------------------ sending

    async def _send(self, command: SendMessage | SendGroupMessage) -> MessageAck:
        store = self._require_store()
        self._check_usable()
        payload = command.model_dump_json().encode()
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise PayloadTooLarge(f"the command is {len(payload)} bytes; the limit is {MAX_PAYLOAD_BYTES}")
        waiter: asyncio.Future[MessageAck] = asyncio.get_running_loop().create_future()
        self._waiters[command.client_msg_id] = waiter
        store.enqueue(command.client_msg_id, payload)  # synchronous: see mqchat/clients/store.py
        self._outbox_changed.set()
        try:
            return await waiter
        finally:
            self._waiters.pop(command.client_msg_id, None)

    async def _sender(self, conn: _Connection) -> None:
        """Publish the outbox in order: first what is due again (unanswered for
        ``ack_timeout``, or refused for now and its wait over), then what was never published
        on this connection. A retryable refusal pauses the sender, so that the refused entry
        goes out again before anything newer: the order survives unless messages published
        behind it were accepted before the refusal came back."""
        store = self._require_store()
        loop = asyncio.get_running_loop()
        while True:
            self._outbox_changed.clear()
            if loop.time() >= conn.paused_until:
                due = sorted((f.position, cid) for cid, f in conn.inflight.items() if f.due <= loop.time())
                for _, client_msg_id in due:
                    if client_msg_id in conn.inflight and loop.time() >= conn.paused_until:
                        await self._publish_entry(conn, client_msg_id)
                for entry in store.pending(after=conn.published_upto):
                    if loop.time() < conn.paused_until:
                        break
                    conn.inflight[entry.client_msg_id] = _InFlight(entry.position, entry.payload, 0.0)
                    await self._publish_entry(conn, entry.client_msg_id)
                    conn.published_upto = entry.position
            wake = min((f.due for f in conn.inflight.values()), default=loop.time() + 3600)
            if loop.time() < conn.paused_until:
                wake = conn.paused_until
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(wake - loop.time(), 0.005)):
                    await self._outbox_changed.wait()

    async def _publish_entry(self, conn: _Connection, client_msg_id: str) -> None:
        flight = conn.inflight[client_msg_id]
        await conn.mqtt.publish(self._inbox, flight.payload, qos=1)
        flight.due = asyncio.get_running_loop().time() + self._ack_timeout

    def _own_message(self, event: NewMessage) -> None:
        """Our message in our own stream proves it stored as much as its ack does (both are
        published after the commit, on different topics): if the ack was lost, it stands in."""
        if event.client_msg_id in self._waiters or self._require_store().has(event.client_msg_id):
            self._on_message_ack(
                MessageAck(
                    client_msg_id=event.client_msg_id,
                    server_msg_id=event.server_msg_id,
                    seq=event.seq,
                    created_at=event.created_at,
                )
            )

    def _on_message_ack(self, ack: MessageAck) -> None:
        # The message is at ack.seq in our own stream: if its live copy never comes (lost in
        # transit), the watchdog sees the client behind and syncs. Not at once: the copy
        # travels on another topic and usually arrives just after the ack.
        self._sequencer.note_head(ack.seq)
        cid = ack.client_msg_id
        self._forget(cid)
        waiter = self._waiters.pop(cid, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(ack)

    def _on_error_event(self, event: ErrorEvent) -> None:
        ref = event.ref
        store = self._require_store()
        if ref is not None and store.has(ref):
            if event.code in RETRYABLE_CODES:
                attempt = self._retries[ref] = self._retries.get(ref, 0) + 1
                retry_after = getattr(event, "retry_after", None)  # with rate_limited
                wait = float(retry_after) if retry_after is not None else self._backoff.delay(attempt - 1, self._rng)
                conn = self._conn
                flight = conn.inflight.get(ref) if conn is not None else None
                if conn is not None and flight is not None:
                    resume = asyncio.get_running_loop().time() + wait
                    flight.due = resume
                    conn.paused_until = max(conn.paused_until, resume)
                    self._outbox_changed.set()
                log.info("send %s refused for now (%s); retrying in %.2f s", ref, event.code, wait)
                return
            self._forget(ref)
            waiter = self._waiters.pop(ref, None)
            if waiter is not None and not waiter.done():
                waiter.set_exception(chat_error(event.code, event.message, ref))
                return
        error = chat_error(event.code, event.message, ref)
        log.warning("server error %s: %s", event.code, event.message)
        if self._error_callback is not None:
            self._error_callback(error)

    def _forget(self, client_msg_id: str) -> None:
        self._require_store().remove(client_msg_id)
        self._retries.pop(client_msg_id, None)
        if self._conn is not None:
            self._conn.inflight.pop(client_msg_id, None)

    async def _publish_command(self, payload: bytes) -> None:
        """Publish on some connection (the current one or the next), at QoS 1."""
        while True:
            conn = await self._connection()
            try:
                await conn.mqtt.publish(self._inbox, payload, qos=1)
                return
            except aiomqtt.MqttError:
                while self._conn is conn:  # wait for this connection to be torn down
                    await self._state.wait()

    async def _connection(self) -> _Connection:
        while True:
            self._check_usable()
            conn = self._ready_connection()
            if conn is not None:
                return conn
            await self._state.wait()

    def _ready_connection(self) -> _Connection | None:
        conn = self._conn
        return conn if conn is not None and conn.ready else None

    # --------------------------------------------------------- receiving, sync

    def _dispatch(self, payload: bytes) -> None:
        try:
            event = decode_event(payload)
        except (ChatError, ValueError) as exc:  # ValueError covers bad JSON and pydantic errors
            log.warning("ignoring an event the client does not understand: %s", exc)
            return
        if isinstance(event, MessageAck):
            self._on_message_ack(event)
        elif isinstance(event, SyncResponse):
            self._on_sync_response(event)
        elif isinstance(event, ErrorEvent):
            self._on_error_event(event)
        elif isinstance(event, TypingEvent):
            self._typing.put(event)
        else:
            self._take(event)
            self._maybe_sync()

    def _take(self, event: AnyStreamEvent) -> None:
        self._last_heard = asyncio.get_running_loop().time()
        if isinstance(event, NewMessage) and event.from_user == self.user_id:
            self._own_message(event)
        for ready in self._sequencer.offer(event):
            self._stream.put(ready)

    def _on_sync_response(self, response: SyncResponse) -> None:
        self._last_heard = asyncio.get_running_loop().time()
        for event in response.events:
            self._take(event)
        self._sequencer.note_head(response.latest_seq)
        conn = self._conn
        if conn is None:
            return
        if response.has_more:
            # The server pages its own catch-up; an answer to our request needs the next ask.
            if conn.catch_up_running:
                conn.sync_deadline = asyncio.get_running_loop().time() + self._sync_timeout
            else:
                self._request_sync(conn)
            return
        conn.catch_up_running = False
        if self._sequencer.contiguous > conn.sync_from or not self._sequencer.behind:
            conn.syncing = False
            self._maybe_sync()
        else:
            # An answer that filled nothing: the watchdog asks again after sync_timeout, so a
            # stubborn hole costs one request per sync_timeout, not a tight loop.
            conn.sync_deadline = asyncio.get_running_loop().time() + self._sync_timeout

    def _maybe_sync(self) -> None:
        conn = self._conn
        if conn is not None and self._sequencer.behind and not conn.syncing:
            self._request_sync(conn)

    def _request_sync(self, conn: _Connection) -> None:
        """Ask for the events after our contiguous prefix (one page; more pages on has_more)."""
        conn.syncing = True
        conn.sync_from = self._sequencer.contiguous
        conn.sync_deadline = asyncio.get_running_loop().time() + self._sync_timeout
        command = SyncMessages(since_seq=self._sequencer.contiguous, limit=SYNC_MAX_LIMIT)
        self._spawn(conn, conn.mqtt.publish(self._inbox, command.model_dump_json().encode(), qos=1))

    async def _sync_watchdog(self, conn: _Connection) -> None:
        """A sync (or the catch-up) that gets no answer in time is asked for again; a known
        hole is filled; and a stream silent for ``probe_interval`` is probed with a sync, since
        a lost live delivery of the *last* event would otherwise go unnoticed until the next."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, self._sync_timeout / 2))
            now = loop.time()
            if conn.syncing:
                if now > conn.sync_deadline:
                    # Also when not behind: a catch-up that never came leaves the head unknown.
                    conn.catch_up_running = False
                    self._request_sync(conn)
            elif self._sequencer.behind:
                self._request_sync(conn)
            elif self._probe_interval is not None and now - self._last_heard > self._probe_interval:
                self._last_heard = now
                self._request_sync(conn)

    # ------------------------------------------------------- cursor and acks

    def _commit(self) -> None:
        if self._handed_out > self._committed:
            self._committed = self._handed_out
            self._ack_needed.set()

    async def _acker(self) -> None:
        """Persist the cursor, then ack it (batched: at most one ack per ``ack_interval``)."""
        while not self._closed:
            await self._ack_needed.wait()
            await asyncio.sleep(self._ack_interval)
            self._ack_needed.clear()
            conn = self._conn
            if conn is None:
                self._require_store().save_cursor(self._committed)
                continue
            try:
                await self._flush_ack(conn)
            except aiomqtt.MqttError:
                self._ack_needed.set()  # again on the next connection

    async def _flush_ack(self, conn: _Connection) -> None:
        target = self._committed
        self._require_store().save_cursor(target)  # local first: the server's cursor never runs ahead
        if target > conn.acked:
            await conn.mqtt.publish(self._inbox, Ack(seq=target).model_dump_json().encode(), qos=1)
            conn.acked = max(conn.acked, target)

    # --------------------------------------------------------------- connection

    async def _run(self) -> None:
        while not self._closed:
            try:
                await self._session()
            except LoginFailed as exc:
                log.error("mqchat client %s: %s", self.user_id, exc)
                self._fail(exc)
                return
            except (aiomqtt.MqttError, ClientError, ChatError, OSError) as exc:
                log.info("connection to %s:%s lost or refused: %s", self._host, self._mqtt_port, exc)
            except Exception:  # a bug must not end the reconnect loop: log it and carry on
                log.exception("mqchat client %s: unexpected error; reconnecting", self.user_id)
            if self._closed:
                return
            delay = self._backoff.delay(self._failures, self._rng)
            self._failures += 1
            log.info("reconnecting in %.2f s", delay)
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        fresh = self._token is None
        token = await self._access_token()
        device = self._require_device()
        mqtt = aiomqtt.Client(
            self._host,
            self._mqtt_port,
            identifier=device.client_id,
            username=self.user_id,
            password=token,
            transport=self._transport,
            websocket_path=self._websocket_path if self._transport == "websockets" else None,
            tls_context=self._tls,
            keepalive=self._keepalive,
            timeout=self._connect_timeout,
            clean_session=True,
        )
        try:
            try:
                await mqtt.__aenter__()
            except BaseException:
                _discard_socket(mqtt)
                raise
        except MqttConnectError as exc:
            code = _code(exc.rc)
            if code in _BAD_CREDENTIALS:
                if self._password is not None and not fresh:
                    self._token = None  # expired or revoked: log in again on the next attempt
                    raise
                # 0x05 also means "too many connections for this user": only a token that the
                # HTTP API refuses as well is a reason to give up.
                if await self._token_refused(token):
                    raise LoginFailed(f"the server refused the token of {self.user_id!r} ({exc})") from exc
                raise
            if code in _BAD_IDENTIFIER:
                raise LoginFailed(f"the server refused the client id {device.client_id!r} ({exc})") from exc
            raise
        try:
            await self._connected(mqtt)
        finally:
            with contextlib.suppress(aiomqtt.MqttError, OSError):
                await mqtt.__aexit__(None, None, None)

    async def _connected(self, mqtt: aiomqtt.Client) -> None:
        device = self._require_device()
        topics = [(stream_topic(self.user_id), 1), (device_topic(device), 1)]
        topics += [(group_topic(group), 0) for group in sorted(self._groups)]
        conn = _Connection(mqtt)
        conn.sync_deadline = asyncio.get_running_loop().time() + self._sync_timeout
        # Set before SUBSCRIBE: the catch-up pages can arrive before the SUBACK is processed.
        self._conn = conn
        try:
            granted = await mqtt.subscribe(topics)
            if not (_granted(granted[0]) and _granted(granted[1])):
                raise ClientError(f"the server refused the subscriptions of {device.client_id}: {granted}")
            conn.ready = True
            self._failures = 0
            self.connections += 1
            self._changed()
            if self._committed > 0:
                self._ack_needed.set()  # tell this connection's server where we are
            reader = asyncio.create_task(self._reader(mqtt))
            sender = asyncio.create_task(self._sender(conn))
            watchdog = asyncio.create_task(self._sync_watchdog(conn))
            conn.tasks |= {reader, sender, watchdog}
            done, _ = await asyncio.wait((reader, sender, watchdog), return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises the error that ended the connection
            raise aiomqtt.MqttError("the connection ended")
        finally:
            self._conn = None
            await _stop(list(conn.tasks))
            self._changed()

    async def _reader(self, mqtt: aiomqtt.Client) -> None:
        async for message in mqtt.messages:
            payload = message.payload
            if isinstance(payload, bytes | bytearray):
                self._dispatch(bytes(payload))
            elif isinstance(payload, str):
                self._dispatch(payload.encode())

    async def _token_refused(self, token: str) -> bool:
        try:
            await self.http.request("GET", "/v1/conversations?limit=1", token=token)
        except NotAuthorized:
            return True
        except (ChatError, ClientError):
            return False  # cannot tell: keep trying
        return False

    async def _access_token(self) -> str:
        if self._token is not None:
            return self._token
        assert self._password is not None
        try:
            self._token = await self.http.login(self.user_id, self._password, device_id=self.device_id)
        except (NotAuthorized, InvalidCommand) as exc:
            raise LoginFailed(f"login of {self.user_id!r} refused: {exc.message}", exc) from exc
        return self._token

    # ------------------------------------------------------------------ helpers

    @property
    def _inbox(self) -> str:
        return inbox_topic(self._require_device())

    def _spawn(self, conn: _Connection, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(_quietly(work))
        conn.tasks.add(task)
        task.add_done_callback(conn.tasks.discard)

    def _changed(self) -> None:
        """Wake everyone waiting for a change of state (connected, disconnected, closed)."""
        self._state.set()
        self._state = asyncio.Event()

    def _fail(self, error: BaseException) -> None:
        self._fatal = error
        self._end_all(error, for_feeds=error)
        self._changed()

    def _end_all(self, error: BaseException, *, for_feeds: BaseException | None) -> None:
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(error)
        self._waiters.clear()
        self._stream.end(for_feeds)
        self._typing.end(for_feeds)

    def _check_usable(self) -> None:
        if self._closed:
            raise ClientClosed("the client was closed")
        if self._fatal is not None:
            raise self._fatal

    def _require_store(self) -> LocalStore:
        if self._store is None:
            raise ClientClosed("the client is not started; call start() or use 'async with'")
        return self._store

    def _require_device(self) -> DeviceAddress:
        if self._device is None:
            raise ClientClosed("the client is not started; call start() or use 'async with'")
        return self._device


_Model = TypeVar("_Model", SendMessage, SendGroupMessage, MarkAsRead, RecallMessage, Typing)


def _build(model: type[_Model], **fields: Any) -> _Model:
    """A command checked by the protocol's own model; bad input is ``InvalidCommand``."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or model.__name__
        raise InvalidCommand(f"{where}: {first['msg']}", ref=fields.get("client_msg_id")) from None


def _new_id() -> str:
    return str(uuid.uuid4())


def _code(rc: int | ReasonCode | None) -> int | None:
    if isinstance(rc, ReasonCode):
        return int(rc.value)
    return rc


def _granted(code: int | ReasonCode) -> bool:
    return (_code(code) or 0) < 0x80


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _discard_socket(mqtt: aiomqtt.Client) -> None:
    """Close the socket of a connection attempt that failed after the TCP connect (CONNACK
    refused or never received): aiomqtt leaves it to the garbage collector."""
    paho = mqtt._client
    if paho.socket() is not None:
        with contextlib.suppress(OSError):
            paho._sock_close()


async def _stop(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel the tasks and wait until they are done.

    Cancelling once is not enough: on Python 3.11 ``asyncio.wait_for`` (inside aiomqtt's
    publish) drops a cancellation that arrives together with its result, and the task runs on.
    So cancel again until each task has ended.
    """
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            log.debug("task %s ended with %r", task.get_name(), task.exception())


async def _quietly(work: Coroutine[Any, Any, None]) -> None:
    with contextlib.suppress(aiomqtt.MqttError):
        await work
