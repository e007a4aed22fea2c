"""Runs one scenario against each target in turn and reports them side by side.

Phases per target: connect and subscribe every device (connect rate), settle
(idle RSS), drive traffic at the given rate for the given time (progress each
second), drain, then count lost and duplicated messages. A cluster target is
measured per node and per process (nodes, redis-server, HAProxy), and compared
with the single ``mqchat`` node of the same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import resource
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mqchat.bench.load import BenchClient, Recorder, connect_all
from mqchat.bench.targets import (
    Options,
    ProcStats,
    Target,
    amqtt_target,
    cluster_target,
    mosquitto_target,
    mqchat_target,
)

TARGETS = ("mqchat", "amqtt", "mosquitto", "cluster1", "cluster2", "cluster3")
CLUSTERS = ("cluster1", "cluster2", "cluster3")
"""``clusterN``: N mqchat nodes on PostgreSQL and Redis; compared with ``mqchat`` (one node, no Redis)."""
_S = 1_000_000_000


class BenchError(Exception):
    """A run that cannot measure anything (no device could connect): said in one line."""


@dataclass(frozen=True)
class Scenario:
    kind: str  # "one2one" | "group"
    clients: int
    rate: float  # messages per second in total; 0: as fast as `window` in-flight allows
    duration: float
    warmup: float
    window: int
    drain: float
    concurrency: int
    drop: int  # idle extra devices that disconnect at once half-way through
    group_senders: int


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _target(name: str, opts: Options, count: int) -> AbstractAsyncContextManager[Target]:
    if name == "mqchat":
        return mqchat_target(opts, count)
    if name == "amqtt":
        return amqtt_target(opts)
    if name in CLUSTERS:
        return cluster_target(opts, count, nodes=int(name.removeprefix("cluster")))
    return mosquitto_target(opts)


def _pairs(clients: list[BenchClient]) -> list[tuple[BenchClient, int]]:
    """1:1 pairs over the connected devices: 0<->1, 2<->3 ... each sends to its partner."""
    live = [c for c in clients if c.connected]
    pairs = []
    for a, b in zip(live[0::2], live[1::2], strict=False):
        pairs += [(a, b.index), (b, a.index)]
    return pairs


# ------------------------------------------------------------------- driving


@dataclass
class Drive:
    sent: int = 0
    skipped: int = 0
    max_rss: int = 0
    drop_at: int | None = None


async def _drive(
    scenario: Scenario,
    target: Target,
    senders: list[tuple[BenchClient, int | None]],
    recorder: Recorder,
    stats: ProcStats,
    on_half: Callable[[], None],
) -> Drive:
    dialect = target.dialect
    plan = itertools.cycle([(c, dialect.send_topic(c.index, r), r) for c, r in senders])
    state = Drive()
    start = time.perf_counter_ns()
    recorder.window = (start + int(scenario.warmup * _S), start + int(scenario.duration * _S))
    end = start + int(scenario.duration * _S)
    next_report, last = start + _S, (0, 0)
    cap = scenario.window if scenario.window > 0 else max(1000, int(scenario.rate * 5))
    while (now := time.perf_counter_ns()) < end:
        # Open loop at --rate (what the backlog cap refuses is counted, not queued), or
        # closed loop that keeps `cap` messages in flight.
        want = int(scenario.rate * (now - start) / _S) - state.sent - state.skipped if scenario.rate > 0 else cap
        room = max(0, cap - recorder.in_flight())
        count = min(want, room)
        if scenario.rate > 0:
            state.skipped += want - count
        for _ in range(count):
            client, topic, recipient = next(plan)
            if client.connected:
                msg_id = b"%d.%d" % (client.index, client.sent)
                client.publish(topic, msg_id, dialect.payload(msg_id, client.index, recipient))
                state.sent += 1
        if state.drop_at is None and now - start >= (end - start) // 2 and scenario.drop:
            state.drop_at = now
            on_half()
        if now >= next_report:
            last = _progress(now - start, state, recorder, last)
            state.max_rss = max(state.max_rss, stats.rss_bytes() or 0)
            next_report += _S
        await asyncio.sleep(0.002)
    return state


def _progress(elapsed: int, state: Drive, recorder: Recorder, last: tuple[int, int]) -> tuple[int, int]:
    sent, delivered = state.sent, recorder.deliveries
    _log(
        f"  t={elapsed / _S:5.1f}s sent {sent - last[0]:6d}/s delivered {delivered - last[1]:7d}/s "
        f"in flight {recorder.in_flight():6d} skipped {state.skipped}"
    )
    return sent, delivered


async def _drain(recorder: Recorder, seconds: float) -> float:
    start = time.perf_counter()
    for _ in range(int(seconds * 20)):
        if recorder.in_flight() <= 0:
            break
        await asyncio.sleep(0.05)
    return time.perf_counter() - start


# ----------------------------------------------------------------- one target


@contextlib.asynccontextmanager
async def _connected(
    scenario: Scenario, target: Target, recorder: Recorder, result: dict[str, Any]
) -> AsyncIterator[list[BenchClient]]:
    total = scenario.clients + scenario.drop
    group = scenario.kind == "group"
    clients = [BenchClient(i, target.dialect, recorder) for i in range(total)]
    started = time.perf_counter()
    failures = await connect_all(
        clients,
        target.address,
        lambda i: target.dialect.subscriptions(i, group=group and i < scenario.clients),
        concurrency=scenario.concurrency,
        limit_s=60,
        progress=_log,
    )
    elapsed = time.perf_counter() - started
    result.update(connect_seconds=elapsed, connect_rate=(total - len(failures)) / elapsed)
    result.update(connect_failed=len(failures), connect_errors=failures[:5])
    try:
        yield clients
    finally:
        for client in clients:
            client.close()
        await asyncio.sleep(0.5)


async def run_target(name: str, scenario: Scenario, opts: Options) -> dict[str, Any]:
    users = scenario.clients + scenario.drop
    result: dict[str, Any] = {"target": name}
    async with _target(name, opts, users) as target:
        stats = ProcStats(target.processes)
        expected = 1 if scenario.kind == "one2one" else max(1, min(scenario.clients, opts.group_size) - 1)
        recorder = Recorder(expected_per_message=expected)
        where = ", ".join(f"{host}:{port}" for host, port in target.addresses)
        _log(f"[{name}] connecting {users} devices to {where}")
        async with _connected(scenario, target, recorder, result) as clients:
            await asyncio.sleep(2)  # let subscribe-time work (catch-up, retained presence) finish
            result["nodes"], result["store"] = target.nodes, target.store
            await _place(target, clients, recorder, result)
            result["idle_rss_mib"] = (stats.rss_bytes() or 0) / 2**20
            result["idle_rss_kib_per_device"] = (stats.rss_bytes() or 0) / 1024 / max(1, users)
            senders = _senders(scenario, opts, clients)
            if not senders:
                raise BenchError(_nobody_sends(name, where, opts, result))
            droppers = clients[scenario.clients :]
            _log(f"[{name}] traffic: {scenario.kind}, {len(senders)} senders, rate {scenario.rate or 'max'}")
            cpu0, gen0, t0 = stats.cpu_seconds(), time.process_time(), time.perf_counter()
            drive = await _drive(scenario, target, senders, recorder, stats, lambda: _drop(droppers))
            cpu1, gen1, t1 = stats.cpu_seconds(), time.process_time(), time.perf_counter()
            result["drain_seconds"] = await _drain(recorder, scenario.drain)
            result.update(_summary(scenario, recorder, drive, t1 - t0))
            receivers = _receivers(scenario, opts, clients, senders)
            result["receivers_without_delivery"] = sum(1 for i in receivers if not recorder.received.get(i))
            result.update(_cpu(stats, cpu0, cpu1, t1 - t0, drive.sent))
            result["loadavg_1m"] = _loadavg()
            result["generator_cpu_pct"] = 100 * (gen1 - gen0) / (t1 - t0)
            result["server_max_rss_mib"] = max(drive.max_rss, stats.rss_bytes() or 0) / 2**20
    return result


async def _place(target: Target, clients: list[BenchClient], recorder: Recorder, result: dict[str, Any]) -> None:
    """Which node each device is on, so that deliveries between nodes are counted apart."""
    placement = await target.placement({c.index: c.local_port for c in clients if c.connected})
    recorder.node_of = placement
    if placement is not None:
        per_node = [sum(1 for n in placement.values() if n == k) for k in range(target.nodes)]
        result["devices_per_node"] = per_node
        _log(f"[{target.name}] devices per node: {'/'.join(map(str, per_node))}")


def _receivers(
    scenario: Scenario, opts: Options, clients: list[BenchClient], senders: list[tuple[BenchClient, int | None]]
) -> set[int]:
    """The devices that must get deliveries: each 1:1 recipient; in a group, every connected
    member that another member sends to."""
    if scenario.kind == "one2one":
        return {r for _, r in senders if r is not None}
    sending = {c.index for c, _ in senders}
    members = clients[: min(scenario.clients, opts.group_size)]
    return {c.index for c in members if c.connected and sending - {c.index}}


def _cpu(
    stats: ProcStats, before: dict[str, float | None], after: dict[str, float | None], seconds: float, sent: int
) -> dict[str, Any]:
    """CPU of every process over the traffic phase, in % of a core and in us per message sent.

    ``server_*`` sums the servers (every node of a cluster), ``redis_*`` and ``proxy_*`` the
    redis-server and HAProxy; ``cluster_cpu_us_per_msg`` is the nodes plus Redis."""
    used: dict[str, float | None] = {}
    for label, a in before.items():
        b = after.get(label)
        used[label] = None if a is None or b is None else b - a
    out: dict[str, Any] = {}
    by_role: dict[str, list[float | None]] = {}
    for process in stats.processes:
        by_role.setdefault(process.role, []).append(used[process.label])
    for role, values in by_role.items():
        total = None if None in values else sum(v for v in values if v is not None)
        out[f"{role}_cpu_pct"] = None if total is None else 100 * total / seconds
        out[f"{role}_cpu_us_per_msg"] = None if total is None or not sent else 1e6 * total / sent
    servers = [p.label for p in stats.processes if p.role == "server"]
    if len(servers) > 1:
        out["node_cpu_pct"] = {n: _per(used[n], 100 / seconds) for n in servers}
        out["node_cpu_us_per_msg"] = {n: _per(used[n], 1e6 / sent) if sent else None for n in servers}
    server, redis = out.get("server_cpu_us_per_msg"), out.get("redis_cpu_us_per_msg")
    if server is not None and redis is not None:
        out["cluster_cpu_us_per_msg"] = server + redis
    return out


def _per(value: float | None, scale: float) -> float | None:
    return None if value is None else value * scale


def _senders(scenario: Scenario, opts: Options, clients: list[BenchClient]) -> list[tuple[BenchClient, int | None]]:
    active = clients[: scenario.clients]
    if scenario.kind == "group":
        members = active[: opts.group_size]
        return [(c, None) for c in members[: max(1, scenario.group_senders)] if c.connected]
    return [(c, r) for c, r in _pairs(active)]


def _nobody_sends(name: str, where: str, opts: Options, result: dict[str, Any]) -> str:
    errors = result.get("connect_errors") or []
    why = f"the first: {errors[0]}" if errors else "fewer than two devices connected"
    hint = ""
    if opts.mqchat_at:
        # The devices' tokens are signed with the secret found in --data-dir (or --config's).
        hint = "; --data-dir (or --config) must be the running server's, for its signing secret"
    return f"[{name}] no device can send: {result.get('connect_failed', 0)} failed to connect to {where} ({why}){hint}"


def _drop(clients: list[BenchClient]) -> None:
    _log(f"  dropping {len(clients)} devices at once")
    for client in clients:
        client.close(abort=True)


# ------------------------------------------------------------------- summary


def _pct(values: list[int], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))] / 1e6


def _summary(scenario: Scenario, recorder: Recorder, drive: Drive, seconds: float) -> dict[str, Any]:
    window = scenario.duration - scenario.warmup
    e2e = sorted(lat for _, lat in recorder.e2e_ns)
    acks = sorted(recorder.ack_ns)
    pubacks = sorted(recorder.puback_ns)
    out: dict[str, Any] = {
        "sent": drive.sent,
        "send_rate": drive.sent / seconds,
        "skipped_backlog": drive.skipped,
        # Deliveries that arrived inside the window, whenever they were sent: what the
        # broker sustained, not what the generator offered.
        "delivered_per_s": recorder.delivered_in_window / window if window > 0 else None,
        "deliveries": recorder.deliveries,
        "lost": recorder.lost(),
        "duplicated": recorder.duplicates,
        "refused": len(recorder.refused),
        "unexpected_disconnects": recorder.unexpected_disconnects,
        "unknown_deliveries": recorder.unknown,
    }
    for name, values in (("e2e", e2e), ("ack", acks), ("puback", pubacks)):
        for label, q in (("p50", 0.5), ("p99", 0.99), ("p999", 0.999), ("max", 1.0)):
            out[f"{name}_{label}_ms"] = _pct(values, q)
    if drive.drop_at is not None:
        after = sorted(lat for sent, lat in recorder.e2e_ns if drive.drop_at <= sent < drive.drop_at + 3 * _S)
        out["after_drop_p99_ms"] = _pct(after, 0.99)
        out["after_drop_max_ms"] = _pct(after, 1.0)
    if recorder.node_of is not None:
        cross = sorted(recorder.cross_e2e_ns)
        out["cross_node_delivered_per_s"] = recorder.cross_delivered_in_window / window if window > 0 else None
        out["cross_node_e2e_p50_ms"] = _pct(cross, 0.5)
        out["cross_node_e2e_p99_ms"] = _pct(cross, 0.99)
    out["_e2e_sample_ms"] = [lat / 1e6 for lat in e2e[:: max(1, len(e2e) // 2000)]]
    return out


_ROWS: list[tuple[str, str, str]] = [
    ("clients", "devices", "{:.0f}"),
    ("connect_rate", "connect+subscribe /s", "{:.0f}"),
    ("connect_failed", "connects failed", "{:.0f}"),
    ("idle_rss_mib", "idle RSS MiB", "{:.0f}"),
    ("idle_rss_kib_per_device", "idle RSS KiB/device", "{:.1f}"),
    ("send_rate", "sent msgs/s", "{:.0f}"),
    ("delivered_per_s", "delivered msgs/s", "{:.0f}"),
    ("e2e_p50_ms", "e2e p50 ms", "{:.2f}"),
    ("e2e_p99_ms", "e2e p99 ms", "{:.2f}"),
    ("e2e_p999_ms", "e2e p99.9 ms", "{:.2f}"),
    ("e2e_max_ms", "e2e max ms", "{:.1f}"),
    ("ack_p50_ms", "stored-ack p50 ms", "{:.2f}"),
    ("ack_p99_ms", "stored-ack p99 ms", "{:.2f}"),
    ("puback_p50_ms", "PUBACK p50 ms", "{:.2f}"),
    ("puback_p99_ms", "PUBACK p99 ms", "{:.2f}"),
    ("cross_node_delivered_per_s", "cross-node delivered msgs/s", "{:.0f}"),
    ("cross_node_e2e_p50_ms", "cross-node e2e p50 ms", "{:.2f}"),
    ("cross_node_e2e_p99_ms", "cross-node e2e p99 ms", "{:.2f}"),
    ("server_cpu_pct", "server CPU %", "{:.0f}"),
    ("node_cpu_pct", "CPU % per node", "{:.0f}"),
    ("server_cpu_us_per_msg", "server CPU us/msg sent", "{:.0f}"),
    ("node_cpu_us_per_msg", "CPU us/msg per node", "{:.0f}"),
    ("redis_cpu_us_per_msg", "redis-server CPU us/msg", "{:.0f}"),
    ("cluster_cpu_us_per_msg", "nodes+Redis CPU us/msg", "{:.0f}"),
    ("proxy_cpu_us_per_msg", "HAProxy CPU us/msg", "{:.0f}"),
    ("server_max_rss_mib", "server RSS MiB (max)", "{:.0f}"),
    ("generator_cpu_pct", "generator CPU %", "{:.0f}"),
    ("lost", "lost (undelivered after drain)", "{:.0f}"),
    ("duplicated", "duplicated", "{:.0f}"),
    ("receivers_without_delivery", "receivers with no delivery", "{:.0f}"),
    ("refused", "refused (server_busy)", "{:.0f}"),
    ("skipped_backlog", "not sent (backlog cap)", "{:.0f}"),
    ("unexpected_disconnects", "unexpected disconnects", "{:.0f}"),
    ("after_drop_p99_ms", "after drop p99 ms", "{:.1f}"),
    ("after_drop_max_ms", "after drop max ms", "{:.1f}"),
    ("loadavg_1m", "machine load (1 min)", "{:.1f}"),
    ("p99_vs_1_node", "p99 vs 1 node", "{:.2f}"),
    ("cpu_vs_1_node", "nodes+Redis CPU/msg vs 1 node", "{:.2f}"),
    ("redis_adds", "Redis adds (CPU/msg)", "{:+.0%}"),
]


def _cell(value: Any, fmt: str) -> str:
    if isinstance(value, dict):  # per node: "n1/n2/n3"
        return "/".join(_cell(v, fmt) for v in value.values())
    return "-" if value is None else fmt.format(value)


def table(results: list[dict[str, Any]]) -> str:
    names = [r["target"] for r in results]
    # Ratio columns against the plain brokers; the clusters have their own ratio rows.
    ratios = [n for n in names if n not in ("mqchat", *CLUSTERS)] if "mqchat" in names else []
    head = ["metric", *names, *(f"mqchat/{n}" for n in ratios)]
    lines = [head]
    by_name = {r["target"]: r for r in results}
    for key, label, fmt in _ROWS:
        if all(r.get(key) is None for r in results):
            continue
        row = [label, *(_cell(r.get(key), fmt) for r in results)]
        for other in ratios:
            a, b = by_name["mqchat"].get(key), by_name[other].get(key)
            row.append(f"{a / b:.2f}" if isinstance(a, int | float) and isinstance(b, int | float) and b else "-")
        lines.append(row)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths, strict=True)))
        for line in lines
    )


def plot(results: list[dict[str, Any]], path: Path) -> bool:
    """A latency CDF per target; only if matplotlib is installed (it is optional)."""
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        sample = sorted(r.get("_e2e_sample_ms") or [])
        if sample:
            ax.plot(sample, [i / len(sample) for i in range(len(sample))], label=r["target"])
    ax.set_xscale("log")
    ax.set_xlabel("end-to-end latency, ms (log)")
    ax.set_ylabel("fraction of messages")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return True


async def run_all(scenario: Scenario, opts: Options, targets: list[str]) -> list[dict[str, Any]]:
    results = []
    for name in targets:
        result = await run_target(name, scenario, opts)
        result["clients"] = scenario.clients
        results.append(result)
    compare_clusters(results)
    return results


def compare_clusters(results: list[dict[str, Any]]) -> None:
    """Each cluster against the single node (``mqchat``) of the same run and store:
    ``p99_vs_1_node`` (e2e p99 ratio), ``cpu_vs_1_node`` (nodes plus redis-server CPU per
    message over the single node's), and for ``cluster1`` ``redis_adds`` (that ratio minus 1:
    one node with Redis against one node without)."""
    base = next((r for r in results if r["target"] == "mqchat"), None)
    if base is None:
        return
    for result in results:
        if result["target"] not in CLUSTERS:
            continue
        if base.get("store") != result.get("store"):
            stores = f"mqchat ran on {base.get('store')}, the cluster on {result.get('store')}"
            _log(f"[{result['target']}] not compared with one node: {stores} (give --database-url)")
            continue
        result["p99_vs_1_node"] = _ratio(result.get("e2e_p99_ms"), base.get("e2e_p99_ms"))
        result["cpu_vs_1_node"] = _ratio(result.get("cluster_cpu_us_per_msg"), base.get("server_cpu_us_per_msg"))
        if result["target"] == "cluster1" and result["cpu_vs_1_node"] is not None:
            result["redis_adds"] = result["cpu_vs_1_node"] - 1


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, int | float) and isinstance(b, int | float) and b else None


def write_json(path: Path, scenario: Scenario, argv: list[str], results: list[dict[str, Any]]) -> None:
    document = {
        "command": " ".join(["mqchat", "bench", *argv]),
        "scenario": scenario.__dict__,
        "machine": {"cpus": _cpus(), "python": sys.version.split()[0]},
        "results": results,
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


def _cpus() -> int:
    return os.cpu_count() or 0


def _loadavg() -> float | None:
    """Other work on a shared machine takes CPU from the broker: every result says how much."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
