"""Push hooks for offline users, against a local webhook receiver that fails and hangs on purpose:
who gets an event, what it says and how it is signed, retries with back-off, dead letters, and
no event lost when the server is killed (SIGKILL) in the middle. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from mqchat.bridge.push import PushService
from mqchat.bridge.storage import SqlStore
from mqchat.bridge.store import PushClaim
from mqchat.cli import main
from mqchat.config import PushSettings, Settings
from mqchat.runner import RunningServer
from tests.support.accounts import UNLIMITED, http_client, register
from tests.support.devices import connect_device
from tests.support.processes import ServerProcess
from tests.webhook import Answer, Delivery, Receiver, webhook_receiver

pytestmark = pytest.mark.timeout(120)
SECRET = "a-webhook-secret-for-tests"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with webhook_receiver() as found:
        yield found


@pytest.fixture
def settings(settings: Settings, receiver: Receiver) -> Settings:
    push = PushSettings(
        webhook_url=receiver.url,
        webhook_secret=SECRET,
        timeout_seconds=1,
        backoff_seconds=0.2,
        backoff_max_seconds=0.5,
        max_attempts=4,
    )
    return settings.model_copy(update={"push": push, "limits": settings.limits.model_copy(update=UNLIMITED)})


async def send(server: RunningServer, token: str, client_msg_id: str, **target: str) -> dict[str, Any]:
    async with http_client(server, token) as http:
        body = {"client_msg_id": client_msg_id, "content": "Hello there, this is long", **target}
        sent = await http.post("/v1/messages", json=body)
        assert sent.status_code == 200, sent.text
        return dict(sent.json())


async def until(condition: Callable[[], bool], timeout: float = 20) -> None:
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the condition did not come true")


def push_service(server: RunningServer) -> PushService:
    push = server.services.ops.push
    assert push is not None
    return push


async def test_only_recipients_without_a_connected_device_get_a_signed_event(
    server: RunningServer, receiver: Receiver
) -> None:
    alice, _, carol = [await register(server, u) for u in ("alice", "bob", "carol")]
    async with http_client(server, alice) as http:
        gid = (await http.post("/v1/groups", json={"name": "g", "members": ["bob", "carol"]})).json()["group_id"]
    async with connect_device(server, "carol", "phone", carol):
        direct = await send(server, alice, "m1", to_user="bob")
        await send(server, alice, "m2", to_user="carol")  # online: no event
        await send(server, alice, "m3", to_user="alice")  # a note to self: no event
        grouped = await send(server, alice, "m4", group_id=gid)  # bob only: alice sent it, carol is online
        await receiver.wait_for(lambda r: len(r.deliveries) >= 2)
        await asyncio.sleep(1.5)  # time for any event that should not be there
    assert len(receiver.deliveries) == 2
    first, second = sorted(receiver.deliveries, key=lambda d: d.json["message_id"])
    assert first.json == {
        "type": "offline_message",
        "event_id": f"{direct['server_msg_id']}:bob",
        "recipient": "bob",
        "message_id": direct["server_msg_id"],
        "sender": "alice",
        "conversation_id": "user:alice",
        "group_id": None,
        "msg_type": "text",
        "created_at": direct["created_at"],
    }  # no preview unless push.preview_chars says so
    assert (second.json["message_id"], second.json["recipient"]) == (grouped["server_msg_id"], "bob")
    assert (second.json["conversation_id"], second.json["group_id"]) == (f"group:{gid}", gid)
    for delivery in (first, second):
        assert delivery.signed_with(SECRET) and not delivery.signed_with(SECRET + "x")
        assert delivery.headers["idempotency-key"] == delivery.json["event_id"]
        assert (delivery.headers["x-mqchat-attempt"], delivery.headers["content-type"]) == ("1", "application/json")
    push = push_service(server)
    assert await push.queue_depths() == {"pending": 0, "dead": 0}
    assert (push.stats.delivered, push.stats.failed_attempts) == (2, 0)


async def test_failures_and_timeouts_are_retried_with_backoff_then_dead_lettered(
    server: RunningServer, receiver: Receiver, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: collections.Counter[str] = collections.Counter()

    def script(delivery: Delivery) -> Answer:
        """m1: a 500, then no answer at all (timeout), then accepted. m2: always a 500."""
        key = delivery.headers["idempotency-key"]
        seen[key] += 1
        if key == flaky:
            return {1: "fail", 2: "hang"}.get(seen[key], "ok")  # type: ignore[return-value]
        return "fail"

    receiver.script = script
    alice = await register(server, "alice")
    await register(server, "bob")
    flaky = f"{(await send(server, alice, 'm1', to_user='bob'))['server_msg_id']}:bob"
    doomed = f"{(await send(server, alice, 'm2', to_user='bob'))['server_msg_id']}:bob"
    push = push_service(server)
    await receiver.wait_for(lambda r: len(r.accepted()) == 1 and seen[doomed] == 4, timeout=40)
    await until(lambda: push.stats.dead_lettered == 1 and push.stats.delivered == 1)

    attempts = [d for d in receiver.deliveries if d.headers["idempotency-key"] == flaky]
    assert [(d.headers["x-mqchat-attempt"], d.answer) for d in attempts] == [("1", "fail"), ("2", "hang"), ("3", "ok")]
    assert len({d.body for d in attempts}) == 1  # the same event every time
    tries = [d.at for d in receiver.deliveries if d.headers["idempotency-key"] == doomed]
    gaps = [later - earlier for earlier, later in itertools.pairwise(tries)]
    assert len(tries) == 4 and all(gap >= want * 0.9 for gap, want in zip(gaps, [0.2, 0.4, 0.5], strict=True)), gaps
    assert (push.stats.delivered, push.stats.failed_attempts, push.stats.dead_lettered) == (1, 2 + 4, 1)
    assert await push.queue_depths() == {"pending": 0, "dead": 1}
    await asyncio.sleep(1)
    assert seen[doomed] == 4  # a dead letter is not tried again ...

    flags = ["--data-dir", str(settings.data_dir), "--database-url", settings.resolved_database_url()]
    assert await asyncio.to_thread(main, ["push", "status", *flags]) == 0
    assert capsys.readouterr().out == "pending 0, dead 1\n"
    receiver.script = lambda _: "ok"
    assert await asyncio.to_thread(main, ["push", "requeue", *flags]) == 0  # ... until it is queued again
    assert capsys.readouterr().out == "queued 1 dead-lettered events again\n"
    await receiver.wait_for(lambda r: len(r.accepted()) == 2)
    assert receiver.accepted()[-1].headers["idempotency-key"] == doomed
    assert receiver.accepted()[-1].headers["x-mqchat-attempt"] == "1"


async def test_a_preview_only_when_configured_and_never_for_a_recalled_message(
    server: RunningServer, receiver: Receiver, settings: Settings
) -> None:
    alice = await register(server, "alice")
    await register(server, "bob")
    receiver.script = lambda _: "hang"  # hold the first delivery while the message is recalled
    ack = await send(server, alice, "m1", to_user="bob")
    await receiver.wait_for(lambda r: len(r.deliveries) == 1)
    async with http_client(server, alice) as http:
        assert (await http.post(f"/v1/messages/{ack['server_msg_id']}/recall")).status_code == 204
    receiver.script = lambda _: "ok"
    push = push_service(server)
    await until(lambda: push.stats.dropped == 1)  # the hung attempt times out, the retry finds a tombstone
    assert (push.stats.dropped, len(receiver.accepted())) == (1, 0)

    store = server.services.store
    assert isinstance(store, SqlStore)
    [message] = await store.history("bob", "user:alice", None, 1)
    with_preview = settings.push.model_copy(update={"preview_chars": 5})
    previewing = PushService(store, with_preview, push.hook, offline_days=7)
    claim = PushClaim(1, "bob", 1, dataclasses.replace(message, recalled_at=None), message.id)
    assert previewing.body(claim).decode().endswith(',"preview":"Hello"}')


async def test_no_event_is_lost_when_the_server_is_killed_mid_delivery(tmp_path: Path, database_url: str) -> None:
    """Events pending and in flight at a SIGKILL are all delivered after the restart."""
    answers: dict[str, Answer] = {"now": "fail"}
    async with webhook_receiver(lambda d: "hang" if d.headers["x-mqchat-attempt"] == "2" else answers["now"]) as hook:
        env = {
            "MQCHAT_PUSH__WEBHOOK_URL": hook.url,
            "MQCHAT_PUSH__WEBHOOK_SECRET": SECRET,
            "MQCHAT_PUSH__TIMEOUT_SECONDS": "1",
            "MQCHAT_PUSH__BACKOFF_SECONDS": "0.3",
            "MQCHAT_PUSH__MAX_ATTEMPTS": "20",
        }
        data = tmp_path / "data"
        sent: set[str] = set()
        async with ServerProcess(data, database_url, env) as first:
            alice = await first.register("alice")
            await first.register("bob")
            async with first.http(alice) as http:
                for n in range(6):
                    acked = await http.post(
                        "/v1/messages", json={"client_msg_id": f"m{n}", "to_user": "bob", "content": "x"}
                    )
                    assert acked.status_code == 200
                    sent.add(f"{acked.json()['server_msg_id']}:bob")
            # Every event has failed once and some are hanging in their second attempt: kill.
            await hook.wait_for(lambda r: sum(d.headers["x-mqchat-attempt"] == "2" for d in r.deliveries) >= 3)
            await first.kill()
        assert not hook.accepted()

        answers["now"] = "ok"
        store = SqlStore.from_url(database_url)
        try:
            async with ServerProcess(data, database_url, env):
                # Claims held by the killed process lapse (2 x timeout + 5 s), then everything goes.
                await hook.wait_for(lambda r: {d.headers["idempotency-key"] for d in r.accepted()} >= sent, timeout=60)
                for _ in range(200):  # and the outbox empties as the answers are recorded
                    if await store.push_depths() == {"pending": 0, "dead": 0}:
                        break
                    await asyncio.sleep(0.05)
                assert await store.push_depths() == {"pending": 0, "dead": 0}
        finally:
            await store.close()
        assert all(d.signed_with(SECRET) for d in hook.deliveries)


async def test_the_worker_stops_when_a_wake_up_lands_with_the_stop(server: RunningServer) -> None:
    """Python 3.11's ``asyncio.wait_for`` returns the inner result when a cancellation lands
    just as its wait ends, swallowing it: the worker would go on and ``stop()`` hang."""
    push = push_service(server)
    for yields in range(8):  # each ordering of the wake-up's callbacks against the cancellation
        push.start()
        await asyncio.sleep(0.2)  # parked in its wait for a wake-up
        worker = push._worker
        assert worker is not None
        push.hook.wake.set()
        for _ in range(yields):
            await asyncio.sleep(0)
        stopping = asyncio.create_task(push.stop())
        done, _ = await asyncio.wait({stopping}, timeout=3)  # stop_task cancels again after 5 s
        if not done:
            worker.cancel()  # end it, then fail
        await stopping
        assert done, f"the worker went on after its cancellation ({yields} yields)"
        assert worker.cancelled()
