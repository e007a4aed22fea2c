"""The chat service between the broker and the store, with a recording publisher."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from mqchat.bridge.chat import ChatService
from mqchat.bridge.metrics import Metrics
from mqchat.bridge.storage import SqlStore
from mqchat.bridge.store import SendOutcome, SendRequest
from mqchat.config import BridgeSettings
from mqchat.core.errors import ChatError, StorageUnavailable
from mqchat.core.ids import DeviceAddress


class Recorder:
    def __init__(self) -> None:
        self.published: list[tuple[str, dict[str, object]]] = []
        self.changed = asyncio.Event()

    async def publish(self, topic: str, payload: bytes) -> None:
        self.deliver(topic, payload)

    def deliver(self, topic: str, payload: bytes, users: frozenset[str] | None = None) -> int:
        self.published.append((topic, json.loads(payload)))
        self.changed.set()
        return 1

    async def close_device(self, device: DeviceAddress) -> bool:
        return False

    async def close_user(self, user_id: str) -> int:
        return 0

    def take_over(self, client_id: str, epoch: int) -> None:
        pass

    def resync(self, users: set[str] | None) -> None:
        pass

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(5):
            while len(self.published) < count:
                self.changed.clear()
                await self.changed.wait()


class BrokenStore(SqlStore):
    """A real store whose database 'goes away' for sends."""

    async def save_messages(self, requests: Sequence[SendRequest]) -> list[SendOutcome | ChatError]:
        raise StorageUnavailable("the database is unavailable; nothing was stored")


def send(client_msg_id: str, to_user: str) -> bytes:
    return json.dumps(
        {"type": "send_message", "client_msg_id": client_msg_id, "to_user": to_user, "content": "hi"}
    ).encode()


async def test_each_sender_of_a_failed_batch_gets_its_own_ref(tmp_path: Path) -> None:
    store = BrokenStore.from_url(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    service = ChatService(store, BridgeSettings(), max_payload_bytes=65536)
    recorder = Recorder()
    service.attach(recorder)
    await service.start()
    try:
        alice, bob = DeviceAddress("alice", "phone"), DeviceAddress("bob", "phone")
        service.accept(alice, send("A-1", "bob"))  # both queued before the worker runs: one batch
        service.accept(bob, send("B-1", "alice"))
        await recorder.wait_for(2)
        errors = {topic: event for topic, event in recorder.published}
        assert errors["chat/device/alice/phone"]["ref"] == "A-1"
        assert errors["chat/device/bob/phone"]["ref"] == "B-1"
        assert {e["code"] for e in errors.values()} == {"storage_unavailable"}
    finally:
        await service.stop()
        await store.close()


async def test_a_full_queue_refuses_with_server_busy(tmp_path: Path) -> None:
    store = SqlStore.from_url(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    await store.create_schema()
    service = ChatService(store, BridgeSettings(queue_size=2), max_payload_bytes=65536)
    recorder = Recorder()
    service.attach(recorder)
    alice = DeviceAddress("alice", "phone")
    for i in range(3):  # the worker is not started: nothing drains the queue
        service.accept(alice, send(f"m{i}", "bob"))
    await asyncio.sleep(0.05)
    assert [(t, e["code"], e["ref"]) for t, e in recorder.published] == [
        ("chat/device/alice/phone", "server_busy", "m2")
    ]
    await store.close()


class FailingPublisher(Recorder):
    """A broker whose publish fails for stream topics (acks to devices go through)."""

    def deliver(self, topic: str, payload: bytes, users: frozenset[str] | None = None) -> int:
        if topic.startswith("chat/user/"):
            raise ConnectionError("the broker is gone")
        return super().deliver(topic, payload, users)


async def test_a_stored_message_that_cannot_be_handed_off_counts_as_unpublished(tmp_path: Path) -> None:
    store = SqlStore.from_url(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    await store.create_schema()
    for user in ("alice", "bob"):
        await store.create_user(user, "x")
    metrics = Metrics("n1")
    service = ChatService(store, BridgeSettings(), max_payload_bytes=65536, metrics=metrics)
    publisher = FailingPublisher()
    service.attach(publisher)
    await service.start()
    try:
        service.accept(DeviceAddress("alice", "phone"), send("A-1", "bob"))
        await publisher.wait_for(1)  # the ack went out, then the stream events failed
        await asyncio.sleep(0.05)
    finally:
        await service.stop()
        await store.close()
    samples = {
        s.name: s.value for f in text_string_to_metric_families(metrics.exposition().decode()) for s in f.samples
    }
    assert samples["mqchat_messages_stored_total"] == 1
    assert samples["mqchat_messages_unpublished_total"] == 1
    assert samples["mqchat_send_latency_seconds_count"] == 0  # never handed off
