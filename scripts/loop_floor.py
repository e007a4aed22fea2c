"""The floor under mqchat's CPU per message: the same wake-ups and syscalls, no chat.

A message through mqchat at everyday rates costs the server three socket reads (the command and
two PUBACKs), two socket writes (the sender's PUBACK with its ``message_ack``, the recipient's
delivery) and one durable commit. This script does exactly that with nothing else: an asyncio
server on uvloop relays fixed-size frames between 1,000 connections from a generator process and,
per message, optionally makes a commit durable first (``--store fsync``: about nine 4 KiB pages
written and one ``fdatasync``, what a 1:1 send writes to SQLite's WAL; ``--store sqlite``: a
two-row insert in a WAL database with ``synchronous=FULL``; ``--store schema``: the statements
a real 1:1 send runs, mqchat's own SQL, on a database made by mqchat's migrations with the
connection settings of ``mqchat serve``). It prints the server's CPU per message, so
docs/performance.md can say how far mqchat is above what Python and this machine allow.

    python scripts/loop_floor.py --rate 200 --store none
    python scripts/loop_floor.py --rate 200 --store schema
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import multiprocessing.queues
import os
import random
import sqlite3
import tempfile
import time
from typing import ClassVar, cast

import uvloop
from sqlalchemy import create_engine

from mqchat.bench.targets import Process, ProcStats
from mqchat.bridge.storage.database import prepare_sqlite_connection
from mqchat.bridge.storage.dialect import INSERT_EVENTS_SQL, UPDATE_HEAD_SQL
from mqchat.bridge.storage.schema import migrate
from mqchat.bridge.storage.sqlite_sends import _EXISTING, _INSERT_MESSAGE

FRAME = 64
COMMAND, DELIVERY, ACK, PUBACK = b"C", b"D", b"K", b"P"


def cpu_seconds(pid: int) -> float:
    seconds = ProcStats([Process("server", pid)]).cpu_seconds()["server"]
    assert seconds is not None, "the server's /proc/PID/stat cannot be read"
    return seconds


class Store:
    """One durable commit per message, as the send path makes before it answers."""

    def __init__(self, kind: str, where: str, users: int) -> None:
        self.kind = kind
        if kind == "fsync":
            self.page, self.offset = b"x" * 4096, 0
            self.fd = os.open(os.path.join(where, "wal"), os.O_RDWR | os.O_CREAT)
            os.pwrite(self.fd, b"\0" * (64 << 20), 0)
            os.fsync(self.fd)
        if kind == "sqlite":
            self.db = sqlite3.connect(os.path.join(where, "floor.db"), isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("CREATE TABLE m (id INTEGER PRIMARY KEY, body BLOB)")
            self.db.execute("CREATE TABLE s (user INTEGER, seq INTEGER, m INTEGER, PRIMARY KEY (user, seq))")
            self.seq = 0

        if kind == "schema":
            path = os.path.join(where, "mqchat.db")
            with create_engine(f"sqlite:///{path}").connect() as conn:
                migrate(conn)
            self.db = sqlite3.connect(path)
            prepare_sqlite_connection(self.db)  # as mqchat's connections: WAL, FULL, foreign keys, cache
            self.db.executemany(
                "INSERT INTO users (user_id, password_hash, last_seq, created_at) VALUES (?, 'x', 0, '2026-11-30')",
                [(f"u{i}",) for i in range(users)],
            )

    def commit(self, body: bytes, sender: int, recipient: int) -> None:
        if self.kind == "fsync":
            for _ in range(9):
                os.pwrite(self.fd, self.page, self.offset)
                self.offset = (self.offset + 4096) % (64 << 20)
            os.fdatasync(self.fd)
        elif self.kind == "sqlite":
            self.seq += 1
            self.db.execute("BEGIN IMMEDIATE")
            mid = self.db.execute("INSERT INTO m (body) VALUES (?)", (body,)).lastrowid
            self.db.executemany("INSERT INTO s VALUES (?, ?, ?)", [(sender, self.seq, mid), (recipient, self.seq, mid)])
            self.db.execute("COMMIT")
        elif self.kind == "schema":
            self.send(f"u{sender}", f"u{recipient}", body)

    def send(self, sender: str, recipient: str, body: bytes) -> None:
        """What ``RawSendSql`` runs for one 1:1 send, in its order, with its statements."""
        db, key = self.db, os.urandom(8).hex()
        db.execute("BEGIN IMMEDIATE")
        query = "SELECT user_id, last_seq, deleted_at_ms FROM users WHERE user_id IN (?, ?) ORDER BY user_id"
        heads = {user: head for user, head, _ in db.execute(query, (sender, recipient)).fetchall()}
        assert not db.execute(_EXISTING, (json.dumps([[sender, key]]),)).fetchall()
        (last,) = db.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()
        mid, now = last + 1, "2026-11-30 12:00:00.000000"
        seqs = {user: heads[user] + 1 for user in (sender, recipient)}
        db.execute(
            _INSERT_MESSAGE,
            (mid, sender, key, recipient, None, body.hex(), "text", seqs[sender], now, None, None, None),
        )
        rows = [
            (user, seqs[user], "new_message", mid, f"user:{other}", None, 0)
            for user, other in ((sender, recipient), (recipient, sender))
        ]
        db.executemany(INSERT_EVENTS_SQL, rows)
        db.executemany(UPDATE_HEAD_SQL, [(seqs[user], user) for user in seqs])
        db.execute("COMMIT")


class Framed(asyncio.Protocol):
    """Fixed-size frames in both directions (asyncio and uvloop set TCP_NODELAY themselves)."""

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= FRAME:
            frame, self.buffer = self.buffer[:FRAME], self.buffer[FRAME:]
            self.handle(frame)

    def handle(self, frame: bytes) -> None:
        raise NotImplementedError


class Relay(Framed):
    peers: ClassVar[dict[int, Relay]] = {}  # device number -> its connection

    def __init__(self, store: Store) -> None:
        super().__init__()
        self.store = store

    def handle(self, frame: bytes) -> None:
        kind, who = frame[:1], int.from_bytes(frame[1:3], "big")
        if kind == b"H":
            Relay.peers[who] = self
        elif kind == COMMAND:
            recipient = int.from_bytes(frame[3:5], "big")
            self.store.commit(frame, who, recipient)
            assert self.transport is not None
            self.transport.write(ACK + frame[1:])
            target = Relay.peers[recipient].transport
            assert target is not None
            target.write(DELIVERY + frame[1:])


def serve(port: int, store_kind: str, users: int, bound: multiprocessing.queues.Queue[int]) -> None:
    uvloop.install()

    async def main() -> None:
        with tempfile.TemporaryDirectory() as where:
            store = Store(store_kind, where, users)
            server = await asyncio.get_running_loop().create_server(lambda: Relay(store), "127.0.0.1", port)
            bound.put(server.sockets[0].getsockname()[1])
            await server.serve_forever()

    asyncio.run(main())


class Device(Framed):
    def __init__(self, me: int) -> None:
        super().__init__()
        self.me = me
        self.delivered = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        cast(asyncio.Transport, transport).write(b"H" + self.me.to_bytes(2, "big") + bytes(FRAME - 3))

    def handle(self, frame: bytes) -> None:
        if frame[:1] == DELIVERY:
            self.delivered += 1
        assert self.transport is not None
        self.transport.write(PUBACK + frame[1:])


async def drive(port: int, clients: int, rate: float, duration: float, server_pid: int) -> tuple[float, int]:
    loop = asyncio.get_running_loop()
    devices = [Device(i) for i in range(clients)]
    for device in devices:
        await loop.create_connection(lambda d=device: d, "127.0.0.1", port)  # type: ignore[misc]
    await asyncio.sleep(1)
    start_cpu, start, sent = cpu_seconds(server_pid), time.monotonic(), 0
    while (now := time.monotonic()) - start < duration:
        while sent < (now - start) * rate:
            sender, recipient = random.sample(range(clients), 2)
            head = COMMAND + sender.to_bytes(2, "big") + recipient.to_bytes(2, "big")
            transport = devices[sender].transport
            assert transport is not None
            transport.write(head + bytes(FRAME - len(head)))
            sent += 1
        await asyncio.sleep(0.001)
    await asyncio.sleep(1)
    delivered = sum(device.delivered for device in devices)
    assert delivered == sent, (delivered, sent)
    return cpu_seconds(server_pid) - start_cpu, sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--store", choices=["none", "fsync", "sqlite", "schema"], default="none")
    parser.add_argument("--port", type=int, default=0, help="the server's port (default: a free one)")
    args = parser.parse_args()
    bound: multiprocessing.queues.Queue[int] = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve, args=(args.port, args.store, args.clients, bound), daemon=True)
    server.start()
    port = bound.get(timeout=60)
    assert server.pid is not None
    uvloop.install()
    cpu, sent = asyncio.run(drive(port, args.clients, args.rate, args.duration, server.pid))
    print(
        f"store={args.store} rate={args.rate:g} sent={sent} server CPU {100 * cpu / args.duration:.1f} % "
        f"= {cpu / sent * 1e6:.0f} us per message"
    )
    server.terminate()


if __name__ == "__main__":
    main()
