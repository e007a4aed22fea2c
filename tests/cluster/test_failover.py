"""A node of a three-node cluster dies or freezes while ~30 SDK devices chat through HAProxy
(the shipped config/cluster/haproxy.cfg): the devices it held reconnect through HAProxy to the
survivors and catch up, and nothing is lost or doubled (tests/support/sdk_traffic.py counts).

Each test prints its recovery time: from the fault until every device the node held has
received a message sent after the fault (so it is connected to a live node again)."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import postgres
from tests.support.cluster import RedisProcess, node, running
from tests.support.haproxy import HAProxyProcess
from tests.support.processes import ServerProcess
from tests.support.sdk_traffic import (
    SdkDevice,
    Traffic,
    check_counts,
    create_group,
    placement,
    recovery_time,
    register,
    sdk_device,
)

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.postgres, pytest.mark.timeout(420)]

USERS = [f"u{i:02d}" for i in range(28)]
TWO_DEVICES = USERS[:2]
GROUP = USERS[:8]
SEND_INTERVAL = 2.0
"""Seconds between one device's sends: ~15 messages/s for the cluster, a modest chat load on a
machine shared with other test runs."""
RECOVERY_LIMIT = 30.0
"""The issue's goal for now; the aim is 5 s (the numbers go into docs/scaling.md)."""


@dataclass
class Cluster:
    database: str
    redis: RedisProcess
    nodes: Sequence[ServerProcess]
    proxy: HAProxyProcess


@pytest.fixture
async def database() -> AsyncIterator[str]:
    url, name = await postgres.fresh_database()
    try:
        yield url
    finally:
        await postgres.drop_database(name)


@pytest.fixture
async def cluster(tmp_path: Path, database: str) -> AsyncIterator[Cluster]:
    redis_server = RedisProcess(tmp_path / "redis")
    await redis_server.start()
    # All accounts come from one address (the test, through HAProxy).
    env = {"MQCHAT_AUTH__REGISTRATIONS_PER_IP_PER_HOUR": "1000"}
    servers = [node(tmp_path, name, database, redis_server.url, env) for name in ("n1", "n2", "n3")]
    try:
        async with running(servers) as started:
            proxy = HAProxyProcess(tmp_path / "haproxy", started)
            await proxy.start()
            try:
                yield Cluster(database, redis_server, started, proxy)
            finally:
                for server in started:  # a frozen node cannot even die of SIGKILL until continued
                    if server.proc is not None and server.proc.returncode is None:
                        server.signal(signal.SIGCONT)
                await proxy.stop()
    finally:
        await redis_server.kill()


@pytest.fixture
async def traffic(cluster: Cluster, tmp_path: Path) -> AsyncIterator[Traffic]:
    http_url = f"http://127.0.0.1:{cluster.proxy.http_port}"
    tokens = await register(http_url, USERS)
    group = await create_group(http_url, tokens[GROUP[0]], GROUP[1:])
    ports = {"mqtt_port": cluster.proxy.mqtt_port, "http_port": cluster.proxy.http_port, "store_dir": tmp_path}
    devices = [sdk_device(u, "phone", tokens[u], **ports) for u in USERS]
    devices += [sdk_device(u, "laptop", tokens[u], **ports) for u in TWO_DEVICES]
    running_traffic = Traffic(devices, group, set(GROUP), SEND_INTERVAL)
    try:
        await running_traffic.start()
        yield running_traffic
    finally:
        await running_traffic.close()


async def victim_and_its_devices(cluster: Cluster, traffic: Traffic) -> tuple[ServerProcess, list[SdkDevice]]:
    """The node holding the most devices (HAProxy's leastconn spreads them about evenly)."""
    where = await placement(cluster.redis.url, traffic.devices)
    spread = Counter(where.values())
    print(f"devices per node: {dict(sorted(spread.items()))}")
    assert len(spread) == 3, f"HAProxy left a node without devices: {spread}"
    name, _ = spread.most_common(1)[0]
    victim = next(n for n in cluster.nodes if n.args[n.args.index("--node-id") + 1] == name)
    return victim, [d for d, held_by in where.items() if held_by == name]


async def test_a_node_killed_mid_traffic_loses_nothing(cluster: Cluster, traffic: Traffic) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(5)  # traffic flowing everywhere
    victim, stranded = await victim_and_its_devices(cluster, traffic)
    killed_at = loop.time()
    await victim.kill()
    marked_down = cluster.proxy.watch_status(_name(victim), "DOWN")
    recovery = await recovery_time(stranded, killed_at, timeout=120)
    print(f"recovery: {recovery:.1f} s ({len(stranded)} devices were on the killed node)")
    print(f"haproxy marked the killed node DOWN after {await marked_down:.1f} s")
    await asyncio.sleep(5)  # more traffic on the two survivors
    acks = await traffic.stop_sending_and_drain(timeout=120)
    assert traffic.sent == len(acks)
    print(await check_counts(cluster.database, traffic.devices, acks))
    assert recovery < RECOVERY_LIMIT


async def test_a_frozen_node_is_taken_out_and_rejoins_and_nothing_is_lost(cluster: Cluster, traffic: Traffic) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(5)
    victim, stranded = await victim_and_its_devices(cluster, traffic)
    frozen_at = loop.time()
    victim.signal(signal.SIGSTOP)  # sockets stay open; nothing answers
    try:
        print(
            f"haproxy marked the frozen node DOWN after {await cluster.proxy.wait_status(_name(victim), 'DOWN'):.1f} s"
        )
        recovery = await recovery_time(stranded, frozen_at, timeout=120)
        print(f"recovery: {recovery:.1f} s ({len(stranded)} devices were on the frozen node)")
        await asyncio.sleep(5)
        # Still frozen: every send must be stored by the others, whatever the frozen node held.
        acks = await traffic.stop_sending_and_drain(timeout=120)
        assert traffic.sent == len(acks)
    finally:
        victim.signal(signal.SIGCONT)
    marked_up = cluster.proxy.watch_status(_name(victim), "UP", timeout=60)
    healthy = await _healthy_within(victim, 60)
    print(f"after SIGCONT: /healthz 200 after {healthy:.1f} s, haproxy marked it UP after {await marked_up:.1f} s")
    # What the node held when it froze and does after it wakes up must not double anything.
    await asyncio.sleep(3)
    print(await check_counts(cluster.database, traffic.devices, acks))
    assert recovery < RECOVERY_LIMIT


async def _healthy_within(server: ServerProcess, timeout: float) -> float:
    """Seconds until ``/healthz`` answers 200."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(int(timeout / 0.2)):
        if await server.healthy():
            return loop.time() - started
        await asyncio.sleep(0.2)
    raise AssertionError(f"{_name(server)} not healthy {timeout:g} s after SIGCONT:\n{server.log_tail()}")


def _name(server: ServerProcess) -> str:
    return server.args[server.args.index("--node-id") + 1]
