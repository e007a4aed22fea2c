"""``ChatClient``: the asyncio client of mqchat, an I/O driver around ``ClientMachine``.

The reliability logic (outbox order and resends, the pause after a retryable refusal, the
stream cursor, catch-up, syncs, acks, and the check that events come from the server) is
the sans-IO ``ClientMachine`` in ``mqchat/clients/machine.py``, tested without sockets or
clocks. This module only does the I/O, in one event loop, without locks:

* ``_run`` owns the connection: log in over HTTP when it has no token (and fetch the event
  key when it has none), connect (TCP or WebSocket, optionally TLS), subscribe to the stream
  and device topics, and on any failure wait ``Backoff.delay(n)`` and start again. Each
  connection runs a reader (every delivery goes to ``ClientMachine.receive``) and a writer
  (the machine's publishes, in order); the first one to fail ends the connection.
* ``send()`` writes the command to the outbox (SQLite) before it first yields, tells the
  machine, and waits for the ``Resolve`` or ``Fail`` of that ``client_msg_id``.
* The ticker calls ``ClientMachine.tick`` at the machine's ``deadline`` (resends, the end of
  a pause, the sync watchdog, the batched ack) and after every other input.
* ``events()``: taking the next event commits the previous one (``ClientMachine.commit``).
  Besides the stream's events it yields a ``HistoryGap`` where retention deleted events this
  device had not read (the machine resets the cursor and reads on; mqchat/clients/gaps.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Literal, NoReturn, TypeVar

import aiomqtt
import paho.mqtt.client as paho
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import ValidationError

from mqchat.clients.backoff import Backoff
from mqchat.clients.errors import ClientClosed, ClientError, LoginFailed
from mqchat.clients.gaps import StreamItem
from mqchat.clients.http import Conversation, Group, HttpApi, Message
from mqchat.clients.machine import (
    RETRYABLE_CODES,
    Action,
    ClientMachine,
    Deliver,
    DeliverTyping,
    Fail,
    FetchSync,
    PersistCursor,
    ReportError,
    RequestSync,
    Resolve,
    SendAck,
    SendEntry,
)
from mqchat.clients.store import LocalStore, OutboxEntry
from mqchat.core.errors import ChatError, CursorExpired, InvalidCommand, NotAuthorized, PayloadTooLarge
from mqchat.core.ids import DeviceAddress, check_id
from mqchat.core.origin import decode_key
from mqchat.core.protocol import (
    MAX_PAYLOAD_BYTES,
    Ack,
    Attachment,
    MarkAsRead,
    MessageAck,
    MsgType,
    RecallMessage,
    SendGroupMessage,
    SendMessage,
    SyncMessages,
    SyncResponse,
    Typing,
    TypingEvent,
)
from mqchat.core.topics import device_topic, group_topic, inbox_topic, stream_topic

__all__ = ["RETRYABLE_CODES", "ChatClient", "Transport"]

log = logging.getLogger(__name__)

# CONNACK refusals: MQTT 3.1.1 return codes, and the MQTT 5 reason codes paho maps them to.
_BAD_CREDENTIALS = frozenset({4, 5, 134, 135})
_BAD_IDENTIFIER = frozenset({2, 133})

#: Publishes of one connection awaiting their PUBACK at a time. They leave in the order the
#: machine asked for them (each task hands its packet to paho in its first step, and tasks
#: start in creation order); the window bounds the work in flight and stays under aiomqtt's
#: "pending calls" warning threshold (10).
_PUBLISH_WINDOW = 8

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

    def __init__(self, feed: _Feed[StreamItem], commit: Callable[[], None], taken: Callable[[int], None]) -> None:
        self._feed = feed
        self._commit = commit
        self._taken = taken

    def __aiter__(self) -> _StreamEvents:
        return self

    async def __anext__(self) -> StreamItem:
        self._commit()
        event = await self._feed.get()
        self._taken(event.seq)
        return event


class _Typing:
    def __init__(self, feed: _Feed[TypingEvent]) -> None:
        self._feed = feed

    def __aiter__(self) -> _Typing:
        return self

    async def __anext__(self) -> TypingEvent:
        return await self._feed.get()


@dataclass(slots=True)
class _Connection:
    mqtt: aiomqtt.Client
    ready: bool = False
    """Subscribed: commands may be published, replies will be heard."""
    outgoing: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    """What the machine asked to publish on the inbox, in that order."""
    broken: asyncio.Event = field(default_factory=asyncio.Event)
    error: BaseException | None = None
    """The first publish that failed: it ends the connection."""
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self.broken.set()


class ChatClient:
    """An mqchat device.

    ::

        async with ChatClient("alice", password="...", host="chat.example", store_path="alice.db") as chat:
            ack = await chat.send(to_user="bob", content="Hello Bob!")
            async for event in chat.events():
                ...

    ``store_path`` is the local SQLite file (outbox and cursor) and must not be shared by two
    running clients. Give ``password`` (the client logs in over HTTP, again whenever a token is
    refused) or ``token`` (then the client fetches the user's event key with it, unless
    ``event_key`` is given too). ``mqtt_port`` defaults to 1883, or 8083 with
    ``transport="websockets"``; ``tls`` is an ``ssl.SSLContext`` for both MQTT and HTTP.
    """

    def __init__(
        self,
        user_id: str,
        *,
        store_path: str | Path,
        password: str | None = None,
        token: str | None = None,
        event_key: str | None = None,
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
        self._event_key = decode_key(event_key) if event_key is not None else None
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
        self._ack_interval = ack_interval
        self._error_callback = on_error
        self._rng = random.Random()

        self._store: LocalStore | None = None
        self._device: DeviceAddress | None = None
        self._machine: ClientMachine | None = None
        self._stream: _Feed[StreamItem] = _Feed()
        self._typing: _Feed[TypingEvent] = _Feed(maxsize=1000)
        self._waiters: dict[str, asyncio.Future[MessageAck]] = {}
        self._groups: set[str] = set()
        self._conn: _Connection | None = None
        self._wake = asyncio.Event()
        self._state = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._ticker_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
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
            self._device = DeviceAddress(self.user_id, device_id)
            self._machine = ClientMachine(
                self._device,
                cursor=store.cursor,
                outbox=store.pending(),
                event_key=self._event_key,
                backoff=self._backoff,
                rng=self._rng,
                ack_timeout=self._ack_timeout,
                sync_timeout=self._sync_timeout,
                probe_interval=self._probe_interval,
                ack_interval=self._ack_interval,
            )
        except BaseException:
            store.close()
            raise
        self._store = store
        self._runner = asyncio.create_task(self._run(), name=f"mqchat-client-{self._device.client_id}")
        self._ticker_task = asyncio.create_task(self._ticker(), name="mqchat-client-ticker")

    async def close(self) -> None:
        """Persist and ack what the application has taken from ``events()``, then disconnect.

        Unacknowledged sends stay in the outbox for the next client on the same file; their
        ``send()`` calls fail with ``ClientClosed``.
        """
        if self._closed:
            return
        self._closed = True
        machine = self._machine
        conn = self._ready_connection()
        if machine is not None:
            for action in machine.close(_now()):
                if isinstance(action, SendAck) and conn is not None:
                    with contextlib.suppress(aiomqtt.MqttError, TimeoutError, OSError):
                        async with asyncio.timeout(2):
                            await conn.mqtt.publish(self._inbox, _ack(action.seq), qos=1)
                elif isinstance(action, PersistCursor):
                    self._require_store().save_cursor(action.seq)
        await _stop([*self._background, *(t for t in (self._ticker_task, self._runner) if t is not None)])
        self._end_all(ClientClosed("the client was closed"), for_feeds=None)
        if self._store is not None and machine is not None:
            self._store.save_cursor(machine.committed)
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
    def heard_from_server(self) -> bool:
        """Whether a ``sync_response`` from the server reached this client (every connection
        gets one at once): a broker that is not mqchat accepts the connection but sends none."""
        return self._machine is not None and self._machine.sync_pages > 0

    @property
    def cursor(self) -> int:
        """The highest seq the application has processed (taken from ``events()`` and moved on)."""
        return self._machine.committed if self._machine is not None else 0

    @property
    def rejected_events(self) -> dict[str, int]:
        """Payloads on the stream and device topics dropped because they did not carry the
        server's signature, by kind (e.g. ``"stream: unsigned"``). Each kind is logged once."""
        return dict(self._machine.rejected) if self._machine is not None else {}

    def outbox(self) -> list[OutboxEntry]:
        """Sends not yet acknowledged by the server, oldest first."""
        return self._require_store().pending()

    async def wait_connected(self) -> None:
        """Wait until the client is connected and subscribed (bound it with ``asyncio.timeout``).
        Raises ``LoginFailed`` if the server refused the credentials, ``ClientClosed`` after
        ``close()``."""
        await self._connection()

    # ---------------------------------------------------------------- messaging

    async def send(
        self, to_user: str, content: str = "", *, msg_type: MsgType = "text", attachment: str | Path | None = None
    ) -> MessageAck:
        """Send a 1:1 message; returns its ``message_ack`` (the message is stored).

        The message is in the local outbox when this coroutine first yields, and stays there
        until acknowledged, across reconnects and restarts of the application. Cancelling the
        call (e.g. a timeout) does not take it out. A final refusal by the server (unknown
        recipient, invalid content ...) raises that error as a ``ChatError`` subclass.

        ``attachment``: a file to send with it (``content`` is then its caption and may be
        empty). It is uploaded first (``POST /v1/files``, which needs the HTTP API to be
        reachable); only then does the message enter the outbox.
        """
        file_id = await self._attach(attachment)
        return await self._send(
            _build(
                SendMessage, client_msg_id=_new_id(), to_user=to_user, content=content, msg_type=msg_type,
                attachment=file_id,
            )
        )  # fmt: skip

    async def send_to_group(
        self, group_id: str, content: str = "", *, msg_type: MsgType = "text", attachment: str | Path | None = None
    ) -> MessageAck:
        """Send to a group the user is a member of; otherwise as ``send()``."""
        file_id = await self._attach(attachment)
        return await self._send(
            _build(
                SendGroupMessage, client_msg_id=_new_id(), group_id=group_id, content=content, msg_type=msg_type,
                attachment=file_id,
            )
        )  # fmt: skip

    async def upload(self, path: str | Path) -> Attachment:
        """Upload a file to send later (its ``id`` is what a message's ``attachment`` names)."""
        return await self.http.upload(await self._access_token(), Path(path))

    async def save_attachment(self, attachment: Attachment, directory: str | Path = ".") -> Path:
        """Download a received file into ``directory`` under its name (which the server has
        stripped of any directory part); `` (1)``, `` (2)`` ... are added rather than overwrite
        a file. Returns the path written."""
        folder = Path(directory)
        stem, dot, ext = attachment.name.rpartition(".")
        if not stem:
            stem, dot, ext = attachment.name, "", ""
        target = folder / attachment.name
        number = 0
        while target.exists():
            number += 1
            target = folder / f"{stem} ({number}){dot}{ext}"
        return await self.http.download(await self._access_token(), attachment.id, target)

    async def _attach(self, attachment: str | Path | None) -> str | None:
        if attachment is None:
            return None
        return (await self.upload(attachment)).id

    def events(self) -> AsyncIterator[StreamItem]:
        """The user's stream (messages, receipts, read markers, recalls, group changes) in seq
        order, each event once.

        Where the server no longer holds events this device has not read (retention), a
        ``HistoryGap`` comes in their place, and the stream goes on from the oldest kept event.

        An event counts as processed when the loop asks for the next one (or the client is
        closed); the client then persists the cursor and acks it to the server. After a crash
        the event that was being processed is delivered again; nothing is skipped. Meant for
        one consumer at a time.
        """
        self._require_store()
        return _StreamEvents(self._stream, self._commit, self._taken)

    def typing_events(self) -> AsyncIterator[TypingEvent]:
        """Ephemeral typing signals: from peers, and from groups given to ``watch_group_typing``.
        Not stored, not replayed; the oldest are dropped if nobody reads them."""
        return _Typing(self._typing)

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

    async def groups(self) -> list[Group]:
        """The groups the user is a member of (HTTP ``GET /v1/groups``)."""
        return await self.http.groups(await self._access_token())

    async def history(self, conversation_id: str, *, limit: int = 50, before_id: int | None = None) -> list[Message]:
        """A page of a conversation (``user:{peer}`` or ``group:{id}``), newest first."""
        return await self.http.history(await self._access_token(), conversation_id, limit=limit, before_id=before_id)

    def drop_connection(self) -> bool:
        """Cut the current connection as a network failure would (the socket is shut down
        under the MQTT client); the client then reconnects and resends. For fault tests."""
        conn = self._conn
        return conn is not None and _shut_down(conn.mqtt)

    def feed(self, topic: str, payload: bytes) -> None:
        """Hand the client a payload as if the broker had delivered it on ``topic``: what the
        MQTT reader does with every delivery. It is checked like any other (an event on the
        stream or device topic without the server's signature is dropped). For tests and for
        other transports."""
        if self._machine is not None and not self._closed:
            self._apply(self._machine.receive(topic, payload, _now()))

    # ------------------------------------------------------------------ sending

    async def _send(self, command: SendMessage | SendGroupMessage) -> MessageAck:
        store = self._require_store()
        machine = self._require_machine()
        self._check_usable()
        payload = command.model_dump_json().encode()
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise PayloadTooLarge(f"the command is {len(payload)} bytes; the limit is {MAX_PAYLOAD_BYTES}")
        waiter: asyncio.Future[MessageAck] = asyncio.get_running_loop().create_future()
        self._waiters[command.client_msg_id] = waiter
        position = store.enqueue(command.client_msg_id, payload)  # synchronous: see mqchat/clients/store.py
        entry = OutboxEntry(position, command.client_msg_id, payload, 0.0)
        self._apply(machine.outbox_added(entry, _now()))
        try:
            return await waiter
        finally:
            self._waiters.pop(command.client_msg_id, None)

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

    # ------------------------------------------------- the machine's actions

    def _apply(self, actions: list[Action]) -> None:
        """Carry out what the machine asked for, in order."""
        for action in actions:
            if isinstance(action, SendEntry):
                self._publish(action.payload)
            elif isinstance(action, Deliver):
                for event in action.events:
                    self._stream.put(event)
            elif isinstance(action, Resolve):
                self._require_store().remove(action.ack.client_msg_id)
                waiter = self._waiters.pop(action.ack.client_msg_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(action.ack)
            elif isinstance(action, SendAck):
                self._publish(_ack(action.seq))
            elif isinstance(action, PersistCursor):
                self._require_store().save_cursor(action.seq)
            elif isinstance(action, RequestSync):
                self._publish(SyncMessages(since_seq=action.since_seq, limit=action.limit).model_dump_json().encode())
            elif isinstance(action, DeliverTyping):
                self._typing.put(action.event)
            elif isinstance(action, Fail):
                self._require_store().remove(action.client_msg_id)
                waiter = self._waiters.pop(action.client_msg_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_exception(action.error)
                else:  # a send of an earlier run: nobody waits for it
                    self._report(action.error)
            elif isinstance(action, ReportError):
                self._report(action.error)
            elif isinstance(action, FetchSync):
                task = asyncio.create_task(self._fetch_sync(action), name="mqchat-client-http-sync")
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        self._wake.set()  # the machine's deadline may have moved

    def _publish(self, payload: bytes) -> None:
        conn = self._ready_connection()
        if conn is not None:
            conn.outgoing.put_nowait(payload)
        # else: the machine knows it is offline and asks again on the next connection

    def _report(self, error: ChatError) -> None:
        log.warning("server error %s: %s", error.code, error.message)
        if self._error_callback is not None:
            self._error_callback(error)

    async def _fetch_sync(self, action: FetchSync) -> None:
        """The server's own version of disputed seqs, over HTTP (not over MQTT, where the
        disputed versions came from)."""
        machine = self._require_machine()
        path = f"/v1/sync?since_seq={action.since_seq}&limit={action.limit}"
        try:
            page = SyncResponse.model_validate(await self.http.request("GET", path, token=await self._access_token()))
        except CursorExpired as exc:
            self._apply(machine.http_sync_expired(exc, _now()))
            return
        except (ChatError, ClientError, ValidationError) as exc:
            log.warning("GET /v1/sync failed (%s); asking again later", exc)
            self._apply(machine.http_sync_failed())
            return
        self._apply(machine.http_sync(page, _now()))

    async def _ticker(self) -> None:
        """Calls the machine's ``tick`` at its deadline, and after every other input."""
        machine = self._require_machine()
        while True:
            self._wake.clear()
            deadline = machine.deadline
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if deadline is None else max(deadline - _now(), 0.005)):
                    await self._wake.wait()
            try:
                self._apply(machine.tick(_now()))
            except Exception:  # a bug must not stop resends and acks for good
                log.exception("mqchat client %s: tick failed", self.user_id)
                await asyncio.sleep(1)

    # ------------------------------------------------------- cursor and acks

    def _commit(self) -> None:
        if self._machine is not None and not self._closed:
            self._apply(self._machine.commit(_now()))

    def _taken(self, seq: int) -> None:
        if self._machine is not None:
            self._machine.taken(seq)

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
        if self._event_key is None:
            await self._fetch_event_key(token, fresh=fresh)
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
                # A CONNACK that never came leaves the socket open (aiomqtt leaves it to the
                # garbage collector); a refused one was closed by paho already.
                _shut_down(mqtt)
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
            read_disconnection(mqtt)

    async def _connected(self, mqtt: aiomqtt.Client) -> None:
        device = self._require_device()
        machine = self._require_machine()
        topics = [(stream_topic(self.user_id), 1), (device_topic(device), 1)]
        topics += [(group_topic(group), 0) for group in sorted(self._groups)]
        conn = _Connection(mqtt)
        self._conn = conn
        try:
            # Catch-up pages may arrive before the SUBACK: aiomqtt queues them for the reader.
            granted = await mqtt.subscribe(topics)
            if not (_granted(granted[0]) and _granted(granted[1])):
                raise ClientError(f"the server refused the subscriptions of {device.client_id}: {granted}")
            conn.ready = True
            self._failures = 0
            self.connections += 1
            self._changed()
            self._apply(machine.connection_made(_now()))
            reader = asyncio.create_task(self._reader(conn), name="mqchat-client-reader")
            writer = asyncio.create_task(self._writer(conn), name="mqchat-client-writer")
            broken = asyncio.create_task(conn.broken.wait())
            conn.tasks |= {reader, writer, broken}
            done, _ = await asyncio.wait((reader, writer, broken), return_when=asyncio.FIRST_COMPLETED)
            if conn.error is not None:
                raise conn.error
            for task in done:
                task.result()  # raises the error that ended the connection
            raise aiomqtt.MqttError("the connection ended")
        finally:
            self._conn = None
            self._apply(machine.connection_lost())
            await _stop(list(conn.tasks))
            self._changed()

    async def _reader(self, conn: _Connection) -> None:
        async for message in conn.mqtt.messages:
            payload = message.payload
            if isinstance(payload, bytes | bytearray):
                self.feed(message.topic.value, bytes(payload))
            elif isinstance(payload, str):
                self.feed(message.topic.value, payload.encode())

    async def _writer(self, conn: _Connection) -> None:
        window = asyncio.Semaphore(_PUBLISH_WINDOW)
        while True:
            payload = await conn.outgoing.get()
            await window.acquire()
            task = asyncio.create_task(conn.mqtt.publish(self._inbox, payload, qos=1))
            conn.tasks.add(task)
            task.add_done_callback(functools.partial(_published, conn, window))

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
            session = await self.http.session(self.user_id, self._password, device_id=self.device_id)
        except (NotAuthorized, InvalidCommand) as exc:
            raise LoginFailed(f"login of {self.user_id!r} refused: {exc.message}", exc) from exc
        self._token = session.token
        if session.event_key is not None:
            self._set_event_key(session.event_key)
        return self._token

    async def _fetch_event_key(self, token: str, *, fresh: bool) -> None:
        """A client given only a token learns the user's event key from the API."""
        try:
            key = await self.http.event_key(token)
        except NotAuthorized as exc:
            if self._password is not None and not fresh:
                self._token = None  # log in again (which brings the key) on the next attempt
                raise
            raise LoginFailed(f"the server refused the token of {self.user_id!r}: {exc.message}", exc) from exc
        self._set_event_key(key)

    def _set_event_key(self, key: bytes) -> None:
        self._event_key = key
        if self._machine is not None:
            self._machine.set_event_key(key)

    # ------------------------------------------------------------------ helpers

    @property
    def _inbox(self) -> str:
        return inbox_topic(self._require_device())

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

    def _require_machine(self) -> ClientMachine:
        if self._machine is None:
            raise ClientClosed("the client is not started; call start() or use 'async with'")
        return self._machine

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


def _now() -> float:
    return asyncio.get_running_loop().time()


def _ack(seq: int) -> bytes:
    return Ack(seq=seq).model_dump_json().encode()


def _code(rc: int | ReasonCode | None) -> int | None:
    if isinstance(rc, ReasonCode):
        return int(rc.value)
    return rc


def _granted(code: int | ReasonCode) -> bool:
    return (_code(code) or 0) < 0x80


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _published(conn: _Connection, window: asyncio.Semaphore, task: asyncio.Task[None]) -> None:
    window.release()
    conn.tasks.discard(task)
    if not task.cancelled() and (error := task.exception()) is not None:
        conn.fail(error)


def _paho(mqtt: aiomqtt.Client) -> paho.Client:
    """The paho client under an aiomqtt client.

    One of the SDK's two private accesses: aiomqtt 2.x offers no public way to reach the socket,
    and two things need it: cutting a connection on purpose (``drop_connection``, for fault
    tests) and closing the socket of an attempt whose CONNACK never came (aiomqtt leaves it
    open). Everything used on the paho side (``socket()``, ``fileno()``) is public.
    """
    client: paho.Client = mqtt._client  # noqa: SLF001
    return client


def read_disconnection(mqtt: aiomqtt.Client) -> None:
    """Mark the error of an unexpected disconnection as read, once the client has been left.

    aiomqtt 2.x keeps that error in a future that only its message iterator and ``publish``
    read. When neither was waiting as the connection dropped (the reader had been cancelled
    first), ``__aexit__`` returns early and leaves the error unread, and asyncio logs "Future
    exception was never retrieved" whenever the client is garbage-collected, in the middle of
    whatever runs then. The caller has already dealt with the lost connection, so this is the
    error's end. The second private access of the SDK, beside ``_paho``.
    """
    disconnected: asyncio.Future[None] = mqtt._disconnected  # noqa: SLF001
    if disconnected.done() and not disconnected.cancelled():
        disconnected.exception()


def _shut_down(mqtt: aiomqtt.Client) -> bool:
    """Shut the connection's socket down as a network failure would: paho's reader then sees
    the end of the stream and closes its socket itself (so aiomqtt unregisters it too).

    Through a duplicate of the descriptor: paho hands out a wrapper for WebSocket and TLS
    connections, but ``fileno()`` is public on all of them, and ``shutdown`` acts on the
    connection, not on the descriptor."""
    sock = _paho(mqtt).socket()
    if sock is None:
        return False
    try:
        with socket.fromfd(sock.fileno(), socket.AF_INET, socket.SOCK_STREAM) as duplicate:
            duplicate.shutdown(socket.SHUT_RDWR)
    except OSError:
        return False
    return True


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
