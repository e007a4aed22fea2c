"""The brokers a bench runs against: mqchat (spawned or running), a cluster of mqchat nodes,
plain amqtt, Mosquitto.

Each target comes with its ``Dialect`` (credentials, topics, payloads), the addresses its
devices connect to, and the processes (nodes, redis-server, HAProxy) whose CPU and RSS the
report reads from ``/proc``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

from mqchat.bench.load import Dialect
from mqchat.bridge.composition import build_services
from mqchat.config import Settings

# ------------------------------------------------------------------ dialects


def _pad(prefix: bytes, suffix: bytes, size: int) -> bytes:
    return prefix + b"x" * max(1, size - len(prefix) - len(suffix)) + suffix


def _field(payload: bytes, name: bytes) -> bytes:
    start = payload.find(name)
    if start < 0:
        return b""
    start += len(name)
    return payload[start : payload.find(b'"', start)]


class MqchatDialect:
    """Devices ``{prefix}{i}:d``; sends go to the inbox as ``send_message`` commands."""

    def __init__(self, prefix: str, tokens: list[str], group_id: str | None, payload_size: int) -> None:
        self._prefix = prefix
        self._tokens = tokens
        self._group = group_id
        self._size = payload_size

    def credentials(self, index: int) -> tuple[str, str | None, str | None]:
        user = f"{self._prefix}{index}"
        return f"{user}:d", user, self._tokens[index]

    def subscriptions(self, index: int, *, group: bool) -> list[str]:
        # Group messages arrive on each member's own stream, like 1:1 messages.
        user = f"{self._prefix}{index}"
        return [f"chat/user/{user}", f"chat/device/{user}/d"]

    def send_topic(self, sender: int, recipient: int | None) -> bytes:
        return f"chat/in/{self._prefix}{sender}/d".encode()

    def payload(self, msg_id: bytes, sender: int, recipient: int | None) -> bytes:
        if recipient is None:
            head = b'{"type":"send_group_message","client_msg_id":"%s","group_id":"%s","content":"' % (
                msg_id,
                (self._group or "").encode(),
            )
        else:
            head = b'{"type":"send_message","client_msg_id":"%s","to_user":"%s%d","content":"' % (
                msg_id,
                self._prefix.encode(),
                recipient,
            )
        return _pad(head, b'"}', self._size)

    def classify(self, payload: bytes) -> tuple[str, bytes]:
        if payload.startswith(b'{"type":"new_message"'):
            return "delivery", _field(payload, b'"client_msg_id":"')
        if payload.startswith(b'{"type":"message_ack"'):
            return "ack", _field(payload, b'"client_msg_id":"')
        if payload.startswith(b'{"type":"error"'):
            return "refused", _field(payload, b'"ref":"')
        return "other", b""


class PlainDialect:
    """Anonymous clients ``bench{i}`` on ``bench/u{i}``; the payload starts with the message id."""

    def credentials(self, index: int) -> tuple[str, str | None, str | None]:
        return f"bench{index}", None, None

    def __init__(self, payload_size: int) -> None:
        self._size = payload_size

    def subscriptions(self, index: int, *, group: bool) -> list[str]:
        return [f"bench/u{index}", "bench/group"] if group else [f"bench/u{index}"]

    def send_topic(self, sender: int, recipient: int | None) -> bytes:
        topic = "bench/group" if recipient is None else f"bench/u{recipient}"
        return topic.encode()

    def payload(self, msg_id: bytes, sender: int, recipient: int | None) -> bytes:
        return _pad(msg_id + b"|", b"", self._size)

    def classify(self, payload: bytes) -> tuple[str, bytes]:
        end = payload.find(b"|")
        return ("delivery", payload[:end]) if end > 0 else ("other", b"")


# ------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Process:
    """One process whose CPU and RSS the report reads: ``role`` is ``server`` (an mqchat node or
    a plain broker), ``redis`` or ``proxy``; ``label`` names it in the report (``n1``)."""

    label: str
    pid: int | None
    role: str = "server"


Locate = Callable[[dict[int, int]], Awaitable[dict[int, int]]]
"""Device index -> its local port in, device index -> node index out (behind a load balancer)."""


@dataclass
class Target:
    """Device ``i`` connects to ``addresses[i % len(addresses)]``: one address for a single
    server or a load balancer, one per node when devices go straight to the nodes."""

    name: str
    addresses: list[tuple[str, int]]
    processes: list[Process]
    dialect: Dialect
    nodes: int = 1
    locate: Locate | None = field(default=None, repr=False)
    store: str | None = None
    """mqchat's database dialect (``sqlite``, ``postgresql``); None for a plain broker."""

    def address(self, index: int) -> tuple[str, int]:
        return self.addresses[index % len(self.addresses)]

    async def placement(self, local_ports: dict[int, int]) -> dict[int, int] | None:
        """The node each connected device is on (index -> node index); None with one node."""
        if self.nodes < 2:
            return None
        if self.locate is not None:
            return await self.locate(local_ports)
        return {index: index % len(self.addresses) for index in local_ports}


@dataclass(frozen=True)
class Options:
    clients: int
    group_size: int
    payload: int
    work_dir: Path
    database_url: str | None
    mqchat_at: tuple[str, int] | None
    data_dir: Path | None
    config: Path | None
    mqchat_pid: int | None
    mosquitto: tuple[str, int]
    mosquitto_pid: int | None
    uvloop: bool
    via_haproxy: bool = False


DEFAULT_CLUSTER_DATABASE = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
"""Cluster targets need PostgreSQL: without ``--database-url`` they create their databases here."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_port(host: str, port: int, proc: subprocess.Popen[bytes] | None, limit_s: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while loop.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        return
    raise TimeoutError(f"nothing listens on {host}:{port} after {limit_s} s")


def _spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


async def _stop(proc: subprocess.Popen[bytes], limit_s: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    for _ in range(int(limit_s * 10)):
        if proc.poll() is not None:
            return
        await asyncio.sleep(0.1)
    proc.kill()  # our own child, by pid
    proc.wait()


async def _stop_all(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    await asyncio.gather(*(_stop(proc) for proc in procs))


# ------------------------------------------------------------------ mqchat


async def register(settings: Settings, prefix: str, count: int, group_size: int) -> tuple[list[str], str | None]:
    """Create ``count`` users straight in the store (no argon2), a group, and their tokens."""
    async with build_services(settings) as services:
        await services.store.create_users({f"{prefix}{i}": "!bench" for i in range(count)})
        group_id = None
        if group_size > 1:
            members = [f"{prefix}{i}" for i in range(group_size)]
            group, _ = await services.store.create_group(members[0], "bench", members[1:], group_size)
            group_id = group.group_id
        tokens = [services.tokens.issue(f"{prefix}{i}", 6 * 3600) for i in range(count)]
    return tokens, group_id


@contextlib.asynccontextmanager
async def mqchat_target(opts: Options, count: int) -> AsyncIterator[Target]:
    prefix = f"b{secrets.token_hex(3)}u"
    if opts.mqchat_at is not None:
        settings = Settings.load(opts.config, **_store_overrides(opts, opts.data_dir, opts.database_url))
        tokens, group_id = await register(settings, prefix, count, opts.group_size)
        dialect = MqchatDialect(prefix, tokens, group_id, opts.payload)
        store = _dialect(settings.resolved_database_url())
        yield Target("mqchat", [opts.mqchat_at], [Process("server", opts.mqchat_pid)], dialect, store=store)
        return
    async with contextlib.AsyncExitStack() as stack:
        data_dir = _work_dir(stack, opts, "mqchat")
        database_url = opts.database_url
        if database_url and _is_postgres(database_url):
            database_url = await stack.enter_async_context(fresh_database(database_url))
        settings = Settings.load(None, **_store_overrides(opts, data_dir, database_url))
        tokens, group_id = await register(settings, prefix, count, opts.group_size)
        port = free_port()
        proc = _spawn(_serve_args(data_dir, port, database_url), opts.work_dir / "mqchat-server.log", _serve_env(opts))
        stack.push_async_callback(_stop, proc)
        await wait_port("127.0.0.1", port, proc)
        dialect = MqchatDialect(prefix, tokens, group_id, opts.payload)
        store = _dialect(settings.resolved_database_url())
        yield Target("mqchat", [("127.0.0.1", port)], [Process("server", proc.pid)], dialect, store=store)


@contextlib.asynccontextmanager
async def cluster_target(opts: Options, count: int, nodes: int) -> AsyncIterator[Target]:
    """``nodes`` mqchat nodes on a fresh PostgreSQL database and a redis-server of their own.

    Devices connect straight to the nodes, device ``i`` to node ``i % nodes`` (1:1 pairs
    ``2k``/``2k+1`` are then always on different nodes, group members are spread round-robin),
    or with ``via_haproxy`` through an HAProxy (TCP, leastconn) in front of them."""
    name = f"cluster{nodes}"
    prefix = f"b{secrets.token_hex(3)}u"
    secret = secrets.token_urlsafe(32)  # every node must accept the tokens the bench issues
    async with contextlib.AsyncExitStack() as stack:
        work = _work_dir(stack, opts, name)
        database_url = await stack.enter_async_context(fresh_database(opts.database_url or DEFAULT_CLUSTER_DATABASE))
        redis_url, redis_pid = await stack.enter_async_context(redis_server(work))
        settings = Settings.load(None, **_store_overrides(opts, work / "setup", database_url), auth={"secret": secret})
        tokens, group_id = await register(settings, prefix, count, opts.group_size)
        env = _serve_env(opts) | {"MQCHAT_AUTH__SECRET": secret}
        ports = [(free_port(), free_port() if opts.via_haproxy else 0) for _ in range(nodes)]
        procs = []
        for k, (port, http_port) in enumerate(ports, 1):
            args = _serve_args(work / f"n{k}", port, database_url, http_port)
            args += ["--redis-url", redis_url, "--node-id", f"n{k}"]
            procs.append(_spawn(args, opts.work_dir / f"{name}-n{k}.log", env))
        stack.push_async_callback(_stop_all, procs)
        await asyncio.gather(
            *(wait_port("127.0.0.1", port, proc) for (port, _), proc in zip(ports, procs, strict=True))
        )
        processes = [Process(f"n{k}", proc.pid) for k, proc in enumerate(procs, 1)]
        processes.append(Process("redis", redis_pid, "redis"))
        addresses = [("127.0.0.1", port) for port, _ in ports]
        locate = None
        if opts.via_haproxy:
            proxy = await stack.enter_async_context(haproxy(work, ports, count, opts.work_dir))
            addresses, locate = [proxy.address], proxy.locate
            processes.append(Process("haproxy", proxy.pid, "proxy"))
        dialect = MqchatDialect(prefix, tokens, group_id, opts.payload)
        yield Target(name, addresses, processes, dialect, nodes=nodes, locate=locate, store="postgresql")


def _work_dir(stack: contextlib.AsyncExitStack, opts: Options, name: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=f"mqchat-bench-{name}-", dir=opts.work_dir))
    stack.callback(shutil.rmtree, path, ignore_errors=True)
    return path


def _write(path: Path, content: str) -> Path:
    path.write_text(content)
    return path


def _serve_args(data_dir: Path, port: int, database_url: str | None, http_port: int = 0) -> list[str]:
    args = [sys.executable, "-m", "mqchat.cli", "serve", "--data-dir", str(data_dir), "--host", "127.0.0.1"]
    args += ["--mqtt-port", str(port), "--ws-port", "0", "--http-port", str(http_port), "--log-level", "WARNING"]
    if database_url:
        args += ["--database-url", database_url]
    return args


def _serve_env(opts: Options) -> dict[str, str]:
    env = dict(os.environ, MQCHAT_EVENT_LOOP="auto" if opts.uvloop else "asyncio")
    # The bench measures capacity, not policy: a few devices sending thousands of messages a
    # second would otherwise meet the send rate limits (per device, and per user, which cluster
    # mode still counts in Redis: that round trip per batch is part of what is measured).
    env.update(MQCHAT_LIMITS__SEND_RATE_PER_SECOND="1000000", MQCHAT_LIMITS__SEND_BURST="1000000")
    env.update(MQCHAT_LIMITS__USER_SEND_RATE_PER_SECOND="1000000", MQCHAT_LIMITS__USER_SEND_BURST="1000000")
    env.update(MQCHAT_LIMITS__COMMAND_RATE_PER_SECOND="1000000", MQCHAT_LIMITS__COMMAND_BURST="1000000")
    return env


def _store_overrides(opts: Options, data_dir: Path | None, database_url: str | None) -> dict[str, object]:
    overrides: dict[str, object] = {"log_level": "WARNING"}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if database_url:
        overrides["database_url"] = database_url
    if opts.group_size > 1000:
        overrides["bridge"] = {"group_max_members": opts.group_size}
    return overrides


@contextlib.asynccontextmanager
async def fresh_database(admin_url: str) -> AsyncIterator[str]:
    """A PostgreSQL database of its own for one target: created through ``admin_url`` (any
    database on the server, e.g. ``.../test``), dropped afterwards. Every spawned target starts
    from empty tables, so runs compare alike whatever earlier runs left behind."""
    url = make_url(admin_url)
    if not _is_postgres(admin_url):
        raise ValueError(f"{url.drivername}: cluster targets need PostgreSQL (--database-url postgresql+asyncpg://...)")
    name = f"mqchat_bench_{secrets.token_hex(5)}"
    await _admin(admin_url, f'CREATE DATABASE "{name}"')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        await _admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _is_postgres(url: str) -> bool:
    return _dialect(url) == "postgresql"


def _dialect(url: str) -> str:
    return make_url(url).get_backend_name()


async def _admin(url: str, statement: str) -> None:
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")  # CREATE DATABASE refuses a transaction
    try:
        async with engine.connect() as conn:
            await conn.execute(text(statement))
    finally:
        await engine.dispose()


@contextlib.asynccontextmanager
async def redis_server(work: Path) -> AsyncIterator[tuple[str, int]]:
    """A redis-server of the target's own on a free port, keeping nothing on disk: its URL and pid."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = _spawn([*args, "--dir", str(work)], work / "redis.log")
    try:
        await wait_port("127.0.0.1", port, proc)
        yield f"redis://127.0.0.1:{port}/0", proc.pid
    finally:
        await _stop(proc)


@dataclass(frozen=True)
class Proxy:
    address: tuple[str, int]
    pid: int
    stats_socket: Path

    async def locate(self, local_ports: dict[int, int]) -> dict[int, int]:
        """Which node each device landed on: HAProxy's ``show sess`` lists every session's
        client address and server; the device's local port is the session's source port."""
        reader, writer = await asyncio.open_unix_connection(str(self.stats_socket))
        try:
            writer.write(b"show sess\n")
            await writer.drain()
            listing = (await reader.read()).decode()
        finally:
            writer.close()
        node_by_port = {}
        for match in _SESSION.finditer(listing):
            node_by_port[int(match["port"])] = int(match["server"][1:]) - 1
        return {index: node_by_port[port] for index, port in local_ports.items() if port in node_by_port}


_SESSION = re.compile(r" src=127\.0\.0\.1:(?P<port>\d+) fe=\S+ be=\S+ srv=(?P<server>n\d+) ")


def haproxy_config(port: int, nodes: Sequence[tuple[int, int]], maxconn: int, stats_socket: Path) -> str:
    """MQTT over TCP to the nodes, least connections first, each node checked on ``/healthz``
    when it has an HTTP port (a frozen node is taken out)."""
    servers = []
    for k, (mqtt_port, http_port) in enumerate(nodes, 1):
        check = f" check port {http_port} inter 1s fall 2 rise 2" if http_port else ""
        servers.append(f"    server n{k} 127.0.0.1:{mqtt_port}{check}")
    return "\n".join(
        [
            "global",
            f"    maxconn {maxconn}",
            f"    stats socket {stats_socket} mode 600 level admin",
            "defaults",
            "    mode tcp",
            "    timeout connect 5s",
            "    timeout client 1h",
            "    timeout server 1h",
            "frontend mqtt",
            f"    bind 127.0.0.1:{port} backlog 4096",
            "    default_backend nodes",
            "backend nodes",
            "    balance leastconn",
            "    option httpchk GET /healthz",
            *servers,
            "",
        ]
    )


@contextlib.asynccontextmanager
async def haproxy(work: Path, nodes: Sequence[tuple[int, int]], clients: int, log_dir: Path) -> AsyncIterator[Proxy]:
    """HAProxy (``/usr/sbin/haproxy`` or on ``PATH``) in front of the nodes, in the foreground."""
    binary = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    if binary is None:
        raise FileNotFoundError("haproxy is not installed (apt-get install haproxy)")
    port = free_port()
    stats_socket = (work / "haproxy.sock").resolve()  # HAProxy reads a relative path as host:port
    config = _write(work / "haproxy.cfg", haproxy_config(port, nodes, 2 * clients + 100, stats_socket))
    proc = _spawn([binary, "-db", "-f", str(config)], log_dir / "haproxy.log")
    try:
        await wait_port("127.0.0.1", port, proc)
        yield Proxy(("127.0.0.1", port), proc.pid, stats_socket)
    finally:
        await _stop(proc)


# -------------------------------------------------------------- plain brokers


@contextlib.asynccontextmanager
async def amqtt_target(opts: Options) -> AsyncIterator[Target]:
    """amqtt 0.12 as it ships: anonymous auth, no plugins of ours, no bridge."""
    port = free_port()
    args = [sys.executable, "-m", "mqchat.bench.plain_amqtt", str(port)]
    proc = _spawn(args, opts.work_dir / "amqtt-server.log")
    try:
        await wait_port("127.0.0.1", port, proc)
        yield Target("amqtt", [("127.0.0.1", port)], [Process("server", proc.pid)], PlainDialect(opts.payload))
    finally:
        await _stop(proc)


@contextlib.asynccontextmanager
async def mosquitto_target(opts: Options) -> AsyncIterator[Target]:
    """The Mosquitto that already runs (we never start or stop it)."""
    host, port = opts.mosquitto
    await wait_port(host, port, None, limit_s=5)
    pid = opts.mosquitto_pid or _mosquitto_pid()
    yield Target("mosquitto", [(host, port)], [Process("server", pid)], PlainDialect(opts.payload))


def _mosquitto_pid() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(Path("/run/mosquitto/mosquitto.pid").read_text().strip())
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if comm.read_text().strip() == "mosquitto":
                return int(comm.parent.name)
    return None


# ---------------------------------------------------------------- /proc stats


class ProcStats:
    """CPU seconds and RSS of a target's processes, read from ``/proc`` (Linux)."""

    def __init__(self, processes: Sequence[Process]) -> None:
        self.processes = list(processes)
        self._tick = os.sysconf("SC_CLK_TCK")

    def cpu_seconds(self) -> dict[str, float | None]:
        """utime + stime of each process, by label."""
        return {p.label: self._cpu(p.pid) for p in self.processes}

    def rss_bytes(self, role: str = "server") -> int | None:
        """The summed RSS of the processes in ``role``; None if one of them cannot be read."""
        values = [self._rss(p.pid) for p in self.processes if p.role == role]
        return None if not values or None in values else sum(v for v in values if v is not None)

    def _cpu(self, pid: int | None) -> float | None:
        if pid is None:
            return None
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / self._tick

    @staticmethod
    def _rss(pid: int | None) -> int | None:
        if pid is None:
            return None
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None
