"""The brokers a bench runs against: mqchat (spawned or running), plain amqtt, Mosquitto.

Each target comes with its ``Dialect`` (credentials, topics, payloads) and the pid
whose CPU and RSS the report reads from ``/proc``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

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


@dataclass
class Target:
    name: str
    host: str
    port: int
    pid: int | None
    dialect: Dialect


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
        settings = Settings.load(opts.config, **_store_overrides(opts, opts.data_dir))
        tokens, group_id = await register(settings, prefix, count, opts.group_size)
        host, port = opts.mqchat_at
        yield Target("mqchat", host, port, opts.mqchat_pid, MqchatDialect(prefix, tokens, group_id, opts.payload))
        return
    data_dir = Path(tempfile.mkdtemp(prefix="mqchat-bench-", dir=opts.work_dir))
    try:
        settings = Settings.load(None, **_store_overrides(opts, data_dir))
        tokens, group_id = await register(settings, prefix, count, opts.group_size)
        port = free_port()
        args = [sys.executable, "-m", "mqchat.cli", "serve", "--data-dir", str(data_dir), "--host", "127.0.0.1"]
        args += ["--mqtt-port", str(port), "--ws-port", "0", "--http-port", "0", "--log-level", "WARNING"]
        if opts.database_url:
            args += ["--database-url", opts.database_url]
        env = dict(os.environ, MQCHAT_EVENT_LOOP="auto" if opts.uvloop else "asyncio")
        # The bench measures capacity, not policy: a few devices sending thousands of
        # messages a second would otherwise meet the per-device send rate limit.
        env.update(MQCHAT_LIMITS__SEND_RATE_PER_SECOND="1000000", MQCHAT_LIMITS__SEND_BURST="1000000")
        proc = _spawn(args, opts.work_dir / "mqchat-server.log", env)
        try:
            await wait_port("127.0.0.1", port, proc)
            yield Target("mqchat", "127.0.0.1", port, proc.pid, MqchatDialect(prefix, tokens, group_id, opts.payload))
        finally:
            await _stop(proc)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def _store_overrides(opts: Options, data_dir: Path | None) -> dict[str, object]:
    overrides: dict[str, object] = {"log_level": "WARNING"}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if opts.database_url:
        overrides["database_url"] = opts.database_url
    if opts.group_size > 1000:
        overrides["bridge"] = {"group_max_members": opts.group_size}
    return overrides


# -------------------------------------------------------------- plain brokers


@contextlib.asynccontextmanager
async def amqtt_target(opts: Options) -> AsyncIterator[Target]:
    """amqtt 0.12 as it ships: anonymous auth, no plugins of ours, no bridge."""
    port = free_port()
    args = [sys.executable, "-m", "mqchat.bench.plain_amqtt", str(port)]
    proc = _spawn(args, opts.work_dir / "amqtt-server.log")
    try:
        await wait_port("127.0.0.1", port, proc)
        yield Target("amqtt", "127.0.0.1", port, proc.pid, PlainDialect(opts.payload))
    finally:
        await _stop(proc)


@contextlib.asynccontextmanager
async def mosquitto_target(opts: Options) -> AsyncIterator[Target]:
    """The Mosquitto that already runs (we never start or stop it)."""
    host, port = opts.mosquitto
    await wait_port(host, port, None, limit_s=5)
    yield Target("mosquitto", host, port, opts.mosquitto_pid or _mosquitto_pid(), PlainDialect(opts.payload))


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
    """CPU seconds and RSS of a process, read from ``/proc`` (Linux)."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self._tick = os.sysconf("SC_CLK_TCK")

    def cpu_seconds(self) -> float | None:
        if self.pid is None:
            return None
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / self._tick

    def rss_bytes(self) -> int | None:
        if self.pid is None:
            return None
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None
