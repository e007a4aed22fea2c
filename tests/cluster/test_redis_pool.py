"""A node's Redis connections under a burst: more concurrent commands than the pool holds wait
for a connection instead of failing (a connect storm after a node dies is such a burst)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mqchat.bridge.cluster import RedisCluster
from mqchat.bridge.redis_client import POOL_SIZE
from mqchat.config import ClusterSettings
from mqchat.core.ids import DeviceAddress
from tests.support.cluster import RedisProcess

pytestmark = [pytest.mark.redis]


async def test_five_times_the_pool_in_concurrent_registrations_all_succeed(tmp_path: Path) -> None:
    server = RedisProcess(tmp_path / "redis")
    await server.start()
    cluster = RedisCluster(server.url, "n1", ClusterSettings())
    try:
        devices = [DeviceAddress(f"user{i}", "phone") for i in range(5 * POOL_SIZE)]
        # Before the pool waited for room, 400 of these 500 raised Degraded (MaxConnectionsError).
        answers = await asyncio.gather(*(cluster.register(d, epoch, 20) for epoch, d in enumerate(devices)))
        assert answers == [(True, 0)] * len(devices)
        client = server.client()
        try:
            assert await client.hlen("mqchat:dev:user7") == 1
        finally:
            await client.aclose()
    finally:
        await cluster.stop()
        await server.kill()
