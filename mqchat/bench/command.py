"""The ``mqchat bench`` command line: flags in, a table on stdout, JSON (and a PNG) on disk."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from mqchat.bench.run import CLUSTERS, TARGETS, BenchError, Scenario, plot, raise_fd_limit, run_all, table, write_json
from mqchat.bench.targets import DEFAULT_CLUSTER_DATABASE, Options


def _address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host or "127.0.0.1", int(port)


def add_parser(commands: Any) -> None:
    bench = commands.add_parser(
        "bench",
        help="measure throughput and latency over real MQTT, against mqchat, plain amqtt and Mosquitto",
        description="Starts an mqchat server (or targets a running one), connects N devices over MQTT 3.1.1, "
        "drives QoS 1 traffic and prints delivered msgs/s, latency percentiles, CPU, RSS, lost and duplicates.",
    )
    bench.add_argument("--scenario", choices=("one2one", "group"), default="one2one")
    bench.add_argument("--clients", type=int, default=100, help="connected devices (default 100)")
    bench.add_argument("--rate", type=float, default=1000, help="messages/s in total; 0 = as fast as --window allows")
    bench.add_argument("--duration", type=float, default=10, help="seconds of traffic (default 10)")
    bench.add_argument("--warmup", type=float, default=1, help="first seconds left out of the figures (default 1)")
    bench.add_argument("--window", type=int, default=0, help="most messages in flight (default: 5 s at --rate)")
    bench.add_argument("--drain", type=float, default=15, help="seconds to wait for stragglers (default 15)")
    bench.add_argument("--payload", type=int, default=100, help="payload bytes (default 100)")
    bench.add_argument("--group-size", type=int, default=500, help="members of the group scenario's group")
    bench.add_argument("--group-senders", type=int, default=1, help="members that send in the group scenario")
    bench.add_argument("--connect-concurrency", type=int, default=100, help="CONNECTs in flight (default 100)")
    bench.add_argument("--drop", type=int, default=0, help="extra idle devices that all disconnect half-way")
    bench.add_argument("--targets", default="mqchat,amqtt,mosquitto", help=f"comma list of {', '.join(TARGETS)}")
    bench.add_argument(
        "--database-url",
        help="mqchat's store; a PostgreSQL URL is where each spawned target creates (and drops) a fresh "
        "database (default: SQLite in a temporary data dir; clusterN: " + DEFAULT_CLUSTER_DATABASE + ")",
    )
    bench.add_argument(
        "--via-haproxy",
        action="store_true",
        help="clusterN: devices connect through HAProxy (TCP, leastconn) instead of straight to node i %% N",
    )
    bench.add_argument("--no-uvloop", action="store_true", help="run the spawned mqchat on the stdlib event loop")
    bench.add_argument("--mqchat-at", type=_address, help="HOST:PORT of a running mqchat instead of spawning one")
    bench.add_argument("--data-dir", type=Path, help="with --mqchat-at: its data dir (store and signing secret)")
    bench.add_argument("--config", type=Path, help="with --mqchat-at: its TOML config")
    bench.add_argument("--mqchat-pid", type=int, help="with --mqchat-at: its pid, for CPU and RSS")
    bench.add_argument("--mosquitto", type=_address, default=("127.0.0.1", 1883), help="HOST:PORT (default :1883)")
    bench.add_argument("--mosquitto-pid", type=int, help="default: from /run/mosquitto/mosquitto.pid")
    bench.add_argument("--out", type=Path, default=Path("bench-results"), help="directory for JSON and PNG")


def main(args: argparse.Namespace, argv: list[str]) -> int:
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(targets) - set(TARGETS)
    if unknown or not targets:
        print(f"mqchat bench: unknown target(s) {sorted(unknown)}; choose from {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    limit = raise_fd_limit()
    needed = args.clients + args.drop + 100
    if needed > limit:
        print(f"mqchat bench: {needed} sockets needed but the fd limit is {limit}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    scenario = Scenario(
        kind=args.scenario,
        clients=args.clients,
        rate=args.rate,
        duration=args.duration,
        warmup=min(args.warmup, args.duration / 2),
        window=args.window,
        drain=args.drain,
        concurrency=args.connect_concurrency,
        drop=args.drop,
        group_senders=args.group_senders,
    )
    opts = Options(
        clients=args.clients,
        group_size=args.group_size if args.scenario == "group" else 0,
        payload=args.payload,
        work_dir=args.out,
        database_url=args.database_url,
        mqchat_at=args.mqchat_at,
        data_dir=args.data_dir,
        config=args.config,
        mqchat_pid=args.mqchat_pid,
        mosquitto=args.mosquitto,
        mosquitto_pid=args.mosquitto_pid,
        uvloop=not args.no_uvloop,
        via_haproxy=args.via_haproxy,
    )
    if "mqchat" in targets and any(t in CLUSTERS for t in targets) and not args.database_url:
        print("mqchat bench: mqchat runs on SQLite, the clusters on PostgreSQL: give --database-url", file=sys.stderr)
    try:
        results = asyncio.run(run_all(scenario, opts, targets))
    except BenchError as exc:
        print(f"mqchat bench: {exc}", file=sys.stderr)
        return 1
    stem = f"bench-{args.scenario}-{args.clients}c-{int(args.rate)}r"
    write_json(args.out / f"{stem}.json", scenario, argv, results)
    print(table(results))
    print(f"\nJSON: {args.out / f'{stem}.json'}")
    if plot(results, args.out / f"{stem}.png"):
        print(f"plot: {args.out / f'{stem}.png'}")
    return 0
