"""Delivery guarantees with a real server and real MQTT clients.

- a sender retrying one ``client_msg_id`` never creates a duplicate (across a reconnect, over HTTP);
- a recipient that was offline gets everything exactly once, in order, paged, without asking,
  and later only what is after its cursor;
- every device of the recipient and of the sender sees a message;
- ``sync_messages`` over MQTT pages the stream;
- seqs stay gapless when several users send from several devices at once;
- a connected device keeps getting live events while other devices of its user go away.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest

from mqchat.config import Settings
from mqchat.runner import RunningServer
from tests.support.accounts import UNLIMITED, http_client, register
from tests.support.devices import Device, connect_device

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """These tests send in bursts on purpose: the per-device rate limit is not what they test."""
    limits = settings.limits.model_copy(update=UNLIMITED)
    return settings.model_copy(update={"limits": limits})


# ------------------------------------------------------------------ helpers


async def expect(device: Device, timeout: float = 10, **counts: int) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Exactly ``counts`` events by type, with their topics; any other event fails the test.

    Strict on purpose: an event that is skipped here could hide a duplicate or a lost one.
    """
    got: dict[str, list[tuple[str, dict[str, Any]]]] = {kind: [] for kind in counts}
    async with asyncio.timeout(timeout):
        while any(len(got[kind]) < n for kind, n in counts.items()):
            topic, event = await device.received.get()
            kind = event["type"]
            assert len(got.get(kind, ())) < counts.get(kind, 0), f"unexpected {kind} on {topic}: {event}"
            got[kind].append((topic, event))
    return got


async def one(device: Device, kind: str, timeout: float = 10) -> tuple[str, dict[str, Any]]:
    """The next event, which must be of ``kind``."""
    return (await expect(device, timeout, **{kind: 1}))[kind][0]


async def acks_for(device: Device, count: int, timeout: float = 20) -> dict[str, dict[str, Any]]:
    """Exactly ``count`` message_acks by client_msg_id, nothing else on the device topic (no error)."""
    acks: dict[str, dict[str, Any]] = {}
    async with asyncio.timeout(timeout):
        while len(acks) < count:
            topic, event = await device.received.get()
            if topic == f"chat/device/{device.user_id}/{device.device_id}":
                assert event["type"] == "message_ack", event
                assert event["client_msg_id"] not in acks, f"second ack for {event['client_msg_id']}"
                acks[event["client_msg_id"]] = event
    return acks


async def catch_up_pages(device: Device, timeout: float = 15) -> list[dict[str, Any]]:
    """The sync_response pages a device gets on subscribing, up to the one without has_more."""
    pages: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while not pages or pages[-1]["has_more"]:
            _, page = await one(device, "sync_response", timeout)
            pages.append(page)
    return pages


async def fanned_out(device: Device, timeout: float = 10) -> None:
    """Until the broker has fanned out every event stored before this call.

    A sender has its ``message_ack`` before the broker has delivered the batch's stream events:
    amqtt queues broadcasts and matches subscribers when it dequeues one. A device that subscribed
    in between would get those events live *and* in its catch-up page. The bridge enqueues a
    batch's acks and events together, and amqtt handles broadcasts one at a time in order, so the
    answer to a later ``sync_messages`` arrives only after all of them went out.
    """
    await device.publish({"type": "sync_messages", "since_seq": 0, "limit": 1})
    device_topic = f"chat/device/{device.user_id}/{device.device_id}"
    async with asyncio.timeout(timeout):
        while True:
            topic, event = await device.received.get()
            if topic == device_topic:
                assert event["type"] == "sync_response", event
                return


async def read_stream(server: RunningServer, token: str, limit: int = 100) -> list[dict[str, Any]]:
    """The whole stream over ``GET /v1/sync``, checked to be exactly seq 1..N."""
    events: list[dict[str, Any]] = []
    async with http_client(server, token) as http:
        while True:
            since = events[-1]["seq"] if events else 0
            response = await http.get("/v1/sync", params={"since_seq": since, "limit": limit})
            assert response.status_code == 200, response.text
            page = response.json()
            events.extend(page["events"])
            if not page["has_more"]:
                break
            assert len(page["events"]) == limit
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), "stream has a gap or a repeat"
    assert page["latest_seq"] == len(events)
    return events


async def send_http(server: RunningServer, token: str, to_user: str, content: str, cid: str) -> dict[str, Any]:
    async with http_client(server, token) as http:
        response = await http.post("/v1/messages", json={"client_msg_id": cid, "to_user": to_user, "content": content})
        assert response.status_code == 200, response.text
        return dict(response.json())


def new_messages(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "new_message"]


async def send_burst(device: Device, to_user: str, cids: list[str]) -> None:
    # Tasks are created in order, so the publishes leave (and are stored) in list order.
    await asyncio.gather(*(device.send(to_user, f"content of {cid}", cid) for cid in cids))


# ------------------------------------------------------- (a) idempotent retries


async def test_retry_across_reconnect_and_over_http_never_duplicates(server: RunningServer) -> None:
    alice_token = await register(server, "alice")
    bob_token = await register(server, "bob")
    async with connect_device(server, "bob", "laptop", bob_token) as bob:
        assert (await one(bob, "sync_response"))[1]["events"] == []

        async with connect_device(server, "alice", "phone", alice_token) as alice:
            await one(alice, "sync_response")
            await alice.send("bob", "first try", "retry-1")
            got = await expect(alice, message_ack=1, new_message=1)
        first = got["message_ack"][0][1]
        assert first["client_msg_id"] == "retry-1"
        assert first["duplicate"] is False and first["status"] == "sent" and first["seq"] == 1

        # The same device comes back (as after a lost ack) and sends the same command again.
        async with connect_device(server, "alice", "phone", alice_token) as alice:
            _, page = await one(alice, "sync_response")
            assert [e["client_msg_id"] for e in page["events"]] == ["retry-1"]
            await alice.send("bob", "second try, other content", "retry-1")
            assert (await one(alice, "message_ack"))[1] == {**first, "duplicate": True}

            # The same id over HTTP after MQTT: the original ids, duplicate.
            over_http = await send_http(server, alice_token, "bob", "third try", "retry-1")
            assert over_http == {**first, "duplicate": True}

            # And the other way round: first over HTTP, then retried over MQTT.
            via_http = await send_http(server, alice_token, "bob", "sent over HTTP", "retry-2")
            assert via_http["duplicate"] is False and via_http["seq"] == 2
            await alice.send("bob", "retried over MQTT", "retry-2")
            got = await expect(alice, message_ack=1, new_message=1)
            assert got["message_ack"][0][1] == {**via_http, "duplicate": True}
            assert got["new_message"][0][1]["client_msg_id"] == "retry-2"
            # A duplicate publishes nothing, on either stream.
            assert await alice.drain() == []

        received = [event for _, event in (await expect(bob, new_message=2))["new_message"]]
        assert [(e["client_msg_id"], e["seq"], e["server_msg_id"], e["content"]) for e in received] == [
            ("retry-1", 1, first["server_msg_id"], "first try"),
            ("retry-2", 2, via_http["server_msg_id"], "sent over HTTP"),
        ]
        assert await bob.drain() == []

    for token in (alice_token, bob_token):
        stream = await read_stream(server, token)
        assert [(e["client_msg_id"], e["server_msg_id"], e["content"]) for e in stream] == [
            ("retry-1", first["server_msg_id"], "first try"),
            ("retry-2", via_http["server_msg_id"], "sent over HTTP"),
        ]


# ---------------------------------------------------- (b) offline, then back


async def test_offline_recipient_catches_up_exactly_once_in_order(server: RunningServer) -> None:
    alice_token = await register(server, "alice")
    bob_token = await register(server, "bob")
    async with connect_device(server, "bob", "laptop", bob_token) as laptop:
        _, page = await one(laptop, "sync_response")
        assert page == {"type": "sync_response", "events": [], "latest_seq": 0, "has_more": False}
    # bob's laptop is offline now, and has no cursor (it never acked).

    async with connect_device(server, "alice", "phone", alice_token) as alice:
        await one(alice, "sync_response")
        cids = [f"offline-{i:03d}" for i in range(250)]
        await send_burst(alice, "bob", cids)
        acks = await acks_for(alice, 250)
        assert sorted(a["seq"] for a in acks.values()) == list(range(1, 251))
        await fanned_out(alice)
        stored = await read_stream(server, bob_token)
        assert len(stored) == 250

        async with connect_device(server, "bob", "laptop", bob_token) as laptop:
            pages = await catch_up_pages(laptop)
            assert [(len(p["events"]), p["has_more"], p["latest_seq"]) for p in pages] == [
                (100, True, 250),
                (100, True, 250),
                (50, False, 250),
            ]
            events = [e for p in pages for e in p["events"]]
            assert events == stored
            assert [e["client_msg_id"] for e in events] == cids  # in the order alice sent them
            for event in events:
                ack = acks[event["client_msg_id"]]
                assert event["type"] == "new_message"
                assert (event["server_msg_id"], event["created_at"]) == (ack["server_msg_id"], ack["created_at"])
                assert (event["from_user"], event["to_user"]) == ("alice", "bob")
                assert event["content"] == f"content of {event['client_msg_id']}"
            # Exactly once: no second round of pages, no live copy.
            assert await laptop.drain(0.5) == []

            await laptop.publish({"type": "ack", "seq": 250})
            await _wait_cursor(server, "bob", "laptop", 250)

        later = [f"later-{i}" for i in range(5)]
        await send_burst(alice, "bob", later)
        later_acks = await acks_for(alice, 5)
        await fanned_out(alice)

        async with connect_device(server, "bob", "laptop", bob_token) as laptop:
            pages = await catch_up_pages(laptop)
            assert len(pages) == 1
            assert pages[0]["latest_seq"] == 255 and pages[0]["has_more"] is False
            assert [(e["seq"], e["client_msg_id"], e["server_msg_id"]) for e in pages[0]["events"]] == [
                (251 + i, cid, later_acks[cid]["server_msg_id"]) for i, cid in enumerate(later)
            ]
            assert await laptop.drain(0.5) == []


async def _wait_cursor(server: RunningServer, user_id: str, device_id: str, seq: int) -> None:
    """Until the device's stored cursor reaches ``seq`` (the cursor write is asynchronous to the ack)."""
    async with asyncio.timeout(10):
        while await server.services.store.get_cursor(user_id, device_id) != seq:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


# ---------------------------------------------------------- (c) many devices


async def test_every_device_of_both_users_sees_the_message(server: RunningServer) -> None:
    alice_token = await register(server, "alice")
    bob_token = await register(server, "bob")
    async with (
        connect_device(server, "alice", "phone", alice_token) as alice_phone,
        connect_device(server, "alice", "tablet", alice_token) as alice_tablet,
        connect_device(server, "bob", "laptop", bob_token) as bob_laptop,
        connect_device(server, "bob", "phone", bob_token) as bob_phone,
    ):
        devices = (alice_phone, alice_tablet, bob_laptop, bob_phone)
        for device in devices:
            await one(device, "sync_response")

        await alice_phone.send("bob", "hi from alice's phone", "multi-1")
        got = await expect(alice_phone, message_ack=1, new_message=1)
        topic, ack = got["message_ack"][0]
        assert topic == "chat/device/alice/phone"
        assert ack["seq"] == 1 and ack["duplicate"] is False
        own_topic, own = got["new_message"][0]
        assert own_topic == "chat/user/alice" and own["seq"] == ack["seq"]

        for device in (bob_laptop, bob_phone):
            topic, event = await one(device, "new_message")
            assert topic == "chat/user/bob"
            assert (event["seq"], event["server_msg_id"], event["client_msg_id"], event["content"]) == (
                1,
                ack["server_msg_id"],
                "multi-1",
                "hi from alice's phone",
            )
        # Alice's other device learns what her phone sent, at the seq the phone was acked with.
        topic, event = await one(alice_tablet, "new_message")
        assert topic == "chat/user/alice"
        assert event == own
        assert (event["seq"], event["server_msg_id"], event["client_msg_id"], event["from_user"]) == (
            ack["seq"],
            ack["server_msg_id"],
            "multi-1",
            "alice",
        )

        # The reply from bob's phone: both of bob's devices and both of alice's see it, seq 2 everywhere.
        await bob_phone.send("alice", "hi back", "multi-2")
        got = await expect(bob_phone, message_ack=1, new_message=1)
        reply_ack = got["message_ack"][0][1]
        assert reply_ack["seq"] == 2
        for device in (alice_phone, alice_tablet, bob_laptop):
            _, event = await one(device, "new_message")
            assert (event["seq"], event["server_msg_id"], event["content"]) == (
                2,
                reply_ack["server_msg_id"],
                "hi back",
            )

        # Nothing else: acks went only to the sending device, each event came once.
        for device in devices:
            assert await device.drain() == []


# -------------------------------------------------- (d) sync_messages over MQTT


async def test_sync_messages_over_mqtt_pages_the_stream(server: RunningServer) -> None:
    alice_token = await register(server, "alice")
    bob_token = await register(server, "bob")
    async with connect_device(server, "bob", "laptop", bob_token) as bob:
        await one(bob, "sync_response")
        acks = [await send_http(server, alice_token, "bob", f"note {i}", f"sync-{i}") for i in range(7)]
        live = [event for _, event in (await expect(bob, new_message=7))["new_message"]]
        assert [e["seq"] for e in live] == list(range(1, 8))
        assert [e["server_msg_id"] for e in live] == [a["server_msg_id"] for a in acks]

        async def sync(**command: Any) -> dict[str, Any]:
            await bob.publish({"type": "sync_messages", **command})
            topic, response = await one(bob, "sync_response")
            assert topic == "chat/device/bob/laptop"
            return response

        # Pages hold the events exactly as they were published live.
        assert await sync(since_seq=2, limit=3) == {
            "type": "sync_response",
            "events": live[2:5],
            "latest_seq": 7,
            "has_more": True,
        }
        assert await sync(since_seq=5, limit=3) == {
            "type": "sync_response",
            "events": live[5:7],
            "latest_seq": 7,
            "has_more": False,
        }
        assert await sync(since_seq=4, limit=3) == {
            "type": "sync_response",
            "events": live[4:7],
            "latest_seq": 7,
            "has_more": False,
        }
        assert await sync(since_seq=7) == {"type": "sync_response", "events": [], "latest_seq": 7, "has_more": False}
        assert await sync(since_seq=1000) == {"type": "sync_response", "events": [], "latest_seq": 7, "has_more": False}
        assert await sync() == {"type": "sync_response", "events": live, "latest_seq": 7, "has_more": False}

        # Out of range: an error naming the problem, and the connection stays usable.
        await bob.publish({"type": "sync_messages", "since_seq": 0, "limit": 501})
        topic, error = await one(bob, "error")
        assert topic == "chat/device/bob/laptop" and error["code"] == "invalid_command"
        assert await sync(since_seq=6, limit=1) == {
            "type": "sync_response",
            "events": live[6:7],
            "latest_seq": 7,
            "has_more": False,
        }
        assert await bob.drain() == []


# ------------------------------------------ (e) gapless seqs under concurrency


USERS = ("alice", "bob", "carol")
DEVICES = ("d1", "d2")
PER_DEVICE = 40
PER_USER_HTTP = 10
# Each user sends PER_DEVICE from each device plus PER_USER_HTTP over HTTP, and gets as many.
STREAM_LENGTH = 2 * (len(DEVICES) * PER_DEVICE + PER_USER_HTTP)


async def _ack_and_stream(
    device: Device, acks_expected: int, timeout: float = 30
) -> tuple[dict[str, dict[str, Any]], dict[int, dict[str, Any]]]:
    """What a device gets while everyone sends: its own acks, and its user's live stream by seq."""
    acks: dict[str, dict[str, Any]] = {}
    stream: dict[int, dict[str, Any]] = {}
    async with asyncio.timeout(timeout):
        while len(acks) < acks_expected or len(stream) < STREAM_LENGTH:
            topic, event = await device.received.get()
            if event["type"] == "message_ack":
                assert topic == f"chat/device/{device.user_id}/{device.device_id}"
                assert event["client_msg_id"] not in acks, f"second ack: {event}"
                acks[event["client_msg_id"]] = event
            else:
                assert (topic, event["type"]) == (f"chat/user/{device.user_id}", "new_message"), event
                assert event["seq"] not in stream, f"seq delivered twice: {event} and {stream[event['seq']]}"
                stream[event["seq"]] = event
    return acks, stream


async def test_seqs_stay_gapless_with_concurrent_senders(server: RunningServer) -> None:
    tokens = {user: await register(server, user) for user in USERS}

    def peers(user: str) -> list[str]:
        return [u for u in USERS if u != user]

    async with (
        connect_device(server, "alice", "d1", tokens["alice"]) as a1,
        connect_device(server, "alice", "d2", tokens["alice"]) as a2,
        connect_device(server, "bob", "d1", tokens["bob"]) as b1,
        connect_device(server, "bob", "d2", tokens["bob"]) as b2,
        connect_device(server, "carol", "d1", tokens["carol"]) as c1,
        connect_device(server, "carol", "d2", tokens["carol"]) as c2,
    ):
        devices = (a1, a2, b1, b2, c1, c2)
        for device in devices:
            _, page = await one(device, "sync_response")
            assert page["events"] == []

        # Who sends what to whom, decided up front: cid -> (sender, recipient).
        plan: dict[str, tuple[str, str]] = {}
        device_sends: dict[str, list[tuple[str, str]]] = {}
        for device in devices:
            targets = itertools.cycle(peers(device.user_id))
            name = f"{device.user_id}-{device.device_id}"
            device_sends[name] = [(f"{name}-{i:02d}", next(targets)) for i in range(PER_DEVICE)]
            plan.update({cid: (device.user_id, to) for cid, to in device_sends[name]})
        http_sends = {
            user: [(f"{user}-http-{i:02d}", peers(user)[i % 2]) for i in range(PER_USER_HTTP)] for user in USERS
        }
        for user, sends in http_sends.items():
            plan.update({cid: (user, to) for cid, to in sends})

        async def mqtt_sender(device: Device) -> tuple[dict[str, dict[str, Any]], dict[int, dict[str, Any]]]:
            sends = device_sends[f"{device.user_id}-{device.device_id}"]
            receiving = asyncio.create_task(_ack_and_stream(device, len(sends)))
            await asyncio.gather(*(device.send(to, f"content of {cid}", cid) for cid, to in sends))
            return await receiving

        async def http_sender(user: str) -> dict[str, dict[str, Any]]:
            async def post(cid: str, to: str) -> tuple[str, dict[str, Any]]:
                return cid, await send_http(server, tokens[user], to, f"content of {cid}", cid)

            return dict(await asyncio.gather(*(post(cid, to) for cid, to in http_sends[user])))

        async with asyncio.timeout(45):
            # Everyone at once: six MQTT devices and three HTTP clients.
            device_results, http_results = await asyncio.gather(
                asyncio.gather(*(mqtt_sender(d) for d in devices)),
                asyncio.gather(*(http_sender(u) for u in USERS)),
            )
        acks: dict[str, dict[str, Any]] = {}
        for device_acks, _ in device_results:
            acks.update(device_acks)
        for result in http_results:
            acks.update(result)
        assert sorted(acks) == sorted(plan)
        assert all(ack["duplicate"] is False for ack in acks.values())
        assert len({ack["server_msg_id"] for ack in acks.values()}) == len(plan)

        streams = {user: await read_stream(server, tokens[user]) for user in USERS}
        for user in USERS:
            sent = {cid for cid, (sender, _) in plan.items() if sender == user}
            got = {cid for cid, (_, to) in plan.items() if to == user}
            stream = streams[user]
            # Every message the user sent or got, exactly once, and nothing else.
            assert len(stream) == len(sent) + len(got) == STREAM_LENGTH
            by_cid = {e["client_msg_id"]: e for e in stream}
            assert len(by_cid) == len(stream)
            assert set(by_cid) == sent | got
            for cid, event in by_cid.items():
                sender, to = plan[cid]
                assert (event["from_user"], event["to_user"]) == (sender, to)
                assert event["server_msg_id"] == acks[cid]["server_msg_id"]
                assert event["created_at"] == acks[cid]["created_at"]
                if sender == user:
                    assert event["seq"] == acks[cid]["seq"]  # the ack's seq is the sender's stream position

        # Live delivery agrees with the store: each device saw its user's whole stream once, same seqs.
        for device, (_, live) in zip(devices, device_results, strict=True):
            assert [live[seq] for seq in sorted(live)] == streams[device.user_id]
        for device in devices:
            assert await device.drain() == []


# ------------------------- live delivery while other devices of the user go away


GONE_DEVICES = 16  # with the watcher, under limits.max_connections_per_user (20)
CYCLES = 8
WINDOW = 1.2  # seconds of traffic after the devices left: amqtt's session monitor runs every second


@contextlib.asynccontextmanager
async def subscribed_to(
    server: RunningServer, user_id: str, device_id: str, token: str, topic: str
) -> AsyncIterator[Device]:
    """A device with one subscription (the device topic alone starts a catch-up, the stream does not)."""
    async with connect_device(server, user_id, device_id, token, subscribe=False) as device:
        await device.client.subscribe(topic, qos=1)
        yield device


class LiveEventsLost(AssertionError):
    """A connected device missed events of its stream that the broker fanned out."""


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_live_delivery_survives_other_devices_going_away(server: RunningServer) -> None:
    """A connected device gets every live event while other devices of its user go away.

    Each cycle: GONE_DEVICES of bob's devices subscribe before his watching device and disconnect;
    then alice sends for WINDOW seconds, during which the broker forgets their sessions. The
    watching device must see every one of her messages live, each once.
    """
    alice_token = await register(server, "alice")
    bob_token = await register(server, "bob")
    sent = 0
    # alice hears only her acks: the broker's work is then mostly fanning out to bob's devices.
    async with subscribed_to(server, "alice", "phone", alice_token, "chat/device/alice/phone") as alice:
        await one(alice, "sync_response")
        for cycle in range(CYCLES):
            async with contextlib.AsyncExitStack() as gone:
                await asyncio.gather(
                    *(
                        gone.enter_async_context(
                            subscribed_to(server, "bob", f"gone-{cycle}-{k}", bob_token, "chat/user/bob")
                        )
                        for k in range(GONE_DEVICES)
                    )
                )
                # Subscribed after them: the watcher comes after them in the broker's subscriber list.
                async with subscribed_to(server, "bob", f"watch-{cycle}", bob_token, "chat/user/bob") as watcher:
                    await gone.aclose()  # they leave before there is traffic to deliver to them
                    await asyncio.sleep(0.05)
                    first = sent + 1
                    until = asyncio.get_running_loop().time() + WINDOW
                    while asyncio.get_running_loop().time() < until:  # no waiting for acks: keep it busy
                        await send_burst(alice, "bob", [f"live-{n:05d}" for n in range(sent, sent + 50)])
                        sent += 50
                    await acks_for(alice, sent - first + 1)
                    await fanned_out(alice)
                    seen = [e["seq"] for e in new_messages(await watcher.drain(0.5))]
            missing = sorted(set(range(first, sent + 1)) - set(seen))
            if missing:
                raise LiveEventsLost(f"cycle {cycle}: bob's connected device missed seqs {missing}")
            assert sorted(seen) == list(range(first, sent + 1))
