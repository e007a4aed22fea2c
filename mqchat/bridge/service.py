"""The chat service: validated commands in; stored messages, acks and stream events out.

Commands from every device go into one bounded queue. A single worker takes
everything that is waiting (up to ``batch_size``), stores it in one transaction
(group commit), and only then acks the senders and publishes the new events.
When the queue is full a send is refused with ``server_busy`` rather than
acknowledged and dropped: the MQTT PUBACK only says the broker has the packet,
the ``message_ack`` says the message is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Coroutine, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from mqchat.bridge.store import MessageStore, SendOutcome, SendRequest
from mqchat.config import BridgeSettings
from mqchat.core.errors import ChatError, ServerBusy
from mqchat.core.ids import DeviceAddress
from mqchat.core.protocol import (
    Ack,
    Event,
    MessageAck,
    SendMessage,
    SyncMessages,
    SyncResponse,
    encode_event,
    error_event,
    format_time,
    parse_command,
)
from mqchat.core.topics import device_topic, stream_topic

log = logging.getLogger(__name__)


class Publisher(Protocol):
    """Delivers a payload to the subscribers of a topic (the broker, in production)."""

    async def publish(self, topic: str, payload: bytes) -> None: ...


class StreamNotifier:
    """Wakes long-polls waiting on a user's stream."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Future[None]]] = defaultdict(set)

    def notify(self, user_ids: Iterable[str]) -> None:
        for user_id in set(user_ids):
            for waiter in self._waiters.pop(user_id, ()):
                if not waiter.done():
                    waiter.set_result(None)

    @contextlib.contextmanager
    def watch(self, user_id: str) -> Iterator[asyncio.Future[None]]:
        """Register before reading the store, so an event between read and wait is not missed."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[user_id].add(waiter)
        try:
            yield waiter
        finally:
            waiters = self._waiters.get(user_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[user_id]


@dataclass(slots=True)
class _Pending:
    request: SendRequest
    device: DeviceAddress | None
    future: asyncio.Future[MessageAck] | None


def _ack_for(outcome: SendOutcome) -> MessageAck:
    message = outcome.message
    return MessageAck(
        client_msg_id=message.client_msg_id,
        server_msg_id=message.id,
        seq=message.sender_seq,
        created_at=format_time(message.created_at),
        duplicate=outcome.duplicate,
    )


class ChatService:
    def __init__(self, store: MessageStore, settings: BridgeSettings, *, max_payload_bytes: int) -> None:
        self._store = store
        self._settings = settings
        self._max_payload = max_payload_bytes
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=settings.queue_size)
        self._publisher: Publisher | None = None
        self._worker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.notifier = StreamNotifier()

    @property
    def store(self) -> MessageStore:
        return self._store

    def attach_publisher(self, publisher: Publisher | None) -> None:
        self._publisher = publisher

    async def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(self._run(), name="mqchat-bridge-worker")

    async def stop(self) -> None:
        """Finish what was accepted, then stop."""
        if self._worker is None:
            return
        await self._queue.join()
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        self._worker = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # ------------------------------------------------------------- intake

    def accept(self, device: DeviceAddress, payload: bytes | bytearray) -> None:
        """Take one command published by a device. Never blocks, never raises.

        It is synchronous up to the enqueue, so commands from one device are stored in
        the order they were published.
        """
        try:
            command = parse_command(payload, max_bytes=self._max_payload)
            if isinstance(command, SendMessage):
                self._enqueue_request(_Pending(self._request(device.user_id, command), device, None))
            elif isinstance(command, SyncMessages):
                self._spawn(self._reply_sync(device, command))
            elif isinstance(command, Ack):
                self._spawn(self._advance(device, command.seq))
        except ChatError as exc:
            self._spawn(self.reply(device, error_event(exc)))

    async def send(self, sender: str, command: SendMessage) -> MessageAck:
        """Store a message sent over HTTP; returns once it is stored and fanned out."""
        future: asyncio.Future[MessageAck] = asyncio.get_running_loop().create_future()
        self._enqueue_request(_Pending(self._request(sender, command), None, future))
        return await future

    def _enqueue_request(self, pending: _Pending) -> None:
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            raise ServerBusy(
                "too many messages waiting to be stored; retry shortly", ref=pending.request.client_msg_id
            ) from None

    @staticmethod
    def _request(sender: str, command: SendMessage) -> SendRequest:
        return SendRequest(sender, command.client_msg_id, command.to_user, command.content, command.msg_type)

    # ------------------------------------------------------------- worker

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._settings.batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._process(batch)
            except Exception:  # the worker must survive anything one batch does
                log.exception("bridge batch failed")
                for pending in batch:
                    self._fail(
                        pending, ChatError("internal error; nothing was stored", ref=pending.request.client_msg_id)
                    )
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _process(self, batch: list[_Pending]) -> None:
        try:
            outcomes: list[SendOutcome | ChatError] = list(await self._store.save_messages([p.request for p in batch]))
        except ChatError as exc:
            outcomes = [exc] * len(batch)
        touched: set[str] = set()
        for pending, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, ChatError):
                outcome.ref = outcome.ref or pending.request.client_msg_id
                self._fail(pending, outcome)
                continue
            ack = _ack_for(outcome)
            if pending.future is not None and not pending.future.done():
                pending.future.set_result(ack)
            if pending.device is not None:
                await self.reply(pending.device, ack)
        for outcome in outcomes:
            if isinstance(outcome, SendOutcome):
                for user_id, event in outcome.events:
                    touched.add(user_id)
                    await self._publish(stream_topic(user_id), encode_event(event))
        self.notifier.notify(touched)

    def _fail(self, pending: _Pending, error: ChatError) -> None:
        if pending.future is not None and not pending.future.done():
            pending.future.set_exception(error)
        if pending.device is not None:
            self._spawn(self.reply(pending.device, error_event(error)))

    # ------------------------------------------------------- sync and acks

    async def sync(self, user_id: str, since_seq: int, limit: int) -> SyncResponse:
        page = await self._store.read_stream(user_id, since_seq, limit)
        return SyncResponse(events=page.events, latest_seq=page.latest_seq, has_more=page.has_more)

    async def long_poll(self, user_id: str, since_seq: int, wait_seconds: float, limit: int) -> SyncResponse:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        while True:
            with self.notifier.watch(user_id) as waiter:
                response = await self.sync(user_id, since_seq, limit)
                remaining = deadline - loop.time()
                if response.events or remaining <= 0:
                    return response
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter, remaining)

    async def catch_up(self, device: DeviceAddress) -> None:
        """Send a device everything after its cursor, as paged ``sync_response``s.

        Always at least one page, possibly empty, so the device learns ``latest_seq``.
        """
        since = await self._store.get_cursor(device.user_id, device.device_id)
        while True:
            response = await self.sync(device.user_id, since, self._settings.catch_up_page)
            await self.reply(device, response)
            if not response.has_more or not response.events:
                return
            since = response.events[-1].seq

    async def _reply_sync(self, device: DeviceAddress, command: SyncMessages) -> None:
        try:
            await self.reply(device, await self.sync(device.user_id, command.since_seq, command.limit))
        except ChatError as exc:
            await self.reply(device, error_event(exc))

    async def _advance(self, device: DeviceAddress, seq: int) -> None:
        try:
            await self._store.advance_cursor(device.user_id, device.device_id, seq)
        except ChatError as exc:
            await self.reply(device, error_event(exc))

    # -------------------------------------------------------------- output

    async def reply(self, device: DeviceAddress, event: Event) -> None:
        await self._publish(device_topic(device), encode_event(event))

    async def _publish(self, topic: str, payload: bytes) -> None:
        if self._publisher is not None:
            await self._publisher.publish(topic, payload)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
