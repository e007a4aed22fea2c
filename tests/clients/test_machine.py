"""``ClientMachine``, transition by transition: no sockets, no clock, no sleeps.

Time is a number the test picks; payloads are signed with a key the test derives, exactly as
the server signs them (``mqchat.core.origin``).
"""

from __future__ import annotations

import json
import logging
import random
from typing import Any

import pytest

from mqchat.clients import Backoff, HistoryGap
from mqchat.clients.machine import (
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
from mqchat.clients.store import OutboxEntry
from mqchat.core.errors import CursorExpired, InvalidCommand, NotAMember, RateLimited, UnknownRecipient
from mqchat.core.ids import DeviceAddress
from mqchat.core.origin import event_key, sign
from mqchat.core.protocol import (
    ErrorEvent,
    Event,
    GroupUpdated,
    MessageAck,
    NewMessage,
    SyncResponse,
    TypingEvent,
    encode_event,
)

KEY = event_key(b"test secret", "alice")
STREAM, DEVICE = "chat/user/alice", "chat/device/alice/phone"
T0 = 1000.0
ACK_TIMEOUT, SYNC_TIMEOUT, PROBE, ACK_INTERVAL = 15.0, 10.0, 60.0, 0.1


def make(*, cursor: int = 0, outbox: list[OutboxEntry] | None = None, key: bytes | None = KEY) -> ClientMachine:
    return ClientMachine(
        DeviceAddress("alice", "phone"),
        cursor=cursor,
        outbox=outbox or [],
        event_key=key,
        backoff=Backoff(initial=1.0, maximum=30.0, jitter=0.0),
        rng=random.Random(7),
        ack_timeout=ACK_TIMEOUT,
        sync_timeout=SYNC_TIMEOUT,
        probe_interval=PROBE,
        ack_interval=ACK_INTERVAL,
    )


def entry(n: int) -> OutboxEntry:
    payload = {"type": "send_message", "client_msg_id": f"c{n}", "to_user": "bob", "content": f"m{n}"}
    return OutboxEntry(n, f"c{n}", json.dumps(payload).encode(), 0.0)


def message(seq: int, *, content: str | None = None, sender: str = "bob", cid: str | None = None) -> NewMessage:
    return NewMessage(
        seq=seq, server_msg_id=100 + seq, client_msg_id=cid or f"x{seq}", from_user=sender, to_user="alice",
        content=content if content is not None else f"m{seq}", msg_type="text", created_at="2026-01-01T00:00:00.000Z",
    )  # fmt: skip


def ack(cid: str, seq: int) -> MessageAck:
    return MessageAck(client_msg_id=cid, server_msg_id=200 + seq, seq=seq, created_at="2026-01-01T00:00:00.000Z")


def signed(event: Event, key: bytes = KEY) -> bytes:
    return sign(key, encode_event(event))


def on_stream(m: ClientMachine, event: Event, now: float = T0) -> list[Action]:
    return m.receive(STREAM, signed(event), now)


def on_device(m: ClientMachine, event: Event, now: float = T0) -> list[Action]:
    return m.receive(DEVICE, signed(event), now)


def page(*seqs: int, latest: int | None = None, more: bool = False) -> SyncResponse:
    events: list[Any] = [message(s) for s in seqs]
    return SyncResponse(events=events, latest_seq=latest if latest is not None else max(seqs, default=0), has_more=more)


def sends(actions: list[Action]) -> list[str]:
    return [a.client_msg_id for a in actions if isinstance(a, SendEntry)]


def delivered(actions: list[Action]) -> list[int]:
    return [e.seq for a in actions if isinstance(a, Deliver) for e in a.events]


def syncs(actions: list[Action]) -> list[int]:
    return [a.since_seq for a in actions if isinstance(a, RequestSync)]


def settled(m: ClientMachine, now: float = T0) -> ClientMachine:
    """Connected, with the server's catch-up over (nothing missing)."""
    m.connection_made(now)
    on_device(m, page(latest=m.sequencer.head), now)
    return m


# ------------------------------------------------------------------ the outbox


def test_the_outbox_goes_out_in_order_when_connected_and_new_entries_at_once() -> None:
    m = make(outbox=[entry(2), entry(1)])
    assert m.outbox_added(entry(3), T0) == []  # offline: it waits
    assert sends(m.connection_made(T0)) == ["c1", "c2", "c3"]
    assert sends(m.outbox_added(entry(4), T0)) == ["c4"]
    assert [e.client_msg_id for e in m.outbox] == ["c1", "c2", "c3", "c4"]


def test_after_a_reconnect_every_unanswered_entry_goes_again_with_its_client_msg_id() -> None:
    m = make(outbox=[entry(1), entry(2), entry(3)])
    first = m.connection_made(T0)
    assert on_device(m, ack("c2", 5)) == [Resolve(ack("c2", 5))]
    assert m.connection_lost() == [] and not m.connected
    again = m.connection_made(T0 + 1)
    assert sends(again) == ["c1", "c3"]
    by_id = {a.client_msg_id: a.payload for a in first if isinstance(a, SendEntry)}
    assert all(a.payload == by_id[a.client_msg_id] for a in again if isinstance(a, SendEntry))


def test_an_unanswered_entry_goes_again_after_ack_timeout_on_the_same_connection() -> None:
    m = make(outbox=[entry(1)])
    m.connection_made(T0)
    assert sends(m.tick(T0 + ACK_TIMEOUT - 0.01)) == []
    assert sends(m.tick(T0 + ACK_TIMEOUT)) == ["c1"]
    assert sends(m.tick(T0 + ACK_TIMEOUT + 1)) == []  # the clock restarted with the resend
    assert sends(m.tick(T0 + 2 * ACK_TIMEOUT)) == ["c1"]


def test_an_ack_resolves_the_send_and_a_duplicate_ack_does_nothing() -> None:
    m = make(outbox=[entry(1)])
    m.connection_made(T0)
    assert on_device(m, ack("c1", 3)) == [Resolve(ack("c1", 3))]
    assert on_device(m, ack("c1", 3)) == []
    assert m.outbox == [] and sends(m.tick(T0 + ACK_TIMEOUT)) == []


def test_our_own_message_in_our_stream_stands_in_for_a_lost_ack() -> None:
    m = make(outbox=[entry(1)])
    m.connection_made(T0)
    actions = on_stream(m, message(1, sender="alice", cid="c1"))
    [resolve] = [a for a in actions if isinstance(a, Resolve)]
    assert (resolve.ack.client_msg_id, resolve.ack.seq, resolve.ack.server_msg_id) == ("c1", 1, 101)
    assert delivered(actions) == [1] and m.outbox == []


@pytest.mark.parametrize(
    ("code", "retry_after", "pauses"),
    [("server_busy", None, [1.0, 2.0]), ("storage_unavailable", None, [1.0, 2.0]), ("rate_limited", 2.5, [2.5, 2.5])],
)
def test_a_retryable_refusal_pauses_publishing_and_the_refused_entry_goes_first(
    code: str, retry_after: float | None, pauses: list[float]
) -> None:
    m = make(outbox=[entry(1), entry(2)])
    assert sends(m.connection_made(T0)) == ["c1", "c2"]
    now = T0
    for pause in pauses:  # back-off grows with each refusal of the same entry (1 s, 2 s) unless told
        refusal = ErrorEvent(code=code, message="not now", ref="c1", retry_after=retry_after)
        assert on_device(m, refusal, now) == []
        assert m.paused_until == now + pause
        assert sends(m.outbox_added(entry(len(m.outbox) + 1), now)) == []  # newer sends wait
        assert sends(m.tick(now + pause - 0.01)) == []
        resumed = m.tick(now + pause)
        assert sends(resumed)[0] == "c1"  # the refused entry first, then what waited
        assert m.paused_until is None
        now += pause
    assert sends(resumed) == ["c1", "c4"]  # c3 went out after the first pause
    assert [e.client_msg_id for e in m.outbox] == ["c1", "c2", "c3", "c4"]


@pytest.mark.parametrize(("code", "error"), [("unknown_recipient", UnknownRecipient), ("not_a_member", NotAMember)])
def test_a_final_refusal_fails_the_send_and_drops_it(code: str, error: type[Exception]) -> None:
    m = make(outbox=[entry(1), entry(2)])
    m.connection_made(T0)
    [fail] = on_device(m, ErrorEvent(code=code, message="no", ref="c1"))
    assert isinstance(fail, Fail) and fail.client_msg_id == "c1" and isinstance(fail.error, error)
    assert fail.error.ref == "c1" and [e.client_msg_id for e in m.outbox] == ["c2"]
    assert sends(m.tick(T0 + ACK_TIMEOUT)) == ["c2"]  # never resent
    assert m.paused_until is None


def test_errors_that_belong_to_no_send_are_reported() -> None:
    m = make(outbox=[entry(1)])
    m.connection_made(T0)
    [report] = on_device(m, ErrorEvent(code="invalid_command", message="bad", ref=None))
    assert isinstance(report, ReportError) and isinstance(report.error, InvalidCommand)
    [report] = on_device(m, ErrorEvent(code="rate_limited", message="slow", ref="c9", retry_after=3))
    assert isinstance(report, ReportError) and isinstance(report.error, RateLimited)
    assert report.error.retry_after == 3 and [e.client_msg_id for e in m.outbox] == ["c1"]


# ------------------------------------------------------- the stream, syncs


def test_events_in_order_once_and_a_gap_asks_for_a_sync_once() -> None:
    m = settled(make())
    assert delivered(on_stream(m, message(1))) == [1]
    assert on_stream(m, message(1)) == []  # twice: dropped
    actions = on_stream(m, message(3))
    assert delivered(actions) == [] and syncs(actions) == [1]
    assert syncs(on_stream(m, message(4))) == []  # one request at a time
    answer = on_device(m, page(2, 3, 4))
    assert delivered(answer) == [2, 3, 4] and syncs(answer) == []
    assert syncs(m.tick(T0 + 60)) == []  # nothing missing, and not silent long enough to probe


def test_sync_pages_with_has_more_ask_for_the_next_page() -> None:
    m = settled(make())
    on_stream(m, message(5))
    first = on_device(m, page(1, 2, latest=9, more=True))
    assert delivered(first) == [1, 2] and syncs(first) == [2]
    last = on_device(m, page(3, 4, 6, 7, 8, 9, latest=9))
    assert delivered(last) == [3, 4, 5, 6, 7, 8, 9] and syncs(last) == []


def test_during_the_catch_up_the_client_waits_for_the_server_s_pages() -> None:
    m = make()
    m.connection_made(T0)
    assert syncs(on_stream(m, message(3))) == []  # a gap, but the catch-up will bring it
    assert syncs(on_device(m, page(1, latest=5, more=True))) == []  # the server pages it itself
    assert syncs(m.tick(T0 + SYNC_TIMEOUT - 0.5)) == []
    done = on_device(m, page(2, 3, 4, 5, latest=5), T0 + 1)
    assert delivered(done) == [2, 3, 4, 5] and syncs(done) == []


def test_a_catch_up_that_never_comes_is_asked_for_after_sync_timeout() -> None:
    m = make(cursor=4)
    m.connection_made(T0)
    assert syncs(m.tick(T0 + SYNC_TIMEOUT - 0.1)) == []
    assert syncs(m.tick(T0 + SYNC_TIMEOUT + 0.5)) == [4]
    assert syncs(m.tick(T0 + SYNC_TIMEOUT + 1.5)) == []  # answered or not, once per sync_timeout
    assert syncs(m.tick(T0 + 2 * SYNC_TIMEOUT + 1)) == [4]


def test_an_answer_that_fills_nothing_is_asked_again_only_after_sync_timeout() -> None:
    m = settled(make())
    assert syncs(on_stream(m, message(2))) == [0]
    assert syncs(on_device(m, page(latest=2), T0 + 1)) == []  # the hole at 1 is still there
    assert syncs(m.tick(T0 + 5)) == []
    assert syncs(m.tick(T0 + 1 + SYNC_TIMEOUT + 1)) == [0]


def test_an_ack_announces_a_head_the_watchdog_syncs_if_the_live_copy_is_lost() -> None:
    m = settled(make(outbox=[entry(1)]))
    assert on_device(m, ack("c1", 1)) == [Resolve(ack("c1", 1))]  # no sync at once: the copy may follow
    assert syncs(m.tick(T0 + 1.5)) == [0]


def test_a_silent_stream_is_probed() -> None:
    m = settled(make())
    on_stream(m, message(1), T0)
    assert syncs(m.tick(T0 + PROBE - 1)) == []
    assert syncs(m.tick(T0 + PROBE + 1)) == [1]


# ------------------------------------------------------------ cursor, acks


def test_only_what_the_application_took_is_persisted_and_acked_and_acks_are_batched() -> None:
    m = settled(make())
    for seq in (1, 2, 3):
        on_stream(m, message(seq))
    assert m.commit(T0) == [] and m.deadline != T0 + ACK_INTERVAL  # nothing taken: nothing to ack
    m.taken(1)
    m.commit(T0)
    m.taken(2)
    m.commit(T0 + 0.05)  # within the batch: one ack for both
    m.taken(3)  # taken, but the application has not asked for the next one: still in its hands
    assert m.tick(T0 + ACK_INTERVAL - 0.01) == []
    assert m.tick(T0 + ACK_INTERVAL) == [PersistCursor(2), SendAck(2)]
    assert m.committed == 2
    assert m.close(T0 + 1) == [PersistCursor(3), SendAck(3)]  # closing commits what was taken


def test_offline_the_cursor_is_persisted_and_the_next_connection_hears_it() -> None:
    m = make(cursor=7)
    m.taken(9)
    m.commit(T0)
    assert m.tick(T0 + ACK_INTERVAL) == [PersistCursor(9)]
    m.connection_made(T0 + 1)
    assert [a for a in m.tick(T0 + 1 + ACK_INTERVAL) if isinstance(a, SendAck | PersistCursor)] == [
        PersistCursor(9),
        SendAck(9),
    ]


def test_deadline_is_the_next_thing_to_do() -> None:
    m = make(outbox=[entry(1)])
    assert m.deadline is None  # offline, nothing committed
    m.connection_made(T0)
    assert m.deadline == T0 + min(1.0, SYNC_TIMEOUT / 2)  # the watchdog
    on_device(m, ErrorEvent(code="rate_limited", message="slow", ref="c1", retry_after=0.5))
    assert m.deadline == T0 + 0.5


# ------------------------------------------------------------------- origin


def test_unsigned_or_wrongly_signed_events_are_dropped_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    m = settled(make(outbox=[entry(1)]))
    forged = encode_event(message(1, content="forged"))
    with caplog.at_level(logging.WARNING, logger="mqchat.clients.machine"):
        assert m.receive(STREAM, forged, T0) == []
        assert m.receive(STREAM, forged, T0) == []
        assert m.receive(STREAM, signed(message(1, content="forged"), event_key(b"test secret", "mallory")), T0) == []
        assert m.receive(DEVICE, encode_event(ack("c1", 1)), T0) == []  # resolves nothing
        assert m.receive(DEVICE, encode_event(ErrorEvent(code="not_a_member", message="x", ref="c1")), T0) == []
        assert m.receive(DEVICE, encode_event(page(1, 2, 3)), T0) == []
    assert m.rejected == {"stream: unsigned": 2, "stream: bad signature": 1, "device: unsigned": 3}
    assert len(caplog.records) == 3  # once per kind
    # The forgeries marked nothing: the real seq 1 is delivered, the send still waits for its ack.
    assert delivered(on_stream(m, message(1))) == [1] and [e.client_msg_id for e in m.outbox] == ["c1"]
    assert m.sequencer.head == 1 and m.committed == 0


def test_without_a_key_nothing_on_the_stream_is_trusted() -> None:
    m = make(key=None)
    m.connection_made(T0)
    assert on_stream(m, message(1)) == [] and m.rejected == {"stream: no event key": 1}
    m.set_event_key(KEY)
    assert delivered(on_stream(m, message(1))) == [1]


def test_typing_is_signed_on_the_stream_and_unsigned_on_group_topics_which_carry_nothing_else() -> None:
    m = settled(make())
    typing = TypingEvent(from_user="bob", to_user="alice", state="started")
    assert on_stream(m, typing) == [DeliverTyping(typing)]
    assert m.receive(STREAM, encode_event(typing), T0) == []
    group_typing = TypingEvent(from_user="bob", group_id="g1", state="started")
    assert m.receive("chat/group/g1", encode_event(group_typing), T0) == [DeliverTyping(group_typing)]
    assert m.receive("chat/group/g1", encode_event(message(1)), T0) == []  # never a stream event
    assert m.receive("chat/presence/bob", b'{"user_id":"bob","status":"online"}', T0) == []
    assert on_device(m, message(1)) == []  # stream events belong on the stream topic


def test_two_signed_versions_of_a_delivered_seq_ask_the_server_which_one_is_real() -> None:
    m = settled(make())
    assert delivered(on_stream(m, message(1, content="forged with a leaked key"))) == [1]
    dispute = on_stream(m, message(1))
    assert dispute == [FetchSync(since_seq=0, limit=1)] and m.disputed == {1}
    assert on_stream(m, message(1)) == []  # no second request while one is out
    answer = m.http_sync(page(1), T0)
    assert delivered(answer) == [1] and [e.content for a in answer if isinstance(a, Deliver) for e in a.events] == [
        "m1"
    ]
    assert m.disputed == set()
    assert on_stream(m, message(1)) == []  # the server's version is now the known one


def test_a_forged_second_version_is_refuted_by_the_server_and_changes_nothing() -> None:
    m = settled(make())
    on_stream(m, message(1))
    assert on_stream(m, message(1, content="forged")) == [FetchSync(0, 1)]
    assert m.http_sync(page(1), T0) == []  # the delivered one was the server's


def test_a_disputed_held_event_is_not_released_before_the_server_answers() -> None:
    m = settled(make())
    on_stream(m, message(3))  # held: 1 and 2 are missing
    assert on_stream(m, message(3, content="other")) == [FetchSync(2, 1)]
    assert delivered(on_device(m, page(1, 2, latest=3))) == [1, 2]  # 3 waits for the server
    assert on_stream(m, message(3)) == []
    m.http_sync_failed()
    assert [a for a in m.tick(T0 + 1.5) if isinstance(a, FetchSync)] == [FetchSync(2, 1)]  # asked again
    assert delivered(m.http_sync(page(3), T0 + 2)) == [3]


def test_a_recall_is_not_a_dispute() -> None:
    m = settled(make())
    on_stream(m, message(1))
    tombstone = message(1).model_copy(update={"content": None, "recalled_at": "2026-01-01T00:01:00.000Z"})
    assert on_stream(m, tombstone) == [] and m.disputed == set()
    assert on_stream(m, GroupUpdated(seq=2, group_id="g1", action="created", user_id="bob", by="bob"))


# ------------------------------------------------------------------ retention


def expired(oldest: int, latest: int) -> ErrorEvent:
    message = f"deleted up to {oldest - 1}: reset, then read from since_seq {oldest - 1}"
    return ErrorEvent(code="cursor_expired", message=message, oldest_seq=oldest, latest_seq=latest)


def gaps(actions: list[Action]) -> list[HistoryGap]:
    return [e for a in actions if isinstance(a, Deliver) for e in a.events if isinstance(e, HistoryGap)]


def test_an_expired_catch_up_resets_to_oldest_minus_one_says_so_and_reads_on() -> None:
    m = make(cursor=3)
    m.connection_made(T0)
    actions = on_device(m, expired(11, 15))
    assert gaps(actions) == [HistoryGap("alice", previous_cursor=3, oldest_seq=11, latest_seq=15)]
    assert gaps(actions)[0].seq == 10 and list(gaps(actions)[0].missing) == list(range(4, 11))
    assert syncs(actions) == [10] and m.cursor_expired == 1
    # The answer to our sync pages like any other, and the application gets the kept events.
    first = on_device(m, page(11, 12, latest=15, more=True), T0 + 1)
    assert delivered(first) == [11, 12] and syncs(first) == [12]
    last = on_device(m, page(13, 14, 15, latest=15), T0 + 2)
    assert delivered(last) == [13, 14, 15] and syncs(last) == []
    # Taking the gap moves the cursor past it: that ack is what ends the server's refusals.
    m.taken(10)
    m.commit(T0 + 3)
    assert m.tick(T0 + 3 + ACK_INTERVAL) == [PersistCursor(10), SendAck(10)]


def test_the_same_cursor_expired_again_does_not_spin_nor_announce_the_gap_twice() -> None:
    m = make(cursor=3)
    m.connection_made(T0)
    assert syncs(on_device(m, expired(11, 15))) == [10]
    # The answer to a sync asked before the reset, or a duplicate: our sync from 10 is on its way.
    for _ in range(20):
        assert on_device(m, expired(11, 15), T0 + 0.5) == []
    assert delivered(on_device(m, page(11, 12, 13, 14, 15, latest=15), T0 + 1)) == [11, 12, 13, 14, 15]
    # Once that is answered, another stale one asks once from where we are, never from before the gap.
    assert syncs(on_device(m, expired(11, 15), T0 + 2)) == [15]
    assert all(on_device(m, expired(11, 15), T0 + 2) == [] for _ in range(20))
    assert m.cursor_expired == 42


def test_a_reconnect_before_the_gap_was_taken_gets_it_again_from_the_server_but_not_the_application() -> None:
    m = make(cursor=3)
    m.connection_made(T0)
    on_device(m, expired(11, 12))
    on_device(m, page(11, 12, latest=12), T0 + 1)
    m.connection_lost()
    m.connection_made(T0 + 5)  # the server's cursor is still 3: its catch-up is refused again
    again = on_device(m, expired(11, 13), T0 + 5)
    assert gaps(again) == [] and delivered(again) == [] and syncs(again) == [12]
    assert delivered(on_device(m, page(13, latest=13), T0 + 6)) == [13]


def test_held_events_after_the_gap_are_released_and_those_inside_it_dropped() -> None:
    m = settled(make(cursor=3))
    on_stream(m, message(6))  # inside what the server deleted
    on_stream(m, message(11))  # kept
    on_stream(m, message(13))
    actions = on_device(m, expired(11, 13))
    assert delivered(actions) == [10, 11] and syncs(actions) == [11]  # 10: the gap itself
    assert delivered(on_device(m, page(12, 13, latest=13))) == [12, 13]


def test_a_stream_with_nothing_kept_resets_to_its_head() -> None:
    m = make(cursor=3)
    m.connection_made(T0)
    actions = on_device(m, expired(9, 8))
    assert gaps(actions) == [HistoryGap("alice", 3, 9, 8)] and syncs(actions) == [8]
    assert on_device(m, page(latest=8), T0 + 1) == []
    assert on_stream(m, message(9)) == [Deliver((message(9),))]  # live again


def test_a_later_retention_pass_is_a_new_gap() -> None:
    m = make(cursor=3)
    m.connection_made(T0)
    on_device(m, expired(11, 20))
    on_device(m, page(11, 12, latest=20, more=True), T0 + 1)  # then more went before 13 was read
    actions = on_device(m, expired(16, 20), T0 + 2)
    assert gaps(actions) == [HistoryGap("alice", 12, 16, 20)] and syncs(actions) == [15]


def test_an_http_sync_answered_cursor_expired_resets_too() -> None:
    m = settled(make(cursor=3))
    error = CursorExpired("gone", oldest_seq=11, latest_seq=12)
    actions = m.http_sync_expired(error, T0)
    assert gaps(actions) == [HistoryGap("alice", 3, 11, 12)] and syncs(actions) == [10]
