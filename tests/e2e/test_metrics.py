"""``GET /metrics``: off by default, behind a token or on a listener of its own, and the numbers
a real chat makes."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from mqchat.config import Settings
from mqchat.core import mqtt
from mqchat.runner import RunningServer, run_server
from tests.security.raw import CONNACK_ACCEPTED, connect, raw_client, subscribe
from tests.support.accounts import UNLIMITED, http_client, register
from tests.support.devices import connect_device

TOKEN = "metrics-token-0123456789"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels``."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


def metrics_settings(tmp_path: Path, **overrides: Any) -> Settings:
    return Settings.load(
        None,
        data_dir=tmp_path / "data",
        mqtt={"host": "127.0.0.1", "port": 0, "ws_port": 0},
        http={"host": "127.0.0.1", "port": 0},
        **overrides,
    )


async def scrape(server: RunningServer) -> Samples:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{server.metrics_port}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text)


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, **overrides: Any) -> AsyncIterator[RunningServer]:
    async with run_server(metrics_settings(tmp_path, **overrides)) as server:
        yield server


async def test_metrics_are_off_by_default(server: RunningServer) -> None:
    assert server.metrics_port is None
    async with http_client(server, "anything") as http:
        assert (await http.get("/metrics")).status_code == 404


async def test_metrics_on_the_api_listener_need_the_token(tmp_path: Path) -> None:
    async with serving(tmp_path, metrics={"token": TOKEN}) as server:
        assert server.metrics_port is None
        async with http_client(server) as http:
            assert (await http.get("/metrics")).status_code == 401
        async with http_client(server, TOKEN[:-1] + "x") as http:
            assert (await http.get("/metrics")).status_code == 401
        alice = await register(server, "alice")
        async with http_client(server, alice) as http:  # a user's token is not the metrics token
            assert (await http.get("/metrics")).status_code == 401
        async with http_client(server, TOKEN) as http:
            response = await http.get("/metrics")
        assert response.status_code == 200
        samples = parse(response.text)
        # The failed scrapes are refusals like any other.
        assert value(samples, "mqchat_refusals_total", code="not_authorized", via="http") == 3


async def test_the_metrics_listener_labels_everything_with_the_node(tmp_path: Path) -> None:
    async with serving(tmp_path, metrics={"port": 0}) as unnamed:
        samples = await scrape(unnamed)
        assert {dict(labels)["node"] for _, labels in samples} == {socket.gethostname()}
    async with (
        serving(tmp_path / "a", metrics={"port": 0}, node_id="node-a") as first,
        serving(tmp_path / "b", metrics={"port": 0}, node_id="node-b") as second,
    ):
        alice = await register(first, "alice")
        await register(first, "bob")
        async with http_client(first, alice) as http:
            sent = await http.post("/v1/messages", json={"client_msg_id": "a-1", "to_user": "bob", "content": "x"})
            assert sent.status_code == 200
        one, two = await scrape(first), await scrape(second)
        # Redis health exists from the cluster code's first report on, for that node only.
        assert not any(name == "mqchat_redis_up" for name, _ in one)
        first.services.metrics.redis_checked(False)
        assert value(await scrape(first), "mqchat_redis_up", node="node-a") == 0
        first.services.metrics.redis_checked(True)
        assert value(await scrape(first), "mqchat_redis_up") == 1
        assert not any(name == "mqchat_redis_up" for name, _ in await scrape(second))
    for samples, node in ((one, "node-a"), (two, "node-b")):
        assert {dict(labels)["node"] for _, labels in samples} == {node}
        for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"):
            assert value(samples, name) > 0
        assert value(samples, "mqchat_database_up") == 1
    # Two servers in one process count apart.
    assert value(one, "mqchat_messages_stored_total") == 1
    assert value(two, "mqchat_messages_stored_total") == 0


async def test_a_chat_in_numbers(tmp_path: Path) -> None:
    async with serving(
        tmp_path, metrics={"port": 0}, limits={**UNLIMITED, "max_unacked_deliveries": 10}, bridge={"queue_size": 77}
    ) as server:
        alice, bob = await register(server, "alice"), await register(server, "bob")
        carol = await register(server, "carol")
        async with raw_client(server.mqtt_port or 0) as refused:  # a wrong token: CONNACK 4
            await refused.send(connect("alice:evil", "alice", "not-a-token"))
            assert (await refused.read_packet())[3] == mqtt.NOT_AUTHORIZED
        async with raw_client(server.mqtt_port or 0) as old:  # MQTT 5: CONNACK 1
            await old.send(connect("alice:old", "alice", alice, level=5))
            assert (await old.read_packet())[3] == mqtt.UNACCEPTABLE_PROTOCOL
        async with (
            connect_device(server, "alice", "phone", alice) as phone,
            connect_device(server, "bob", "laptop", bob) as laptop,
        ):
            await phone.next("sync_response")
            await laptop.next("sync_response")
            samples = await scrape(server)
            assert value(samples, "mqchat_connected_devices") == 2
            assert value(samples, "mqchat_mqtt_connections") == 2
            assert value(samples, "mqchat_mqtt_connects_total", code="0", reason="accepted") == 2
            assert value(samples, "mqchat_mqtt_connects_total", code="5", reason="not_authorized") == 1
            assert value(samples, "mqchat_mqtt_connects_total", code="1") == 1

            for i in range(3):
                await phone.send("bob", f"hello {i}", f"m-{i}")
            await laptop.collect("new_message", 3)
            await phone.send("bob", "hello 0", "m-0")  # a retry: a duplicate
            assert (await phone.next("message_ack"))["client_msg_id"] == "m-0"
            await phone.publish(b"{not json")  # refused: invalid_json
            assert (await phone.next("error"))["code"] == "invalid_json"
            await phone.publish({"type": "typing", "to_user": "bob", "state": "started"})
            async with http_client(server, bob) as http:  # one send over HTTP
                sent = await http.post(
                    "/v1/messages", json={"client_msg_id": "h-1", "to_user": "alice", "content": "x"}
                )
                assert sent.status_code == 200
                unknown = await http.post(
                    "/v1/messages", json={"client_msg_id": "h-2", "to_user": "nobody", "content": "x"}
                )
                assert unknown.json()["error"]["code"] == "unknown_recipient"
            async with http_client(server, carol) as http:  # a long-poll waiting, seen while it waits
                polling = asyncio.create_task(http.get("/v1/sync/long-poll", params={"since_seq": 0, "timeout": 10}))
                for _ in range(100):
                    if value(await scrape(server), "mqchat_long_polls_waiting") == 1:
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError("the long-poll never showed as waiting")
                polling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await polling
            await asyncio.sleep(0.2)
            samples = await scrape(server)

        assert value(samples, "mqchat_commands_total", type="send_message") == 6  # 4 over MQTT, 2 over HTTP
        assert value(samples, "mqchat_commands_total", type="typing") == 1
        assert value(samples, "mqchat_messages_stored_total") == 4
        assert value(samples, "mqchat_messages_duplicate_total") == 1
        assert value(samples, "mqchat_messages_unpublished_total") == 0
        assert value(samples, "mqchat_refusals_total", code="invalid_json", via="mqtt") == 1
        assert value(samples, "mqchat_refusals_total", code="unknown_recipient", via="http") == 1
        # Every stored or duplicate send was handed to the broker, each timed once.
        assert value(samples, "mqchat_send_latency_seconds_count") == 5
        assert 0 < value(samples, "mqchat_send_latency_seconds_sum") < 5
        assert value(samples, "mqchat_commit_batch_size_sum") == 6  # h-2 went to the store too, which refused it
        assert value(samples, "mqchat_commit_duration_seconds_count") == value(
            samples, "mqchat_commit_batch_size_count"
        )
        # Each batch is one SQLite transaction, on the loop's thread or the writer's.
        ran = value(samples, "mqchat_send_transactions_total", thread="loop") + value(
            samples, "mqchat_send_transactions_total", thread="writer"
        )
        assert ran == value(samples, "mqchat_commit_batch_size_count")
        assert value(samples, "mqchat_send_transactions_moved_total") >= 0
        assert value(samples, "mqchat_send_queue_capacity") == 77
        assert value(samples, "mqchat_send_queue_depth") == 0

        # A device that stops acknowledging is dropped as a slow reader, and counted.
        async with raw_client(server.mqtt_port or 0) as deaf, http_client(server, bob) as http:
            await deaf.send(connect("alice:deaf", "alice", alice))
            assert await deaf.read_packet() == CONNACK_ACCEPTED
            await deaf.send(subscribe("chat/user/alice"))
            await deaf.next_of(0x90)
            for i in range(12):
                body = {"client_msg_id": f"u-{i}", "to_user": "alice", "content": "unread"}
                assert (await http.post("/v1/messages", json=body)).status_code == 200
            assert await deaf.closed(timeout=10)
        samples = await scrape(server)
        assert value(samples, "mqchat_slow_reader_disconnects_total") == 1
