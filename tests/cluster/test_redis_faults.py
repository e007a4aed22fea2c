"""Cluster mode when Redis fails, under continuous traffic across nodes (issue 12).

Redis carries only what can be rebuilt, so while it is gone every send must still be stored and
acked, every node says ``degraded`` (not down), and once it is back every node must deliver live
across nodes again, have caught its devices up on what they missed, and have registered its
devices again (presence). Each test counts every message at the end (``tests/support/traffic.py``)
and prints how long recovery took, from the moment Redis (or the link to it) was back.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest

from mqchat.bridge.cluster import RedisCluster
from mqchat.bridge.storage.schema import head
from mqchat.bridge.tables import METADATA
from mqchat.config import ClusterSettings
from mqchat.core.ids import DeviceAddress
from tests.support import postgres
from tests.support.accounts import UNLIMITED, http_client
from tests.support.cluster import RedisProcess, account, device_on, node, running
from tests.support.devices import Device
from tests.support.processes import ServerProcess
from tests.support.tcpproxy import TcpProxy
from tests.support.traffic import Traffic, count, heads

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.postgres, pytest.mark.timeout(300)]

LIMITS = {f"MQCHAT_LIMITS__{key.upper()}": str(value) for key, value in UNLIMITED.items()}
OUTAGE = 3.0


# ------------------------------------------------------------------ the cluster under test


@dataclass
class Cluster:
    nodes: Sequence[ServerProcess]
    database: str
    traffic: Traffic
    viewer: str
    """A token of a user sharing a group with everyone: it may read everyone's presence."""
    watchers: list[Device]
    """One raw MQTT device per node: it tells a live ``new_message`` from a catch-up page."""
    pinger: str
    """A token of the user who sends the probe messages to the watchers, over HTTP."""
    users: list[str]
    late: tuple[str, bytes]
    """The account of a device that connects while Redis is gone (it must be online after)."""
    leaver: Device
    """A device on the first node that disconnects while Redis is gone (offline after)."""
    leaving: contextlib.AsyncExitStack


@contextlib.asynccontextmanager
async def chat_cluster(nodes: Sequence[ServerProcess], database: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    """Six SDK users spread over the nodes, sending to each other across nodes all the time; a
    watcher device per node; everyone in one group (so presence may be read by anyone)."""
    tokens = [await account(nodes[i % len(nodes)], f"u{i}") for i in range(6)]
    watcher_accounts = [await account(n, f"w{k}") for k, n in enumerate(nodes)]
    pinger, _ = await account(nodes[0], "pinger")
    late = await account(nodes[0], "late")
    leaver_token, leaver_key = await account(nodes[0], "leaver")
    everyone = [f"u{i}" for i in range(6)]
    async with http_client(nodes[0], tokens[0][0]) as http:
        created = await http.post("/v1/groups", json={"name": "all", "members": everyone[1:]})
        assert created.status_code == 201, created.text
        group = created.json()["group_id"]
        others = [f"w{k}" for k in range(len(nodes))] + ["late", "leaver"]
        assert (await http.post("/v1/groups", json={"name": "watchers", "members": others})).status_code == 201
    store_dir = tmp_path / "clients"
    store_dir.mkdir()
    traffic = Traffic.build(nodes, [(f"u{i}", tokens[i][0]) for i in range(6)], group, store_dir)
    async with contextlib.AsyncExitStack() as stack, contextlib.AsyncExitStack() as leaving:
        leaver = await leaving.enter_async_context(device_on(nodes[0], "leaver", "phone", leaver_token, leaver_key))
        watchers = [
            await stack.enter_async_context(device_on(n, f"w{k}", "watch", token, key))
            for k, (n, (token, key)) in enumerate(zip(nodes, watcher_accounts, strict=True))
        ]
        try:
            await traffic.start()
            yield Cluster(nodes, database, traffic, tokens[0][0], watchers, pinger, everyone, late, leaver, leaving)
        finally:
            await traffic.close()


def sender_for(cluster: Cluster, k: int) -> ServerProcess:
    """The node a probe to watcher ``k`` is sent through: another one, so it crosses nodes."""
    return cluster.nodes[(k + 1) % len(cluster.nodes)]


async def send_probe(cluster: Cluster, k: int, client_msg_id: str) -> None:
    async with http_client(sender_for(cluster, k), cluster.pinger) as http:
        body = {"client_msg_id": client_msg_id, "to_user": f"w{k}", "content": client_msg_id}
        answer = await http.post("/v1/messages", json=body)
        assert answer.status_code in (200, 201), answer.text  # stored, Redis or not


async def statuses(nodes: Sequence[ServerProcess]) -> list[str]:
    out = []
    for n in nodes:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{n.http_port}", timeout=5) as http:
            answer = await http.get("/healthz")
            assert answer.status_code == 200, answer.text  # degraded is not down
            out.append(answer.json()["status"])
    return out


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    """Poll ``check`` until true; the monotonic time it first was."""
    try:
        async with asyncio.timeout(timeout):
            while not await check():  # noqa: ASYNC110 - polling another process
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"not within {timeout:g} s: {what} {WRONG[-1:]}") from None
    return time.monotonic()


WRONG: list[str] = []
"""The last wrong answer a poll saw, for the failure message."""


async def presence_right(cluster: Cluster, online: Sequence[str], offline: Sequence[str]) -> bool:
    """Whether every node answers ``online`` for ``online`` and ``offline`` for ``offline``."""
    for n in cluster.nodes:
        async with http_client(n, cluster.viewer) as http:
            for user in [*online, *offline]:
                answer = await http.get(f"/v1/users/{user}/presence")
                assert answer.status_code == 200, answer.text
                if answer.json()["status"] != ("online" if user in online else "offline"):
                    WRONG.append(f"node {n.http_port}: {user} {answer.json()['status']}")
                    return False
    return True


def watcher_users(cluster: Cluster) -> list[str]:
    return [f"w{k}" for k in range(len(cluster.nodes))]


async def probe_until_live(cluster: Cluster, k: int, missed: str, timeout: float = 60) -> tuple[float, str]:
    """Send probes to watcher ``k`` until one arrives as a live ``new_message`` (not inside a
    catch-up page); meanwhile the message it ``missed`` during the outage must arrive too, live or
    in a catch-up page. Returns when the first probe arrived live, and how ``missed`` arrived."""
    watcher = cluster.watchers[k]
    live_at: float | None = None
    missed_how: str | None = None
    try:
        async with asyncio.timeout(timeout):
            while live_at is None or missed_how is None:
                probe = f"probe-{k}-{time.monotonic_ns()}" if live_at is None else None
                if probe is not None:
                    await send_probe(cluster, k, probe)
                for event in await watcher.drain(0.5):
                    if event.get("type") == "new_message":
                        if event["client_msg_id"] == probe and live_at is None:
                            live_at = time.monotonic()
                        if event["client_msg_id"] == missed:
                            missed_how = missed_how or "live"
                    elif event.get("type") == "sync_response" and any(
                        e.get("client_msg_id") == missed for e in event["events"]
                    ):
                        missed_how = missed_how or "catch-up"
    except TimeoutError:
        # Say what was outstanding: a CI run once timed out here and did not say.
        raise AssertionError(
            f"watcher {k} (node {k + 1}) after {timeout:.0f} s: a live probe"
            f" {'arrived' if live_at is not None else 'never arrived'}, the missed message"
            f" {'arrived (' + missed_how + ')' if missed_how is not None else 'never arrived'}"
        ) from None
    return live_at, missed_how


async def baseline_live(cluster: Cluster) -> None:
    """Before the fault: every watcher gets a message sent through another node, live."""
    for k, watcher in enumerate(cluster.watchers):
        await send_probe(cluster, k, f"before-{k}")
        event = await watcher.next("new_message", timeout=15)
        assert event["client_msg_id"] == f"before-{k}", event


async def stream_complete(database: str, user: str) -> bool:
    conn = await asyncpg.connect(database.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        rows = await conn.fetch("SELECT seq FROM stream_events WHERE user_id = $1 ORDER BY seq", user)
        head = await conn.fetchval("SELECT last_seq FROM users WHERE user_id = $1", user)
    finally:
        await conn.close()
    return [r["seq"] for r in rows] == list(range(1, head + 1))


async def outage(
    cluster: Cluster,
    label: str,
    break_it: Callable[[], Awaitable[None]],
    repair: Callable[[], Awaitable[None]],
    cut_off: Sequence[bool],
) -> dict[str, float]:
    """Break Redis (for the nodes marked in ``cut_off``) under traffic for at least ``OUTAGE``
    seconds and until each of them says degraded; repair; check and time the recovery; count."""
    nodes, traffic = cluster.nodes, cluster.traffic
    await baseline_live(cluster)
    await asyncio.sleep(1.0)  # traffic flowing with Redis up
    broken_at = time.monotonic()
    await break_it()
    expected = ["degraded" if off else "ok" for off in cut_off]

    async def degraded_seen() -> bool:
        return await statuses(nodes) == expected

    detected = await wait_for(degraded_seen, 30, f"{label}: nodes degraded")
    for k in range(len(nodes)):  # missed by Redis: must arrive by catch-up at the latest
        await send_probe(cluster, k, f"missed-{k}")
    async with device_on(nodes[0], "late", "phone", *cluster.late):
        await cluster.leaving.aclose()  # the leaver goes while Redis cannot hear it
        await asyncio.sleep(max(0.0, OUTAGE - (time.monotonic() - broken_at)))
        assert await statuses(nodes) == expected
        off = {m.user for m in traffic.members if cut_off[nodes.index(m.node)]}
        acked_during = sum(1 for sent in traffic.acked if sent.at >= broken_at)
        # How long a send took on a node without Redis (each Redis call there waits for its timeout).
        during = [sent.took for sent in traffic.acked if sent.at >= broken_at and sent.sender in off]
        assert during, "nothing acked by a node without Redis"
        assert acked_during > 0, "nothing acked while Redis was gone"
        assert not traffic.refused, traffic.refused[:5]
        await repair()
        back = time.monotonic()

        async def healthy() -> bool:
            return await statuses(nodes) == ["ok"] * len(nodes)

        online = [*cluster.users, *(f"w{k}" for k in range(len(nodes))), "late"]

        async def presence_ok() -> bool:
            return await presence_right(cluster, online, ["leaver"])

        probes, presence_at, ok_at = await asyncio.gather(
            asyncio.gather(*(probe_until_live(cluster, k, f"missed-{k}") for k in range(len(nodes)))),
            wait_for(presence_ok, 60, f"{label}: presence"),
            wait_for(healthy, 60, f"{label}: health ok"),
        )
        await asyncio.sleep(2.0)  # traffic flowing with Redis back
    totals = await final_count(cluster)
    for k in range(len(nodes)):
        assert await stream_complete(cluster.database, f"w{k}")
    # A node that knows Redis is gone must not wait for it on every send: before the fix each send
    # over a silent link took ~4 s (Redis client timeouts), against ~0.05-0.7 s here otherwise.
    assert statistics.median(during) < 2.0, f"sends without Redis took {statistics.median(during):.2f} s (median)"
    times = {
        "degraded_after_s": detected - broken_at,
        "outage_s": back - broken_at,
        "health_ok_after_s": ok_at - back,
        "live_after_s": max(live - back for live, _ in probes),
        "presence_after_s": presence_at - back,
        "acked_during_outage": float(acked_during),
    }
    per_node = ", ".join(f"node {k + 1} {live - back:.2f} s ({how})" for k, (live, how) in enumerate(probes))
    print(
        f"\n[{label}] degraded seen {times['degraded_after_s']:.2f} s after the fault,"
        f" outage {times['outage_s']:.2f} s;"
        f" after repair: /healthz ok in {times['health_ok_after_s']:.2f} s, live across nodes in"
        f" {times['live_after_s']:.2f} s (per watcher: {per_node}; missed message arrived as shown),"
        f" presence right on every node in {times['presence_after_s']:.2f} s;"
        f" acked during the outage {acked_during} (on the nodes without Redis: {len(during)},"
        f" send to ack median {statistics.median(during):.3f} s,"
        f" max {max(during):.3f} s); totals {totals}"
    )
    return times


async def final_count(cluster: Cluster) -> dict[str, int]:
    await cluster.traffic.stop_sending()
    await cluster.traffic.read_up_to(await heads(cluster.database))
    assert not cluster.traffic.refused, cluster.traffic.refused[:5]
    return await count(cluster.database, cluster.traffic)


# ------------------------------------------------------------------------------- the tests


async def test_redis_killed_and_restarted_empty_under_traffic(
    tmp_path: Path, database: str, redis_server: RedisProcess
) -> None:
    servers = [node(tmp_path, f"n{i}", database, redis_server.url, LIMITS) for i in (1, 2, 3)]
    async with running(servers) as nodes, chat_cluster(nodes, database, tmp_path) as cluster:
        await outage(cluster, "redis kill -9, restarted empty", redis_server.kill, redis_server.start, [True] * 3)


@pytest.mark.parametrize("fault", ["cut", "black_hole"])
async def test_one_nodes_redis_link_broken_alone_under_traffic(
    tmp_path: Path, database: str, redis_server: RedisProcess, fault: str
) -> None:
    proxy = TcpProxy(redis_server.port)
    await proxy.start()
    # The probe is what notices a silent link: quicker here than the defaults (5 s, 2 s).
    probe = {"MQCHAT_CLUSTER__PROBE_SECONDS": "1", "MQCHAT_CLUSTER__PROBE_TIMEOUT_SECONDS": "1"}
    servers = [
        node(tmp_path, "n1", database, proxy.url, LIMITS | probe),
        node(tmp_path, "n2", database, redis_server.url, LIMITS),
        node(tmp_path, "n3", database, redis_server.url, LIMITS),
    ]
    try:
        async with running(servers) as nodes, chat_cluster(nodes, database, tmp_path) as cluster:

            async def break_it() -> None:
                if fault == "cut":
                    await proxy.cut()
                else:
                    proxy.black_hole()

            await outage(cluster, f"n1's Redis link: {fault}", break_it, proxy.restore, [True, False, False])
            if fault == "black_hole":
                assert proxy.dropped > 0
    finally:
        await proxy.close()


@pytest.mark.timeout(600)
async def test_three_nodes_started_at_once_on_an_empty_database_ten_times(
    tmp_path: Path, redis_server: RedisProcess
) -> None:
    """The nodes' whole start-up (migrations under the advisory lock, then everything after it)
    racing on an empty database, as a fresh cluster starts; tests/bridge/test_migrations.py races
    ``migrate()`` alone, in one process."""
    tables = [*METADATA.tables, "alembic_version"]
    started: list[float] = []
    for round_ in range(10):
        url, name = await postgres.fresh_database()
        try:
            servers = [node(tmp_path / f"round{round_}", f"r{round_}n{i}", url, redis_server.url) for i in (1, 2, 3)]
            (tmp_path / f"round{round_}").mkdir()
            begun = time.monotonic()
            async with running(servers) as nodes:  # each start waits for /healthz 200
                started.append(time.monotonic() - begun)
                assert await statuses(nodes) == ["ok"] * 3
            conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
            try:
                assert await conn.fetch("SELECT version_num FROM alembic_version") == [(head(),)]
                found = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                assert sorted(r["tablename"] for r in found) == sorted(tables)
            finally:
                await conn.close()
            for n in servers:
                assert "duplicate key" not in n.log(), n.log_tail()
                assert "Traceback" not in n.log(), n.log_tail()
        finally:
            await postgres.drop_database(name)
    print(f"\n[three nodes at once on an empty database] all healthy in {', '.join(f'{s:.2f}' for s in started)} s")


async def test_rejoin_records_held_devices_forgets_those_that_left_and_keeps_epochs_increasing(
    redis_server: RedisProcess,
) -> None:
    """What a node does to Redis after a recovery, against a real Redis, case by case."""
    cluster = RedisCluster(redis_server.url, "n1", ClusterSettings())
    await cluster.start()
    redis = redis_server.client()
    try:
        ann, bob, cat = DeviceAddress("ann", "phone"), DeviceAddress("bob", "laptop"), DeviceAddress("cat", "tab")
        assert (await cluster.register(cat, 7, 10))[0]  # then cat left while Redis could not hear it
        await redis.hset("mqchat:dev:dan", "pc", "n2:99")  # another node's device: none of n1's business
        came, went = await cluster.rejoin({ann: 41, bob: 42})  # Redis lost ann's, never heard of bob's
        assert (came, went) == ({"ann", "bob"}, {"cat"})
        assert [(await cluster.presence(u))[0] for u in ("ann", "bob", "cat", "dan")] == [True, True, False, True]
        assert await cluster.next_epoch() == 43  # a restarted Redis counted from 1: now above every held one
        # A newer connection of ann's phone on another node is not overwritten by the older one here.
        await redis.hset("mqchat:dev:ann", "phone", "n2:100")
        assert await cluster.rejoin({ann: 41, bob: 42}) == (set(), set())
        assert await redis.hget("mqchat:dev:ann", "phone") == b"n2:100"
        # Devices held here are recorded again whatever Redis lost of them, and none is forgotten.
        await redis.hdel("mqchat:dev:bob", "laptop")
        await redis.srem("mqchat:nodedev:n1", "bob\tlaptop")
        assert await cluster.rejoin({bob: 42, DeviceAddress("eve", "phone"): 50}) == ({"bob", "eve"}, set())
        assert await redis.smembers("mqchat:nodedev:n1") == {b"eve\tphone", b"bob\tlaptop"}
    finally:
        await redis.aclose()
        await cluster.stop()


async def test_a_resync_that_could_not_be_published_is_sent_at_the_next_recovery(redis_server: RedisProcess) -> None:
    """After a reconnect a node tells the others which users' events it could not publish
    (``resync``). That message can fail too (a pooled connection from before the outage): it
    must be sent again when Redis answers, not dropped with the list (a CI run lost it once:
    the other node's watcher never got the missed message)."""
    proxy = TcpProxy(redis_server.port)
    await proxy.start()
    n1 = RedisCluster(proxy.url, "n1", ClusterSettings(heartbeat_seconds=0.2))
    n2 = RedisCluster(redis_server.url, "n2", ClusterSettings())
    heard: list[dict[str, object]] = []
    n2.on_control = heard.append
    await n1.start()
    await n2.start()
    try:
        await proxy.cut()
        n1.publish("mqchat:u:bob", [("chat/user/bob", b"{}")], user_id="bob")

        async def n1_degraded() -> bool:
            return not n1.healthy

        async def resync_heard() -> bool:
            return any(m.get("op") == "resync" and "bob" in m.get("users", ()) for m in heard)  # type: ignore[operator]

        await wait_for(n1_degraded, 15, "n1 degraded")
        n1._after_reconnect()  # as if back: its resync goes out on the broken link, and fails
        await asyncio.sleep(0.5)
        assert not [m for m in heard if m.get("op") == "resync"]
        await proxy.restore()
        await wait_for(resync_heard, 15, "n2 hears the resync for bob")
    finally:
        await n1.stop()
        await n2.stop()
        await proxy.close()
