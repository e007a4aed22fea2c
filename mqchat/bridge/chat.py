"""The chat service: validated commands in; stored messages, acks and stream events out.

Sends from every device go into one bounded queue. A single worker takes everything
that is waiting (up to ``batch_size``), stores it in one transaction (group commit),
and only then acks the senders and publishes the new events. When the queue is full
a send is refused with ``server_busy`` rather than acknowledged and dropped: the MQTT
PUBACK only says the broker has the packet, the ``message_ack`` says it is stored.

Other commands (ack, read, recall, sync) are each one short transaction of their own,
after which the events they created are published the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from mqchat import logs
from mqchat.bridge.auth import EventKeys
from mqchat.bridge.cluster import Bucket, Degraded, RedisCluster
from mqchat.bridge.fanout import Fanout, Publisher, SessionControl
from mqchat.bridge.metrics import Metrics
from mqchat.bridge.notify import StreamNotifier
from mqchat.bridge.presence import ClusterPresence, LocalPresence, PresenceBook, TypingThrottle
from mqchat.bridge.ratelimit import ConcurrencyLimit, TokenBuckets
from mqchat.bridge.store import Emitted, GroupInfo, MessageStore, SendOutcome, SendRequest
from mqchat.config import BridgeSettings, LimitsSettings
from mqchat.core.errors import ChatError, NotAllowed, NotAMember, NotFound, RateLimited, ServerBusy
from mqchat.core.ids import ConversationId, DeviceAddress
from mqchat.core.protocol import (
    Ack,
    Event,
    MarkAsRead,
    MessageAck,
    Presence,
    RecallMessage,
    SendGroupMessage,
    SendMessage,
    SyncMessages,
    SyncResponse,
    Typing,
    TypingEvent,
    encode_event,
    error_event,
    format_time,
    parse_command,
)
from mqchat.core.topics import inbox_topic
from mqchat.tasks import stop_task

log = logging.getLogger(__name__)

AnySend = SendMessage | SendGroupMessage


__all__ = ["ChatService", "GroupDirectory", "Publisher", "SessionControl"]


class _Broker(Publisher, SessionControl, Protocol):
    """The broker is both: it delivers to this node's devices and controls their connections."""


@dataclass(slots=True)
class _Pending:
    request: SendRequest
    device: DeviceAddress | None
    future: asyncio.Future[MessageAck] | None
    accepted: float = field(default_factory=time.perf_counter)
    answered: Callable[[], None] | None = None
    """Called once the send is answered (stored, or refused): the broker's PUBACK waits for it."""


def _ack_for(outcome: SendOutcome) -> MessageAck:
    message = outcome.message
    return MessageAck(
        client_msg_id=message.client_msg_id,
        server_msg_id=message.id,
        seq=message.sender_seq,
        created_at=format_time(message.created_at),
        duplicate=outcome.duplicate,
    )


def _request(sender: str, command: AnySend) -> SendRequest:
    file_id = command.attachment
    if isinstance(command, SendGroupMessage):
        return SendRequest(
            sender, command.client_msg_id, command.content, command.msg_type, group_id=command.group_id,
            attachment_id=file_id,
        )  # fmt: skip
    return SendRequest(
        sender, command.client_msg_id, command.content, command.msg_type, to_user=command.to_user,
        attachment_id=file_id,
    )  # fmt: skip


class _Limits:
    """What one device and one user may cost: token buckets, and concurrent stream reads.

    In cluster mode the user's send bucket lives in Redis (a user may be on several nodes);
    the others protect this node's own resources and stay here."""

    def __init__(self, limits: LimitsSettings) -> None:
        self.settings = limits
        self.device_sends = TokenBuckets(limits.send_rate_per_second, limits.send_burst)
        self.user_sends = TokenBuckets(limits.user_send_rate_per_second, limits.user_send_burst)
        self.commands = TokenBuckets(limits.command_rate_per_second, limits.command_burst)
        self.syncs = TokenBuckets(limits.sync_rate_per_second, limits.sync_burst)
        self.reads = ConcurrencyLimit(limits.max_concurrent_reads_per_user, total=4)


class GroupDirectory:
    """Active members per group, cached for the ACL's per-delivery checks.

    Every membership change goes through a ``ChatService``, which refreshes the entry; in
    cluster mode it tells the other nodes to forget theirs, and an entry older than
    ``max_age`` seconds is read again anyway, in case that message was lost."""

    def __init__(self, store: MessageStore, max_age: float | None = None) -> None:
        self._store = store
        self._max_age = max_age
        self._members: dict[str, tuple[frozenset[str], float]] = {}

    async def members(self, group_id: str) -> frozenset[str]:
        cached = self._members.get(group_id)
        now = time.monotonic()
        if cached is not None and (self._max_age is None or now - cached[1] < self._max_age):
            return cached[0]
        members = await self._store.active_members(group_id)
        # Only groups with members are kept: random ids asked for by a client must not grow this cache.
        if members:
            self._members[group_id] = (members, now)
        return members

    async def is_member(self, group_id: str, user_id: str) -> bool:
        return user_id in await self.members(group_id)

    async def refresh(self, group_id: str) -> None:
        self._members[group_id] = (await self._store.active_members(group_id), time.monotonic())

    def forget(self, group_id: str) -> None:
        self._members.pop(group_id, None)


class ChatService:
    def __init__(
        self,
        store: MessageStore,
        settings: BridgeSettings,
        *,
        max_payload_bytes: int,
        limits: LimitsSettings | None = None,
        event_keys: EventKeys | None = None,
        cluster: RedisCluster | None = None,
        group_cache_seconds: float | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics or Metrics()
        self._settings = settings
        self._max_payload = max_payload_bytes
        self._limits = _Limits(limits or LimitsSettings())
        self._cluster = cluster
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=settings.queue_size)
        self._worker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.notifier = StreamNotifier()
        # The one way out; signs what goes to stream and device topics (core/origin.py).
        self.fanout = Fanout(self.notifier, event_keys, cluster)
        self.groups = GroupDirectory(store, group_cache_seconds if cluster is not None else None)
        self.fanout.on_group_changed = self.groups.forget
        self.presence: PresenceBook = LocalPresence() if cluster is None else ClusterPresence(cluster)
        self.fanout.on_presence = self.presence.note
        if cluster is not None:
            cluster.on_rejoin = self._rejoin_cluster
        self._typing = TypingThrottle(settings.typing_interval_seconds)
        self._metrics.watch_chat(self._queue.qsize, settings.queue_size, self.notifier.waiting)

    @property
    def store(self) -> MessageStore:
        return self._store

    @property
    def settings(self) -> BridgeSettings:
        return self._settings

    @property
    def cluster(self) -> RedisCluster | None:
        return self._cluster

    def attach(self, broker: _Broker | None) -> None:
        """The broker delivers to this node's devices and controls their connections."""
        self.fanout.attach(broker, broker)

    async def close_device(self, device: DeviceAddress) -> bool:
        """End the device's live MQTT connection wherever it is (device revocation)."""
        self.fanout.close_elsewhere("close_device", user=device.user_id, device=device.device_id)
        sessions = self.fanout.sessions
        return sessions is not None and await sessions.close_device(device)

    async def close_user(self, user_id: str) -> int:
        """End every live MQTT connection of the user wherever it is (logged out everywhere);
        how many there were on this node."""
        self.fanout.close_elsewhere("close_user", user=user_id)
        sessions = self.fanout.sessions
        return 0 if sessions is None else await sessions.close_user(user_id)

    async def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(self._commit_loop(), name="mqchat-commit-loop")

    async def stop(self) -> None:
        """Finish what was accepted, then stop."""
        if self._worker is None:
            return
        await self._queue.join()
        await stop_task(self._worker)
        self._worker = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.fanout.drain()

    # ------------------------------------------------------------- intake

    def accept(
        self, device: DeviceAddress, payload: bytes | bytearray, answered: Callable[[], None] | None = None
    ) -> bool:
        """Take one command published by a device. Never blocks, never raises.

        It is synchronous up to the enqueue, so sends from one device are stored in the
        order they were published. True when the command is a send that was queued: then
        ``answered`` is called once it is stored or refused (the broker holds its PUBACK until
        then, so a PUBACK too means stored); False when nothing is left to wait for.
        """
        try:
            command = parse_command(payload, max_bytes=self._max_payload)
            self._metrics.command(command.type)
            logs.command.set(command.type)  # for what this command logs, in the tasks it starts too
            self._limits.commands.take(device.user_id, ref=getattr(command, "client_msg_id", None), what="commands")
            if isinstance(command, SendMessage | SendGroupMessage):
                self._limit_send(device.user_id, device.client_id, command.client_msg_id)
                self._enqueue(_Pending(_request(device.user_id, command), device, None, answered=answered))
                return True
            elif isinstance(command, SyncMessages):
                self._spawn(self._answer(device, self.sync(device.user_id, command.since_seq, command.limit)))
            elif isinstance(command, Ack):
                self._spawn(self._answer(device, self.ack(device, command.seq)))
            elif isinstance(command, MarkAsRead):
                self._spawn(self._answer(device, self.mark_read(device.user_id, command.message_id)))
            elif isinstance(command, RecallMessage):
                self._spawn(self._answer(device, self.recall(device.user_id, command.message_id)))
            elif isinstance(command, Typing):
                self._spawn(self._answer(device, self.typing(device, command)))
        except ChatError as exc:
            self._spawn(self.reply(device, error_event(exc)))
        return False

    def refuse_publish(self, device: DeviceAddress, topic: str) -> None:
        """A PUBLISH outside the device's inbox reached nobody: tell the device (within its rate)."""
        try:
            self._limits.commands.take(device.user_id, what="commands")
        except RateLimited:
            return  # a flood of refused publishes earns no flood of replies
        refusal = NotAllowed(f"devices publish only on {inbox_topic(device)}; refused {topic[:200]!r}")
        self._spawn(self.reply(device, error_event(refusal)))

    async def send(self, sender: str, command: AnySend, *, device_id: str | None = None) -> MessageAck:
        """Store a message sent over HTTP; returns once it is stored (fan-out follows at once).

        Rate-limited per user, and per device when the token names one (else as the user's HTTP device).
        """
        self._metrics.command(command.type)
        logs.command.set(command.type)  # in this request's context only
        self._limits.commands.take(sender, ref=command.client_msg_id, what="commands")
        self._limit_send(sender, f"{sender}:{device_id}" if device_id else f"{sender}/http", command.client_msg_id)
        future: asyncio.Future[MessageAck] = asyncio.get_running_loop().create_future()
        self._enqueue(_Pending(_request(sender, command), None, future))
        return await future

    def _limit_send(self, user_id: str, device_key: str, ref: str) -> None:
        # Refused before the queue: a flood from one device never crowds out the others. Per user
        # too: device ids are free, and one token over ten device ids must not send ten times as much.
        # A device is on one node at a time; a user may be on several: in cluster mode the user's
        # bucket is taken in Redis, for a whole commit batch at once (``_cluster_limits``).
        self._limits.device_sends.take(device_key, ref=ref)
        if self._cluster is None:
            self._limits.user_sends.take(user_id, ref=ref)

    def _enqueue(self, pending: _Pending) -> None:
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            raise ServerBusy(
                "too many messages waiting to be stored; retry shortly", ref=pending.request.client_msg_id
            ) from None

    async def _answer(self, device: DeviceAddress, work: Coroutine[Any, Any, object]) -> None:
        """Run a device's command; a ``SyncResponse`` goes back to it, a failure as ``error``."""
        try:
            result = await work
        except ChatError as exc:
            await self.reply(device, error_event(exc))
            return
        if isinstance(result, SyncResponse):
            await self.reply(device, result)

    # ------------------------------------------------------------- worker

    async def _commit_loop(self) -> None:
        """Group commit, pipelined: while one batch's acks and events go out, the next
        batch (what arrived meanwhile) is already being stored. Batches are answered in
        the order they were stored, so every stream's events still go out in seq order."""
        while True:
            batch = [await self._queue.get()]
            self._take_queued(batch)
            outcomes = await self._store_safely(batch)
            while True:
                upcoming = self._take_queued([])
                storing = asyncio.ensure_future(self._store_safely(upcoming)) if upcoming else None
                await self._answer_safely(batch, outcomes)
                if storing is None:
                    break
                batch, outcomes = upcoming, await storing

    def _take_queued(self, batch: list[_Pending]) -> list[_Pending]:
        while len(batch) < self._settings.batch_size and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    async def _store_safely(self, batch: list[_Pending]) -> list[SendOutcome | ChatError]:
        try:
            return await self._store_batch(batch)
        except Exception:  # the worker must survive anything one batch does
            log.exception("storing a batch failed")
            return [ChatError("internal error; nothing was stored")] * len(batch)

    async def _answer_safely(self, batch: list[_Pending], outcomes: list[SendOutcome | ChatError]) -> None:
        try:
            await self._answer_batch(batch, outcomes)
        except Exception:  # stored already: a failed publish is recovered by sync, not retried here
            log.exception("publishing a stored batch failed")
            self._metrics.unpublished(outcomes)
        finally:
            for pending in batch:
                if pending.answered is not None:
                    pending.answered()
                self._queue.task_done()

    async def _store_batch(self, batch: list[_Pending]) -> list[SendOutcome | ChatError]:
        refused = await self._cluster_limits(batch) if self._cluster is not None else [None] * len(batch)
        admitted = [pending for pending, refusal in zip(batch, refused, strict=True) if refusal is None]
        try:
            with self._metrics.committing(len(admitted)):
                stored = list(await self._store.save_messages([p.request for p in admitted])) if admitted else []
        except ChatError as exc:
            stored = [exc] * len(admitted)
        results = iter(stored)
        return [refusal if refusal is not None else next(results) for refusal in refused]

    async def _cluster_limits(self, batch: list[_Pending]) -> list[ChatError | None]:
        """The senders' user buckets, across the cluster, in one round trip for the batch; this
        node's own buckets while Redis cannot answer."""
        assert self._cluster is not None
        rate, burst = self._limits.settings.user_send_rate_per_second, self._limits.settings.user_send_burst
        try:
            waits = await self._cluster.take([[Bucket(f"send:{p.request.sender}", rate, burst)] for p in batch])
        except Degraded:
            waits = []
            for pending in batch:
                try:
                    self._limits.user_sends.take(pending.request.sender)
                    waits.append(0.0)
                except RateLimited as exc:
                    waits.append(exc.retry_after)
        return [
            None
            if wait <= 0
            else RateLimited(
                f"more than {rate:g} sends per second (bursts of {burst:g}); slow down",
                retry_after=wait,
                ref=pending.request.client_msg_id,
            )
            for pending, wait in zip(batch, waits, strict=True)
        ]

    async def _answer_batch(self, batch: list[_Pending], outcomes: list[SendOutcome | ChatError]) -> None:
        """Ack (or refuse) each sender, then publish the new stream events."""
        for pending, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, ChatError):
                # One error object may stand for a whole failed batch: each sender gets its own ref.
                error = outcome.for_ref(outcome.ref or pending.request.client_msg_id)
                self._fail(pending, error)
                continue
            ack = _ack_for(outcome)
            if pending.future is not None and not pending.future.done():
                pending.future.set_result(ack)
            if pending.device is not None:
                await self.reply(pending.device, ack)
        await self.publish_events(*(o.events for o in outcomes if isinstance(o, SendOutcome)))
        self._metrics.handed_off([p.accepted for p in batch], outcomes)

    def _fail(self, pending: _Pending, error: ChatError) -> None:
        if pending.future is not None and not pending.future.done():
            pending.future.set_exception(error)
        if pending.device is not None:
            self._spawn(self.reply(pending.device, error_event(error)))

    # ---------------------------------------------------- sync and cursors

    async def sync(self, user_id: str, since_seq: int, limit: int) -> SyncResponse:
        """A page of the user's stream (``sync_messages``, ``GET /v1/sync``), within the user's read limits."""
        self._limits.syncs.take(user_id, what="stream reads")
        async with self._limits.reads.slot(user_id):
            page = await self._store.read_stream(user_id, since_seq, limit)
        return SyncResponse(events=page.events, latest_seq=page.latest_seq, has_more=page.has_more)

    async def long_poll(self, user_id: str, since_seq: int, wait_seconds: float, limit: int) -> SyncResponse:
        async with self.fanout.watching(user_id):  # events stored on other nodes wake it too
            return await self._long_poll(user_id, since_seq, wait_seconds, limit)

    async def _long_poll(self, user_id: str, since_seq: int, wait_seconds: float, limit: int) -> SyncResponse:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        while True:
            with self.notifier.watch(user_id) as waiter:
                response = await self.sync(user_id, since_seq, limit)
                remaining = deadline - loop.time()
                if response.events or remaining <= 0:
                    return response
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await waiter

    async def catch_up(self, device: DeviceAddress) -> None:
        """Send a device everything after its cursor, as paged ``sync_response``s.

        Always at least one page, possibly empty, so the device learns ``latest_seq``.
        """
        page = await self._store.read_from_cursor(device.user_id, device.device_id, self._settings.catch_up_page)
        while True:
            response = SyncResponse(events=page.events, latest_seq=page.latest_seq, has_more=page.has_more)
            await self.reply(device, response)
            if not response.has_more or not response.events:
                return
            page = await self._store.read_stream(device.user_id, response.events[-1].seq, self._settings.catch_up_page)

    async def ack(self, device: DeviceAddress, seq: int) -> None:
        _, receipts = await self._store.advance_cursor(device.user_id, device.device_id, seq)
        await self.publish_events(receipts)

    # ------------------------------------------------ receipts and recall

    async def mark_read(self, user_id: str, message_id: int) -> None:
        await self.publish_events(await self._store.mark_read(user_id, message_id))

    async def recall(self, user_id: str, message_id: int) -> None:
        emitted = await self._store.recall(user_id, message_id, self._settings.recall_window_seconds)
        await self.publish_events(emitted)

    # -------------------------------------------------------------- groups

    async def create_group(self, owner: str, name: str, members: Sequence[str]) -> GroupInfo:
        group, emitted = await self._store.create_group(owner, name, members, self._settings.group_max_members)
        await self._membership_changed(group.group_id)
        await self.publish_events(emitted)
        return group

    async def add_member(self, group_id: str, by: str, user_id: str) -> None:
        emitted = await self._store.add_member(group_id, by, user_id, self._settings.group_max_members)
        await self._membership_changed(group_id)
        await self.publish_events(emitted)

    async def remove_member(self, group_id: str, by: str, user_id: str) -> None:
        emitted = await self._store.remove_member(group_id, by, user_id)
        # Refresh before publishing: from here on the ACL stops deliveries on the group topic.
        await self._membership_changed(group_id)
        await self.publish_events(emitted)

    async def _membership_changed(self, group_id: str) -> None:
        await self.groups.refresh(group_id)
        self.fanout.close_elsewhere("group", group=group_id)  # the other nodes forget their copy

    async def group_for(self, user_id: str, group_id: str) -> GroupInfo:
        group = await self._store.get_group(group_id)
        if user_id not in group.members:
            raise NotAMember(f"you are not a member of {group_id!r}")
        return group

    # ---------------------------------------------- presence and typing

    async def device_connected(self, device: DeviceAddress, epoch: int, limit: int) -> bool:
        """A device connected here; False (refused) if its user already has ``limit`` other
        devices connected across the cluster."""
        allowed, changed = await self.presence.connected(device, epoch, limit)
        if changed is not None:
            self.fanout.presence(changed)
        return allowed

    async def device_disconnected(self, device: DeviceAddress, epoch: int, *, replaced: bool = False) -> None:
        changed = await self.presence.disconnected(device, epoch, replaced=replaced)
        if changed is not None:
            self.fanout.presence(changed)

    async def _rejoin_cluster(self) -> None:
        """Redis is reachable again: it records this node's devices again; publish what that
        changed (users it had lost come online again everywhere)."""
        if isinstance(self.presence, ClusterPresence):
            for changed in await self.presence.rejoin():
                self.fanout.presence(changed)

    async def presence_of(self, viewer: str, user_id: str) -> Presence:
        if not await self._store.are_contacts(viewer, user_id):
            raise NotFound(f"no presence of {user_id!r} for you")
        return await self.presence.of(user_id)

    async def presence_payload(self, user_id: str) -> bytes:
        """The presence a new subscriber of ``chat/presence/{user_id}`` gets first (retained)."""
        return encode_event(await self.presence.of(user_id))

    async def typing(self, device: DeviceAddress, command: Typing) -> None:
        target = ConversationId.addressed(command.to_user, command.group_id)
        if not self._typing.allow(device.client_id, target, command.state):
            return  # ephemeral and throttled: dropping a repeat loses nothing
        event = TypingEvent(
            from_user=device.user_id, to_user=command.to_user, group_id=command.group_id, state=command.state
        )
        if command.group_id is not None:
            if not await self.groups.is_member(command.group_id, device.user_id):
                raise NotAMember(f"you are not a member of {command.group_id!r}")
            await self.fanout.typing_in_group(command.group_id, event)
        elif command.to_user is not None:
            if not await self._store.are_contacts(device.user_id, command.to_user):
                raise NotFound(f"no conversation with {command.to_user!r}")
            self.fanout.typing_to_user(command.to_user, event)

    # -------------------------------------------------------------- output

    async def publish_events(self, *chunks: Emitted) -> None:
        await self.fanout.stream_events(*chunks)

    async def reply(self, device: DeviceAddress, event: Event) -> None:
        self._metrics.replied(event)
        await self.fanout.reply(device, event)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
