"""The client's half of the reliability story, sans-IO: ``ClientMachine``.

Like h11's ``Connection`` and our ``StreamSequencer``, the machine holds no socket, no file,
no task and no clock. The I/O driver (``ChatClient``) feeds it what happened, always with the
current monotonic time ``now``, and carries out the actions it returns, in order:

======================================  ==========================================================
input                                   what it may return
======================================  ==========================================================
``connection_made(now)``                ``SendEntry`` for the whole outbox, in order
``connection_lost()``                   nothing: unanswered entries go out again on the next
                                        connection, with the same ``client_msg_id``
``outbox_added(entry, now)``            ``SendEntry`` (unless offline or paused)
``receive(topic, payload, now)``        ``Deliver``, ``DeliverTyping``, ``Resolve``, ``Fail``,
                                        ``ReportError``, ``RequestSync``, ``FetchSync``
``taken(seq)`` / ``commit(now)``        nothing at once: the ack is batched (see ``tick``)
``tick(now)``                           ``SendEntry`` (due again), ``RequestSync`` (watchdog,
                                        probe), ``PersistCursor`` + ``SendAck``
``http_sync(page, now)``                ``Deliver`` (the server's word on a disputed seq)
``http_sync_expired(error, now)``       as ``receive`` of a ``cursor_expired`` error
``close(now)``                          ``PersistCursor`` + ``SendAck``
======================================  ==========================================================

``deadline`` is the "wait until T" output: the driver calls ``tick`` at that time (or earlier,
after any other input, since every input may move it).

Trust: a payload on the user's stream or device topic reaches none of this logic unless its
``sig`` is the server's (``mqchat.core.origin``); anything else is dropped and counted in
``rejected``. So a forged event can neither mark a seq as seen, nor resolve or fail a send,
nor move the cursor. Group topics carry no ``sig`` (they are shared): only ``typing`` is
taken from them. And should two validly signed events ever claim one seq with different
content (the event key leaked), the machine keeps neither on trust: it holds the seq and
asks the server over HTTP (``FetchSync``), whose answer is authoritative.

Retention: a sync or catch-up answered ``cursor_expired`` (the server deleted events after the
cursor) resets the stream to ``oldest_seq - 1``, delivers a ``HistoryGap`` in the gap's place
and reads on from there (docs/protocol.md, "cursor_expired: resetting a device").
"""

from __future__ import annotations

import collections
import hashlib
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from mqchat.clients.backoff import Backoff
from mqchat.clients.errors import chat_error
from mqchat.clients.gaps import HistoryGap, StreamItem
from mqchat.clients.sequencer import StreamSequencer
from mqchat.clients.store import OutboxEntry
from mqchat.core.errors import ChatError, CursorExpired
from mqchat.core.ids import DeviceAddress
from mqchat.core.origin import verify
from mqchat.core.protocol import (
    SYNC_MAX_LIMIT,
    AnyStreamEvent,
    ErrorEvent,
    MessageAck,
    NewMessage,
    SyncResponse,
    TypingEvent,
    decode_event,
)
from mqchat.core.topics import GROUP_PREFIX, device_topic, stream_topic

log = logging.getLogger(__name__)

#: Error codes after which a send is retried (same ``client_msg_id``); any other code is final.
#: All three say "nothing was stored, not now": overload, a database failure, the per-device
#: send rate (``rate_limited`` comes with ``retry_after``, which the client honours).
RETRYABLE_CODES = frozenset({"server_busy", "storage_unavailable", "rate_limited"})

#: How many recent seqs keep a fingerprint, to notice two signed versions of one seq.
SEEN_WINDOW = 4096


# ---------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class SendEntry:
    """Publish this outbox entry on the inbox topic (QoS 1)."""

    client_msg_id: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class RequestSync:
    """Publish ``sync_messages`` from ``since_seq`` on the inbox topic."""

    since_seq: int
    limit: int = SYNC_MAX_LIMIT


@dataclass(frozen=True, slots=True)
class SendAck:
    """Publish ``{"type":"ack","seq":seq}`` (after the cursor was persisted)."""

    seq: int


@dataclass(frozen=True, slots=True)
class PersistCursor:
    """Write the cursor to the local file; comes before the ``SendAck`` of the same seq."""

    seq: int


@dataclass(frozen=True, slots=True)
class Resolve:
    """The send is stored: drop it from the outbox, and ``send()`` returns ``ack``."""

    ack: MessageAck


@dataclass(frozen=True, slots=True)
class Fail:
    """The send was refused for good: drop it from the outbox, ``send()`` raises ``error``."""

    client_msg_id: str
    error: ChatError


@dataclass(frozen=True, slots=True)
class ReportError:
    """An ``error`` event that belongs to no send (``on_error``)."""

    error: ChatError


@dataclass(frozen=True, slots=True)
class Deliver:
    """Hand these stream events (and history gaps) to the application, in this order."""

    events: tuple[StreamItem, ...]


@dataclass(frozen=True, slots=True)
class DeliverTyping:
    event: TypingEvent


@dataclass(frozen=True, slots=True)
class FetchSync:
    """Ask the server over HTTP (``GET /v1/sync``) and feed the answer to ``http_sync``."""

    since_seq: int
    limit: int


Action = (
    SendEntry
    | RequestSync
    | SendAck
    | PersistCursor
    | Resolve
    | Fail
    | ReportError
    | Deliver
    | DeliverTyping
    | FetchSync
)


# ------------------------------------------------------------------- the state


@dataclass(slots=True)
class _Flight:
    position: int
    due: float
    """When to publish it again if no answer came."""


@dataclass(slots=True)
class _Link:
    """What lives only as long as one connection."""

    sync_deadline: float
    watch_at: float
    inflight: dict[str, _Flight] = field(default_factory=dict)
    published_upto: int = 0
    """Outbox position up to which every entry was published on this connection."""
    catch_up_running: bool = True
    """The server's catch-up pages (sent after every SUBSCRIBE) are still coming."""
    syncing: bool = True
    """A sync (the catch-up, or our own request) is unanswered."""
    sync_from: int = -1
    acked: int = 0
    """The highest seq acked to the server on this connection."""
    paused_until: float = 0.0
    """After a retryable refusal nothing new is published before this."""


@dataclass(frozen=True, slots=True)
class _Print:
    """What identifies a stream event, and a digest of its content (None for a tombstone)."""

    ident: bytes
    content: bytes | None

    def agrees(self, other: _Print) -> bool:
        # A recall turns a message into a tombstone with the same ids: only live contents must match.
        if self.ident != other.ident:
            return False
        return self.content is None or other.content is None or self.content == other.content


def _print(event: AnyStreamEvent) -> _Print:
    if isinstance(event, NewMessage):
        ident = event.model_dump_json(exclude={"content", "recalled_at"}).encode()
        live = event.content is not None and event.recalled_at is None
        content = hashlib.sha256(event.content.encode()).digest() if live and event.content is not None else None
        return _Print(hashlib.blake2b(ident, digest_size=16).digest(), content)
    return _Print(hashlib.blake2b(event.model_dump_json().encode(), digest_size=16).digest(), None)


class ClientMachine:
    """One device's outbox, stream cursor, acks, syncs and pauses; see the module docstring."""

    def __init__(
        self,
        device: DeviceAddress,
        *,
        cursor: int = 0,
        outbox: Iterable[OutboxEntry] = (),
        event_key: bytes | None = None,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
        ack_timeout: float = 15.0,
        sync_timeout: float = 10.0,
        probe_interval: float | None = 60.0,
        ack_interval: float = 0.1,
    ) -> None:
        self.user_id = device.user_id
        self._stream_topic = stream_topic(device.user_id)
        self._device_topic = device_topic(device)
        self._key = event_key
        self._backoff = backoff or Backoff()
        self._rng = rng or random.Random()
        self._ack_timeout = ack_timeout
        self._sync_timeout = sync_timeout
        self._probe_interval = probe_interval
        self._ack_interval = ack_interval
        self._watch_period = min(1.0, sync_timeout / 2)

        self.sequencer = StreamSequencer(cursor)
        self._outbox: dict[str, OutboxEntry] = {e.client_msg_id: e for e in sorted(outbox, key=lambda e: e.position)}
        self._retries: dict[str, int] = {}
        self._handed_out = cursor
        self._committed = cursor
        self._ack_due: float | None = None
        self._last_heard = 0.0
        self._link: _Link | None = None

        self._seen: collections.OrderedDict[int, _Print] = collections.OrderedDict()
        self._disputed: set[int] = set()
        self._fetching = False

        #: Payloads dropped because their origin could not be verified, by kind.
        self.rejected: collections.Counter[str] = collections.Counter()
        #: ``sync_response`` pages received on the device topic (signed, so from an mqchat
        #: server): none a few seconds after connecting means no mqchat is behind that port.
        self.sync_pages = 0
        #: ``cursor_expired`` answers received (each asks for at most one sync; see ``_expired``).
        self.cursor_expired = 0

    # ----------------------------------------------------------------- state

    @property
    def connected(self) -> bool:
        return self._link is not None

    @property
    def committed(self) -> int:
        """The highest seq the application has processed (the cursor)."""
        return self._committed

    @property
    def outbox(self) -> list[OutboxEntry]:
        return list(self._outbox.values())

    @property
    def paused_until(self) -> float | None:
        """After a retryable refusal: nothing is published before this time."""
        link = self._link
        return link.paused_until if link is not None and link.paused_until > 0 else None

    @property
    def disputed(self) -> frozenset[int]:
        """Seqs with two signed versions, waiting for the server's answer over HTTP."""
        return frozenset(self._disputed)

    @property
    def deadline(self) -> float | None:
        """When ``tick`` has work to do (None: not before the next input)."""
        times = [] if self._ack_due is None else [self._ack_due]
        link = self._link
        if link is not None:
            times.append(link.watch_at)
            if link.syncing:
                times.append(link.sync_deadline)
            if link.paused_until > 0:
                times.append(link.paused_until)
            elif link.inflight:
                times.append(min(f.due for f in link.inflight.values()))
        return min(times, default=None)

    def set_event_key(self, key: bytes) -> None:
        self._key = key

    # ---------------------------------------------------------------- inputs

    def connection_made(self, now: float) -> list[Action]:
        """Connected and subscribed: commands may be published, replies will be heard. The
        server starts a catch-up now; the whole outbox goes out again, in order."""
        self._link = _Link(sync_deadline=now + self._sync_timeout, watch_at=now + self._watch_period)
        if self._committed > 0:
            self._schedule_ack(now)  # tell this connection's server where we are
        return self._pump(now)

    def connection_lost(self) -> list[Action]:
        self._link = None
        return []

    def outbox_added(self, entry: OutboxEntry, now: float) -> list[Action]:
        """``entry`` was written to the local outbox (positions only grow)."""
        self._outbox[entry.client_msg_id] = entry
        return self._pump(now)

    def receive(self, topic: str, payload: bytes, now: float) -> list[Action]:
        """A payload the broker delivered on ``topic``."""
        if topic in (self._stream_topic, self._device_topic):
            body = self._verified(topic, payload)
            if body is None:
                return []
        elif topic.startswith(GROUP_PREFIX):
            body = payload  # shared topics are not signed; only ephemeral typing comes from them
        else:
            log.debug("ignoring a payload on %s", topic)
            return []
        try:
            event = decode_event(body)
        except (ChatError, ValueError) as exc:  # ValueError covers bad JSON and pydantic errors
            log.warning("ignoring an event the client does not understand: %s", exc)
            return []
        if isinstance(event, TypingEvent):
            return [DeliverTyping(event)]
        if topic == self._device_topic:
            if isinstance(event, MessageAck):
                return self._acknowledged(event)
            if isinstance(event, SyncResponse):
                return self._sync_page(event, now)
            if isinstance(event, ErrorEvent):
                return self._refused(event, now)
        elif topic == self._stream_topic and not isinstance(event, MessageAck | SyncResponse | ErrorEvent):
            self._last_heard = now
            return self._take(event) + self._maybe_sync(now)
        log.warning("ignoring a %s event on %s", event.type, topic)
        return []

    def taken(self, seq: int) -> None:
        """The application took the event ``seq`` from ``events()``."""
        self._handed_out = max(self._handed_out, seq)

    def commit(self, now: float) -> list[Action]:
        """The application asked for the next event: what it took so far is processed."""
        if self._handed_out > self._committed:
            self._committed = self._handed_out
            self._schedule_ack(now)
        return []

    def tick(self, now: float) -> list[Action]:
        actions: list[Action] = []
        if self._ack_due is not None and now >= self._ack_due:
            actions += self._flush_ack()
        link = self._link
        if link is not None and (now >= link.watch_at or (link.syncing and now >= link.sync_deadline)):
            link.watch_at = now + self._watch_period
            actions += self._watchdog(link, now)
        if link is not None and link.paused_until and now >= link.paused_until:
            link.paused_until = 0.0
        return actions + self._pump(now)

    def close(self, now: float) -> list[Action]:
        """Commit what the application took, persist and ack it (the last words)."""
        self.commit(now)
        return self._flush_ack()

    def http_sync(self, page: SyncResponse, now: float) -> list[Action]:
        """The answer to ``FetchSync``: the server's own version of the disputed seqs."""
        self._fetching = False
        actions: list[Action] = []
        last = page.events[-1].seq if page.events else page.latest_seq
        for event in page.events:
            if event.seq in self._disputed:
                actions += self._settle(event)
        for seq in sorted(self._disputed):
            if seq <= last or seq > page.latest_seq:
                # The server has no such event: both versions were forged.
                log.warning("seq %d does not exist on the server: both versions were forged", seq)
                self._disputed.discard(seq)
        return actions + self._fetch_disputed() + self._maybe_sync(now)

    def http_sync_failed(self) -> list[Action]:
        """``FetchSync`` failed; the watchdog asks again."""
        self._fetching = False
        return []

    def http_sync_expired(self, error: CursorExpired, now: float) -> list[Action]:
        """``FetchSync`` was answered 410 ``cursor_expired``: the disputed seqs are gone from
        the server too, and so may be the ones after our prefix."""
        self._fetching = False
        if error.oldest_seq is None or error.latest_seq is None:
            return []
        return self._expired(error.oldest_seq, error.latest_seq, now)

    # ---------------------------------------------------------------- origin

    def _verified(self, topic: str, payload: bytes) -> bytes | None:
        body = verify(self._key, payload) if self._key is not None else None
        if body is not None:
            return body
        where = "stream" if topic == self._stream_topic else "device"
        if self._key is None:
            kind = f"{where}: no event key"
        elif b'"sig":' in payload:
            kind = f"{where}: bad signature"
        else:
            kind = f"{where}: unsigned"
        self.rejected[kind] += 1
        if self.rejected[kind] == 1:
            log.warning("dropping an event on %s that is not the server's (%s); further ones are counted", topic, kind)
        else:
            log.debug("dropping an event on %s (%s)", topic, kind)
        return None

    def _admit(self, event: AnyStreamEvent) -> tuple[bool, list[Action]]:
        """Whether a (signed) event may go on; a second version of a known seq is disputed."""
        seq = event.seq
        if seq in self._disputed:
            return False, []
        mark = _print(event)
        known = self._seen.get(seq)
        if known is None:
            if seq > self.sequencer.contiguous:
                self._remember(seq, mark)
            return True, []
        if known.agrees(mark):
            return True, []
        log.warning("two signed events claim seq %d with different content: asking the server over HTTP", seq)
        self._disputed.add(seq)
        self.sequencer.discard(seq)  # if it was held: not released before the server answers
        return False, self._fetch_disputed()

    def _remember(self, seq: int, mark: _Print) -> None:
        self._seen[seq] = mark
        while len(self._seen) > SEEN_WINDOW:
            self._seen.popitem(last=False)

    def _fetch_disputed(self) -> list[Action]:
        if self._fetching or not self._disputed:
            return []
        self._fetching = True
        low, high = min(self._disputed), max(self._disputed)
        return [FetchSync(since_seq=low - 1, limit=min(high - low + 1, SYNC_MAX_LIMIT))]

    def _settle(self, event: AnyStreamEvent) -> list[Action]:
        seq = event.seq
        self._disputed.discard(seq)
        mark, delivered = _print(event), self._seen.get(seq)
        self._remember(seq, mark)
        if seq > self.sequencer.contiguous:
            ready = self.sequencer.offer(event)
            return [Deliver(tuple(ready))] if ready else []
        if delivered is not None and not delivered.agrees(mark):
            log.error("the event delivered as seq %d was not the server's; delivering the server's version", seq)
            return [Deliver((event,))]
        return []

    # ------------------------------------------------------------ the stream

    def _take(self, event: AnyStreamEvent) -> list[Action]:
        admitted, actions = self._admit(event)
        if not admitted:
            return actions
        if isinstance(event, NewMessage) and event.from_user == self.user_id and event.client_msg_id in self._outbox:
            # Our message in our own stream proves it stored as much as its ack does (both are
            # published after the commit, on different topics): if the ack was lost, it stands in.
            ack = MessageAck(
                client_msg_id=event.client_msg_id,
                server_msg_id=event.server_msg_id,
                seq=event.seq,
                created_at=event.created_at,
            )
            actions += self._acknowledged(ack)
        ready = self.sequencer.offer(event)
        if ready:
            actions.append(Deliver(tuple(ready)))
        return actions

    def _sync_page(self, page: SyncResponse, now: float) -> list[Action]:
        self._last_heard = now
        self.sync_pages += 1
        actions: list[Action] = []
        for event in page.events:
            actions += self._take(event)
        self.sequencer.note_head(page.latest_seq)
        link = self._link
        if link is None:
            return actions
        if page.has_more:
            # The server pages its own catch-up; an answer to our request needs the next ask.
            if link.catch_up_running:
                link.sync_deadline = now + self._sync_timeout
                return actions
            return actions + self._request_sync(link, now)
        link.catch_up_running = False
        if self.sequencer.contiguous > link.sync_from or not self.sequencer.behind:
            link.syncing = False
            return actions + self._maybe_sync(now)
        # An answer that filled nothing: the watchdog asks again after sync_timeout, so a
        # stubborn hole costs one request per sync_timeout, not a tight loop.
        link.sync_deadline = now + self._sync_timeout
        return actions

    def _maybe_sync(self, now: float) -> list[Action]:
        link = self._link
        if link is not None and self.sequencer.behind and not link.syncing:
            return self._request_sync(link, now)
        return []

    def _request_sync(self, link: _Link, now: float) -> list[Action]:
        """Ask for the events after our contiguous prefix (one page; more pages on has_more)."""
        link.syncing = True
        link.sync_from = self.sequencer.contiguous
        link.sync_deadline = now + self._sync_timeout
        return [RequestSync(self.sequencer.contiguous)]

    def _watchdog(self, link: _Link, now: float) -> list[Action]:
        """A sync (or the catch-up) that gets no answer in time is asked for again; a known
        hole is filled; and a stream silent for ``probe_interval`` is probed with a sync, since
        a lost live delivery of the *last* event would otherwise go unnoticed until the next."""
        actions = self._fetch_disputed()
        if link.syncing:
            if now >= link.sync_deadline:
                # Also when not behind: a catch-up that never came leaves the head unknown.
                link.catch_up_running = False
                actions += self._request_sync(link, now)
        elif self.sequencer.behind:
            actions += self._request_sync(link, now)
        elif self._probe_interval is not None and now - self._last_heard > self._probe_interval:
            self._last_heard = now
            actions += self._request_sync(link, now)
        return actions

    def _expired(self, oldest_seq: int, latest_seq: int, now: float) -> list[Action]:
        """Retention deleted events after our prefix: reset to ``oldest_seq - 1``, say so in
        the stream, and read on. An answer about a gap already passed (to a sync asked before
        the reset, or a catch-up from the server's cursor, which only our ack moves) only makes
        sure that a sync from past the gap is under way. Such a sync cannot be answered
        ``cursor_expired`` with the same ``oldest_seq``, and each answer asks for at most one
        sync: no loop."""
        self.cursor_expired += 1
        point = oldest_seq - 1
        previous = self.sequencer.contiguous
        actions: list[Action] = []
        if point > previous:
            log.warning("the server deleted seqs %d to %d of %s's stream (retention): reading on from %d",
                        previous + 1, point, self.user_id, oldest_seq)  # fmt: skip
            self.sequencer.reset(point)
            self.sequencer.note_head(latest_seq)
            self._disputed = {seq for seq in self._disputed if seq > point}
            gap = HistoryGap(self.user_id, previous, oldest_seq, latest_seq)
            actions.append(Deliver((gap, *self.sequencer.release())))
        link = self._link
        if link is None:
            return actions
        link.catch_up_running = False  # an expired catch-up sends no page
        if link.syncing and link.sync_from >= point:
            return actions  # its answer is on the way (or the watchdog asks again)
        return actions + self._request_sync(link, now)

    # ----------------------------------------------------------- cursor, acks

    def _schedule_ack(self, now: float) -> None:
        if self._ack_due is None:
            self._ack_due = now + self._ack_interval

    def _flush_ack(self) -> list[Action]:
        self._ack_due = None
        target = self._committed
        actions: list[Action] = [PersistCursor(target)]  # local first: the server's cursor never runs ahead
        link = self._link
        if link is not None and target > link.acked:
            link.acked = target
            actions.append(SendAck(target))
        return actions

    # ---------------------------------------------------------------- sending

    def _pump(self, now: float) -> list[Action]:
        """Publish the outbox in order: first what is due again (unanswered for
        ``ack_timeout``, or refused for now and its wait over), then what was never published
        on this connection. A retryable refusal pauses this, so that the refused entry goes out
        again before anything newer: the order survives unless messages published behind it
        were accepted before the refusal came back."""
        link = self._link
        if link is None or now < link.paused_until:
            return []
        actions: list[Action] = []
        due = sorted((f.position, cid) for cid, f in link.inflight.items() if f.due <= now)
        for _, cid in due:
            link.inflight[cid].due = now + self._ack_timeout
            actions.append(SendEntry(cid, self._outbox[cid].payload))
        for cid, entry in self._outbox.items():
            if entry.position <= link.published_upto:
                continue
            link.inflight[cid] = _Flight(entry.position, now + self._ack_timeout)
            link.published_upto = entry.position
            actions.append(SendEntry(cid, entry.payload))
        return actions

    def _acknowledged(self, ack: MessageAck) -> list[Action]:
        # The message is at ack.seq in our own stream: if its live copy never comes (lost in
        # transit), the watchdog sees the client behind and syncs. Not at once: the copy
        # travels on another topic and usually arrives just after the ack.
        self.sequencer.note_head(ack.seq)
        if ack.client_msg_id not in self._outbox:
            return []  # a duplicate ack, or the answer to a send made by someone else
        self._forget(ack.client_msg_id)
        return [Resolve(ack)]

    def _refused(self, event: ErrorEvent, now: float) -> list[Action]:
        ref = event.ref
        if event.code == CursorExpired.code and event.oldest_seq is not None and event.latest_seq is not None:
            return self._expired(event.oldest_seq, event.latest_seq, now)
        error = chat_error(event.code, event.message, ref, retry_after=event.retry_after)
        if ref is None or ref not in self._outbox:
            return [ReportError(error)]
        if event.code not in RETRYABLE_CODES:
            self._forget(ref)
            return [Fail(ref, error)]
        attempt = self._retries[ref] = self._retries.get(ref, 0) + 1
        wait = event.retry_after if event.retry_after is not None else self._backoff.delay(attempt - 1, self._rng)
        link = self._link
        flight = link.inflight.get(ref) if link is not None else None
        if link is not None and flight is not None:
            resume = now + wait
            flight.due = resume
            link.paused_until = max(link.paused_until, resume)
        log.info("send %s refused for now (%s); retrying in %.2f s", ref, event.code, wait)
        return []

    def _forget(self, client_msg_id: str) -> None:
        del self._outbox[client_msg_id]
        self._retries.pop(client_msg_id, None)
        if self._link is not None:
            self._link.inflight.pop(client_msg_id, None)
