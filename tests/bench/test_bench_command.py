"""``mqchat bench`` end to end, small: it runs, writes JSON, and counts every message once.

No speed is asserted: the figures live in docs/performance.md, not in tests.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mqchat.bench.run import compare_clusters, table
from tests.support import postgres
from tests.support.cluster import REDIS_SERVER
from tests.support.processes import ServerProcess
from tests.support.services import service_missing

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("targets", ["mqchat,amqtt"])
def test_bench_delivers_every_message_exactly_once(tmp_path: Path, targets: str) -> None:
    args = ["--targets", targets, "--clients", "6", "--rate", "60", "--duration", "2", "--drain", "10"]
    done = subprocess.run(
        [sys.executable, "-m", "mqchat.cli", "bench", *args, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "delivered msgs/s" in done.stdout and "mqchat/amqtt" in done.stdout
    [report] = tmp_path.glob("bench-*.json")
    results = {r["target"]: r for r in json.loads(report.read_text())["results"]}
    assert set(results) == {"mqchat", "amqtt"}
    for result in results.values():
        assert result["connect_failed"] == 0
        assert result["sent"] > 0
        assert result["lost"] == 0
        assert result["duplicated"] == 0
        assert result["deliveries"] == result["sent"]
    assert results["mqchat"]["ack_p50_ms"] is not None  # every send got its stored-ack


CLUSTER_ROWS = (
    "cross-node delivered msgs/s",
    "cross-node e2e p99 ms",
    "CPU us/msg per node",
    "redis-server CPU us/msg",
    "nodes+Redis CPU us/msg",
    "p99 vs 1 node",
    "nodes+Redis CPU/msg vs 1 node",
    "receivers with no delivery",
)


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.timeout(240)
def test_bench_against_two_nodes_delivers_every_message_across_nodes(tmp_path: Path) -> None:
    """Devices on alternate nodes, so every 1:1 delivery crosses from one node to the other
    through Redis; the single node on the same PostgreSQL is the comparison."""
    if REDIS_SERVER is None:
        service_missing("redis-server is not installed (apt-get install redis-server)")
    asyncio.run(postgres.require_server())
    args = ["--targets", "mqchat,cluster2", "--clients", "20", "--rate", "100", "--duration", "2", "--drain", "10"]
    args += ["--database-url", postgres.PG_URL, "--out", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-m", "mqchat.cli", "bench", *args], capture_output=True, text=True, timeout=200, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = done.stdout
    for row in CLUSTER_ROWS:
        assert row in report, f"{row!r} missing from:\n{report}"
    [path] = tmp_path.glob("bench-*.json")
    results = {r["target"]: r for r in json.loads(path.read_text())["results"]}
    cluster = results["cluster2"]
    for result in results.values():
        assert result["connect_failed"] == 0
        assert result["sent"] > 0
        assert (result["lost"], result["duplicated"]) == (0, 0)
        assert result["deliveries"] == result["sent"]
        assert result["receivers_without_delivery"] == 0  # every device got deliveries
        assert result["store"] == "postgresql"
    assert cluster["devices_per_node"] == [10, 10]
    assert cluster["cross_node_delivered_per_s"] == cluster["delivered_per_s"] > 0
    assert set(cluster["node_cpu_us_per_msg"]) == {"n1", "n2"}
    assert cluster["redis_cpu_us_per_msg"] is not None
    assert cluster["cluster_cpu_us_per_msg"] > cluster["server_cpu_us_per_msg"]
    assert cluster["p99_vs_1_node"] is not None and cluster["cpu_vs_1_node"] is not None
    assert "cross_node_delivered_per_s" not in results["mqchat"]


def test_redis_adds_compares_one_node_with_redis_against_one_without() -> None:
    results = [
        {"target": "mqchat", "store": "postgresql", "server_cpu_us_per_msg": 400.0, "e2e_p99_ms": 10.0},
        {"target": "cluster1", "store": "postgresql", "cluster_cpu_us_per_msg": 500.0, "e2e_p99_ms": 12.0},
        {"target": "cluster3", "store": "sqlite", "cluster_cpu_us_per_msg": 900.0, "e2e_p99_ms": 30.0},
    ]
    compare_clusters(results)
    assert results[1]["redis_adds"] == pytest.approx(0.25)
    assert results[1]["p99_vs_1_node"] == pytest.approx(1.2)
    assert "p99_vs_1_node" not in results[2]  # not on the same store: not compared
    assert "+25%" in table(results).splitlines()[-1]


async def test_bench_against_a_server_whose_secret_it_lacks_says_why_in_one_line(tmp_path: Path) -> None:
    """``--mqchat-at`` with another server's ``--data-dir``: every CONNECT is refused. The bench
    says so and what to give it, not a traceback."""
    async with ServerProcess(tmp_path / "server", args=["--log-level", "WARNING"]) as server:
        args = ["--mqchat-at", f"127.0.0.1:{server.mqtt_port}", "--data-dir", str(tmp_path / "elsewhere")]
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "mqchat.cli", "bench", *args, "--clients", "4", "--duration", "1"],
            capture_output=True,
            text=True,
            timeout=110,
            check=False,
        )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "no device can send: 4 failed to connect" in done.stderr
    assert "--data-dir (or --config) must be the running server's" in done.stderr
