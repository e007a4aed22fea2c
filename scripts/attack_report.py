"""Re-run issue 10's resource attacks against one live ``mqchat serve`` and report its memory.

Usage (from the repository root, with the project's venv)::

    python scripts/attack_report.py               # the sizes of the original report
    python scripts/attack_report.py --scale 0.02  # a smoke run (tests/security/test_attack_report.py)

One ``mqchat serve`` runs on SQLite in a temporary directory, on free ports, with every limit at
its default (only ``auth.registrations_per_ip_per_hour`` is raised: the script registers its 58
users from one address). Each attack runs in turn; for each, the server's RSS (``VmRSS`` of
``/proc/PID/status``) is read just before, sampled every 100 ms while it runs (and during the
settling time after it), and read again ``--settle`` seconds (5) after it ends. Meanwhile an
innocent user (carol) connects afresh about twice a second and sends a message to dave, who
stays connected: the probe times CONNACK, carol's ``message_ack`` and dave's receipt, and
passes if each comes within 2 s. One more probe runs after the settling time.

The floods that feed an attack (the messages a slow reader does not read, the messages to an
offline session, the stream a sync flood reads) are sent by ordinary users within their rate
limits: 1,000 messages per sender user (500 per device, the burst of each bucket), as many
users as the size needs, each keeping at most 16 sends in flight. They are the fuel, not the
attack. A control row comes first: the same 15,000 x 16 KB flood to a device that keeps up (in
a process of its own), so that the flood's own cost can be told from a slow reader's.

It prints Markdown: the summary table, then each probe's details. Imports the raw-socket
helpers of the tests (``tests/security/raw.py``, ``tests/support/``), which use only the
project's own dependencies.
"""

# ruff: noqa: ASYNC109  (helpers take plain timeouts, as the test helpers do)

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `python scripts/attack_report.py` puts scripts/, not the root, on the path

import httpx  # noqa: E402

from mqchat.core import mqtt  # noqa: E402
from mqchat.core.mqtt import Connack, Connect, Publish, Pubrec, Suback, Subscribe, Will  # noqa: E402
from tests.security.raw import stalled_socket, ws_frame, ws_handshake  # noqa: E402
from tests.support.accounts import register  # noqa: E402
from tests.support.processes import ServerProcess  # noqa: E402

MIB = 1024 * 1024
PROBE_LIMIT = 2.0
"""An innocent user's CONNACK, ack and receipt must each come within this many seconds."""
METRICS_TOKEN = "attack-report-metrics-token"
SENDS_PER_DEVICE = 500
"""``limits.send_burst``: what one sender device may send at once."""
DEVICES_PER_SENDER = 2
"""500 x 2 = ``limits.user_send_burst`` (1,000)."""
SEND_WINDOW = 16
QUIET = 5.0
"""Seconds without a byte after which a connection the server should have closed counts as open."""


# ---------------------------------------------------------------- measuring


class RssSampler(threading.Thread):
    """VmRSS of one process every 100 ms, on a thread of its own (the event loop may be busy)."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def rss(self) -> int | None:
        """Bytes now, or None once the process is gone."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        return int(match.group(1)) * 1024 if match else None

    def run(self) -> None:
        while not self._stop.wait(self.interval):
            value = self.rss()
            if value is None:
                return
            with self._lock:
                self.samples.append((time.monotonic(), value))

    def peak(self, since: float, until: float) -> int:
        with self._lock:
            return max((v for t, v in self.samples if since <= t <= until), default=0)

    def stop(self) -> None:
        self._stop.set()


@dataclasses.dataclass
class Probe:
    """One innocent round: carol connects, sends to dave, and dave receives it."""

    started: float
    connack: float | None = None
    ack: float | None = None
    received: float | None = None
    failure: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None and all(
            value is not None and value <= PROBE_LIMIT for value in (self.connack, self.ack, self.received)
        )

    def describe(self) -> str:
        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value * 1000:.0f} ms"

        text = f"CONNACK {ms(self.connack)}, ack {ms(self.ack)}, received {ms(self.received)}"
        return text + (f" ({self.failure})" if self.failure else "")


@dataclasses.dataclass
class Row:
    name: str
    guarded_by: str
    before: int
    peak: int
    after: int
    attacker_got: str
    during: list[Probe]
    after_probe: Probe | None
    seconds: float

    def probes_cell(self) -> str:
        def one(probes: list[Probe]) -> str:
            if not probes:
                return "no probe"
            worst = max(probes, key=lambda p: (not p.ok, p.ack if p.ack is not None else math.inf))
            mark = "ok" if all(p.ok for p in probes) else "**FAIL**"
            ack = "no ack" if worst.ack is None else f"{worst.ack * 1000:.0f} ms"
            return f"{ack} {mark}"

        during = one(self.during) + (f" (worst of {len(self.during)})" if len(self.during) > 1 else "")
        return f"{during} / {one([self.after_probe] if self.after_probe else [])}"


def mib(value: int) -> str:
    return f"{value / MIB:.0f}"


# ---------------------------------------------------------------- an MQTT link


class Link:
    """A raw MQTT client connection (TCP), parsed with the codec as packets arrive."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.parser = mqtt.Parser(server=False)

    @classmethod
    async def open(cls, port: int, timeout: float = 10) -> Link:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def packet(self, timeout: float = 10) -> mqtt.Packet | None:
        """The next packet; None when the server closed the connection."""
        async with asyncio.timeout(timeout):
            while True:
                parsed = self.parser.next()
                if parsed is not None:
                    return parsed
                try:
                    chunk = await self.reader.read(256 * 1024)
                except ConnectionError:
                    return None
                if not chunk:
                    return None
                self.parser.feed(chunk)

    async def connect(self, connect: Connect, timeout: float = 10) -> Connack | None:
        await self.send(connect.encode())
        answer = await self.packet(timeout)
        return answer if isinstance(answer, Connack) else None

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), 2)


@contextlib.asynccontextmanager
async def link(port: int) -> AsyncIterator[Link]:
    opened = await Link.open(port)
    try:
        yield opened
    finally:
        await opened.close()


def command(kind: str, **fields: object) -> bytes:
    return json.dumps({"type": kind, **fields}).encode()


def event(payload: bytes) -> dict[str, object]:
    """An event the server published (JSON, its ``sig`` last); {} for anything else."""
    try:
        parsed = json.loads(payload)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def event_type(payload: bytes) -> str | None:
    kind = event(payload).get("type")
    return kind if isinstance(kind, str) else None


def error_code(payload: bytes) -> str | None:
    code = event(payload).get("code")
    return code if isinstance(code, str) else None


# ---------------------------------------------------------------- the world


@dataclasses.dataclass
class World:
    server: ServerProcess
    tokens: dict[str, str]
    scale: float
    innocent: Innocent | None = None
    sessions: list[int] = dataclasses.field(default_factory=list)
    """The device numbers whose ``clean_session = 0`` CONNECT was accepted."""

    @property
    def port(self) -> int:
        return self.server.mqtt_port

    def n(self, full: int) -> int:
        return max(1, round(full * self.scale))

    async def metrics(self) -> dict[str, float]:
        """The Prometheus samples, without the node label."""
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.server.http_port}", timeout=10) as http:
            text = (await http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})).text
        values = {}
        for line in text.splitlines():
            if line.startswith("mqchat_") and " " in line:
                name, value = line.rsplit(" ", 1)
                values[re.sub(r'node="[^"]*",?', "", name).replace("{}", "")] = float(value)
        return values

    async def slow_reader_closes(self) -> float:
        return sum(v for k, v in (await self.metrics()).items() if k.startswith("mqchat_slow_reader_disconnects"))


def flood_senders(prefix: str, total: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(math.ceil(total / (SENDS_PER_DEVICE * DEVICES_PER_SENDER)))]


async def send_messages(world: World, user: str, device: str, to_user: str, count: int, size: int) -> Counter[str]:
    """``count`` sends of ``size`` characters from ``user:device``, at most ``SEND_WINDOW`` in
    flight; the answers counted by kind (``message_ack`` or the error code)."""
    answers: Counter[str] = Counter()
    window = asyncio.Semaphore(SEND_WINDOW)
    done = asyncio.Event()
    content = "x" * size
    async with link(world.port) as conn:
        connack = await conn.connect(Connect(f"{user}:{device}", True, 60, user, world.tokens[user].encode()))
        if connack is None or connack.return_code != mqtt.ACCEPTED:
            answers[f"CONNACK {connack and connack.return_code}"] = count
            return answers
        await conn.send(Subscribe(1, ((f"chat/device/{user}/{device}", 0),)).encode())

        async def read() -> None:
            while (packet := await conn.packet(timeout=120)) is not None:
                if isinstance(packet, Publish):
                    kind = event_type(packet.payload)
                    if kind == "message_ack" or kind == "error":
                        answers["message_ack" if kind == "message_ack" else error_code(packet.payload) or "error"] += 1
                        window.release()
                        if answers.total() >= count:
                            done.set()
                            return
            answers["connection closed"] += count - answers.total()
            done.set()

        reader = asyncio.create_task(read())
        try:
            for i in range(count):
                await window.acquire()
                if done.is_set():
                    break
                body = command("send_message", client_msg_id=f"{device}-{i}", to_user=to_user, content=content)
                await conn.send(Publish(f"chat/in/{user}/{device}", body, 1, packet_id=i % 65535 + 1).encode())
            await asyncio.wait_for(done.wait(), 300)
        except ConnectionError:
            answers["sender's connection lost"] += count - answers.total()
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError, ConnectionError):
                await reader
    return answers


async def flood(world: World, senders: list[str], to_user: str, total: int, size: int) -> Counter[str]:
    """``total`` messages to ``to_user`` from ``senders`` (two devices each, 500 sends per device)."""
    jobs = []
    left = total
    for user in senders:
        for device in range(DEVICES_PER_SENDER):
            count = min(SENDS_PER_DEVICE, left)
            if count:
                jobs.append(send_messages(world, user, f"f{device}", to_user, count, size))
            left -= count
    answers: Counter[str] = Counter()
    for result in await asyncio.gather(*jobs):
        answers.update(result)
    return answers


def answers_text(answers: Counter[str]) -> str:
    return ", ".join(f"{count:,} {kind}" for kind, count in answers.most_common())


# ---------------------------------------------------------------- the innocent user


class Innocent:
    """dave stays connected to his stream; carol connects afresh for each probe and sends him one."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.arrived: dict[str, float] = {}
        self.waiters: dict[str, asyncio.Future[float]] = {}
        self.dave_payloads = 0
        self.dave_connects = 0
        """dave's connections: more than one means he lost his and live events in the gap."""
        self.forged_seen = 0
        self._dave: asyncio.Task[None] | None = None
        self._count = 0

    async def start(self) -> None:
        ready = asyncio.get_running_loop().create_future()
        self._dave = asyncio.create_task(self._keep_dave(ready))
        await ready

    async def stop(self) -> None:
        if self._dave is not None:
            self._dave.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dave

    async def _keep_dave(self, ready: asyncio.Future[None]) -> None:
        token = self.world.tokens["dave"].encode()
        while True:
            with contextlib.suppress(OSError, TimeoutError, mqtt.MqttError):
                async with link(self.world.port) as conn:
                    if await conn.connect(Connect("dave:laptop", True, 60, "dave", token)) != Connack(False):
                        raise OSError("dave was refused")
                    await conn.send(Subscribe(1, (("chat/user/dave", 0),)).encode())
                    self.dave_connects += 1

                    async def ping() -> None:  # a silent client is closed at 1.5 x its keep-alive
                        while True:
                            await asyncio.sleep(15)
                            await conn.send(mqtt.Pingreq().encode())

                    pinger = asyncio.create_task(ping())
                    try:
                        await self._read_dave(conn, ready)
                    finally:
                        pinger.cancel()
            await asyncio.sleep(0.2)

    async def _read_dave(self, conn: Link, ready: asyncio.Future[None]) -> None:
        while (packet := await conn.packet(timeout=60)) is not None:
            if isinstance(packet, Suback) and not ready.done():
                ready.set_result(None)
            if isinstance(packet, Publish):
                self.dave_payloads += 1
                if b"FORGED" in packet.payload:
                    self.forged_seen += 1
                match = re.search(rb'"client_msg_id":\s*"(probe-\d+)"', packet.payload)
                if match:
                    waiter = self.waiters.get(match.group(1).decode())
                    if waiter is not None and not waiter.done():
                        waiter.set_result(time.monotonic())

    async def probe(self, timeout: float = 30) -> Probe:
        self._count += 1
        msg_id = f"probe-{self._count}"
        started = time.monotonic()
        result = Probe(started)
        arrival: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiters[msg_id] = arrival
        stage = "connect"
        try:
            async with asyncio.timeout(timeout), link(self.world.port) as conn:
                token = self.world.tokens["carol"].encode()
                stage = "CONNACK"
                connack = await conn.connect(Connect("carol:probe", True, 30, "carol", token), timeout=timeout)
                if connack != Connack(False):
                    result.failure = f"CONNACK {connack}"
                    return result
                result.connack = time.monotonic() - started
                stage = "SUBACK"
                await conn.send(Subscribe(1, (("chat/device/carol/probe", 0),)).encode())
                while not isinstance(await conn.packet(timeout), Suback):
                    pass
                stage = "message_ack"
                sent = time.monotonic()
                body = command("send_message", client_msg_id=msg_id, to_user="dave", content="hello")
                await conn.send(Publish("chat/in/carol/probe", body, 1, packet_id=1).encode())
                while True:
                    packet = await conn.packet(timeout)
                    if packet is None:
                        result.failure = "connection closed before the ack"
                        return result
                    answer = event(packet.payload) if isinstance(packet, Publish) else {}
                    if answer.get("type") == "message_ack" and answer.get("client_msg_id") == msg_id:
                        result.ack = time.monotonic() - sent
                        break
                    if answer.get("type") == "error" and answer.get("ref") == msg_id:
                        result.failure = f"answer: error {answer.get('code')}"
                        return result
                stage = "dave's receipt"
                result.received = await arrival - sent
                await conn.send(mqtt.Disconnect().encode())
        except (TimeoutError, OSError, mqtt.MqttError) as exc:
            result.failure = f"{stage}: {type(exc).__name__} after {time.monotonic() - started:.1f} s"
        finally:
            self.waiters.pop(msg_id, None)
        return result

    @contextlib.asynccontextmanager
    async def probing(self) -> AsyncIterator[list[Probe]]:
        """Probes, one after another with 0.5 s between them, until the block ends (and at
        least one, which may finish after the block)."""
        probes: list[Probe] = []
        stopping = asyncio.Event()

        async def loop() -> None:
            while True:
                probes.append(await self.probe())
                if stopping.is_set():
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), 0.5)
                if stopping.is_set():
                    return

        task = asyncio.create_task(loop())
        try:
            yield probes
        finally:
            stopping.set()
            await task


# ---------------------------------------------------------------- the attacks


async def slow_reader(world: World, websocket: bool) -> str:
    """A device subscribes to its stream at QoS 2 and never reads; 15,000 x 16 KB are sent to it."""
    victim = "slowws" if websocket else "slowtcp"
    total = world.n(15_000)
    port = world.server.ws_port if websocket else world.port
    wrap: Callable[[bytes], bytes] = ws_frame if websocket else (lambda data: data)
    async with stalled_socket(port) as (reader, writer):
        if websocket:
            await ws_handshake(reader, writer)
        token = world.tokens[victim].encode()
        writer.write(wrap(Connect(f"{victim}:slow", True, 0, victim, token).encode()))
        writer.write(wrap(Subscribe(1, ((f"chat/user/{victim}", 2), (f"chat/device/{victim}/slow", 2))).encode()))
        await writer.drain()
        await reader.read(64)  # the CONNACK (and perhaps the SUBACK): from now on nothing is read
        closes_before = await world.slow_reader_closes()
        answers = await flood(world, flood_senders(f"{victim}f", total), victim, total, 16_000)
        closes = await world.slow_reader_closes() - closes_before
        # Now read what had reached the socket: the server should have closed it during the flood.
        received, closed = 0, False
        with contextlib.suppress(TimeoutError, ConnectionError):
            while chunk := await asyncio.wait_for(reader.read(1 << 20), QUIET):
                received += len(chunk)
            closed = True
    state = (
        f"closed as a slow reader ({closes:g} slow-reader close)"
        if closed and closes
        else "closed"
        if closed
        else f"**still open** ({QUIET:g} s without data after the flood)"
    )
    return (
        f"{state}; {received / MIB:.1f} MiB had reached its socket ({total:,} x 16 KB sent to it: "
        f"{answers_text(answers)})"
    )


async def read_stream(port: int, user: str, token: str, total: int) -> None:
    """``--read-stream``: a device that keeps up with its stream (QoS 1, each PUBACKed), in a
    process of its own so that the flooding senders cannot slow it down. Prints ``ready`` after
    its SUBACK, then how many ``new_message`` events it received, and whether it was closed."""
    received, closed = 0, False
    async with link(port) as conn:
        await conn.connect(Connect(f"{user}:phone", True, 60, user, token.encode()))
        await conn.send(Subscribe(1, ((f"chat/user/{user}", 1),)).encode())
        while not isinstance(await conn.packet(), Suback):
            pass
        print("ready", flush=True)
        try:
            while received < total:
                packet = await conn.packet(timeout=QUIET)
                if packet is None:
                    raise ConnectionResetError
                if isinstance(packet, Publish):
                    received += event_type(packet.payload) == "new_message"
                    if packet.qos:
                        await conn.send(mqtt.puback(packet.packet_id or 0))
        except ConnectionError:
            closed = True
        except TimeoutError:
            pass
    print(json.dumps({"received": received, "closed": closed}), flush=True)


async def control_flood(world: World) -> str:
    """The same flood to a device that reads and acknowledges: what the flood itself costs."""
    total = world.n(15_000)
    reader = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--read-stream", str(world.port), "reader", str(total),
        env={**os.environ, "ATTACK_REPORT_TOKEN": world.tokens["reader"]}, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert reader.stdout is not None
    if (await asyncio.wait_for(reader.stdout.readline(), 30)).strip() != b"ready":
        return "**the reader did not start**"
    answers = await flood(world, flood_senders("readerf", total), "reader", total, 16_000)
    result = json.loads((await asyncio.wait_for(reader.stdout.read(), 120)) or b"{}")
    await reader.wait()
    lost = "; **the reader's connection was closed**" if result.get("closed") else ""
    return f"received {result.get('received', 0):,} of {total:,} ({answers_text(answers)}){lost}"


async def connacks(world: World, connects: list[Connect], concurrency: int = 8) -> Counter[str]:
    """Send each CONNECT on a connection of its own; count the CONNACK codes."""
    codes: Counter[str] = Counter()
    queue = list(reversed(connects))

    async def worker() -> None:
        while queue:
            connect = queue.pop()
            try:
                async with link(world.port) as conn:
                    answer = await conn.connect(connect)
                    codes["no CONNACK" if answer is None else f"CONNACK 0x{answer.return_code:02x}"] += 1
            except (OSError, TimeoutError) as exc:
                codes[type(exc).__name__] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return codes


async def retained_wills(world: World) -> str:
    """1,000 CONNECTs, each with a retained 60 KB will on a topic of its own choosing."""
    token = world.tokens["willy"].encode()
    connects = [
        Connect("willy:w", True, 30, "willy", token, Will(f"anything/{i}", b"x" * 60_000, 1, True))
        for i in range(world.n(1_000))
    ]
    return answers_text(await connacks(world, connects))


async def retained_inbox(world: World) -> str:
    """One retained QoS 2 PUBLISH of 60 KB on the own inbox from each of 1,500 device ids."""
    token = world.tokens["inboxer"].encode()
    codes: Counter[str] = Counter()
    devices = list(reversed(range(world.n(1_500))))

    async def worker() -> None:
        while devices:
            device = devices.pop()
            async with link(world.port) as conn:
                answer = await conn.connect(Connect(f"inboxer:d{device}", True, 30, "inboxer", token))
                if answer is None or answer.return_code != mqtt.ACCEPTED:
                    codes["no CONNACK" if answer is None else f"CONNACK 0x{answer.return_code:02x}"] += 1
                    continue
                codes["CONNACK 0x00"] += 1
                topic = f"chat/in/inboxer/d{device}"
                await conn.send(Publish(topic, b"x" * 60_000, 2, retain=True, packet_id=1).encode())
                while (packet := await conn.packet()) is not None and not isinstance(packet, Pubrec):
                    pass
                await conn.send(mqtt.Pubrel(1).encode())
                while (packet := await conn.packet()) is not None and not isinstance(packet, mqtt.Pubcomp):
                    pass
                await conn.send(mqtt.Disconnect().encode())

    await asyncio.gather(*(worker() for _ in range(8)))
    # Would a new subscriber get any of it retained? The only retained message is presence.
    retained = 0
    async with link(world.port) as conn:
        await conn.connect(Connect("inboxer:d0", True, 30, "inboxer", token))
        await conn.send(Subscribe(1, (("chat/user/inboxer", 1), ("chat/device/inboxer/d0", 1))).encode())
        with contextlib.suppress(TimeoutError):
            while (packet := await conn.packet(timeout=1)) is not None:
                if isinstance(packet, Publish) and packet.retain:
                    retained += 1
    return f"{answers_text(codes)}; retained messages a new subscriber got: {retained}"


async def offline_sessions(world: World) -> str:
    """3,000 ``clean_session = 0`` sessions of one user, each subscribed, left offline."""
    token = world.tokens["sessioner"].encode()
    codes: Counter[str] = Counter()
    devices = list(reversed(range(world.n(3_000))))

    async def worker() -> None:
        while devices:
            device = devices.pop()
            async with link(world.port) as conn:
                answer = await conn.connect(Connect(f"sessioner:s{device}", False, 30, "sessioner", token))
                if answer is None or answer.return_code != mqtt.ACCEPTED:
                    codes["no CONNACK" if answer is None else f"CONNACK 0x{answer.return_code:02x}"] += 1
                    continue
                codes["CONNACK 0x00"] += 1
                world.sessions.append(device)
                topics = (("chat/user/sessioner", 1), (f"chat/device/sessioner/s{device}", 1))
                await conn.send(Subscribe(1, topics).encode())
                while (packet := await conn.packet()) is not None and not isinstance(packet, Suback):
                    pass
                await conn.send(mqtt.Disconnect().encode())

    await asyncio.gather(*(worker() for _ in range(8)))
    return answers_text(codes)


async def offline_messages(world: World) -> str:
    """500 messages of 1,000 characters to the user whose sessions are offline."""
    count = world.n(500)
    answers = await flood(world, flood_senders("queuer", count), "sessioner", count, 1_000)
    # The newest offline session comes back: what is waiting for it?
    token = world.tokens["sessioner"].encode()
    newest = max(world.sessions, default=0)
    publishes, queued = 0, 0
    async with link(world.port) as conn:
        answer = await conn.connect(Connect(f"sessioner:s{newest}", False, 30, "sessioner", token))
        with contextlib.suppress(TimeoutError):
            while (packet := await conn.packet(timeout=2)) is not None:
                if isinstance(packet, Publish):
                    publishes += 1
                    queued += event_type(packet.payload) == "new_message"
                    if packet.qos:
                        await conn.send(mqtt.puback(packet.packet_id or 0))
        await conn.send(mqtt.Disconnect().encode())
    resumed = (
        "no CONNACK"
        if answer is None
        else f"CONNACK 0x{answer.return_code:02x}, session present {answer.session_present:d}"
    )
    return (
        f"{answers_text(answers)}; a session resuming ({resumed}) got {publishes} PUBLISHes in 2 s, "
        f"{queued} of them queued messages"
    )


async def qos2_unreleased(world: World) -> str:
    """2,000 QoS 2 PUBLISHes of 60 KB on one connection, never PUBRELed. Each waits for its
    PUBREC (so that the count is exact: a reset would discard PUBRECs not yet read)."""
    token = world.tokens["qos2er"].encode()
    total = world.n(2_000)
    pubrecs = 0
    closed = False
    async with link(world.port) as conn:
        await conn.connect(Connect("qos2er:q", True, 30, "qos2er", token))
        try:
            for i in range(total):
                await conn.send(Publish("chat/in/qos2er/q", b"x" * 60_000, 2, packet_id=i % 65535 + 1).encode())
                while not isinstance(packet := await conn.packet(timeout=QUIET), Pubrec):
                    if packet is None:
                        raise ConnectionResetError
                pubrecs += 1
            while await conn.packet(timeout=QUIET) is not None:  # all sent: is it closed now?
                pass
            closed = True
        except ConnectionError:  # closed (a FIN) or reset
            closed = True
        except TimeoutError:
            pass
    state = "closed" if closed else f"**still open** {QUIET:g} s after the last PUBLISH"
    return f"{state}: PUBREC for the first {pubrecs:,} of {total:,}, none released"


async def idle_http(world: World) -> str:
    """1,100 HTTP connections that send nothing."""
    total = world.n(1_100)
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
    refused = 0
    for _ in range(total):
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", world.server.http_port), 5)
            opened.append((reader, writer, time.monotonic()))
        except (OSError, TimeoutError):
            refused += 1
    # While they are open, does the HTTP API answer?
    started = time.monotonic()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{world.server.http_port}", timeout=10) as http:
            status = str((await http.get("/healthz")).status_code)
    except httpx.HTTPError as exc:
        status = type(exc).__name__
    healthz = f"{status} in {(time.monotonic() - started) * 1000:.0f} ms"

    async def outcome(reader: asyncio.StreamReader, since: float) -> tuple[str, float]:
        received = b""
        try:
            async with asyncio.timeout(60):
                while chunk := await reader.read(65536):
                    received += chunk
        except TimeoutError:
            return "still open after 60 s", 60.0
        except ConnectionError:
            pass
        kind = received.split(b"\r\n", 1)[0].decode(errors="replace") if received else "closed without a response"
        return kind, time.monotonic() - since

    results = await asyncio.gather(*(outcome(reader, since) for reader, _, since in opened))
    for _, writer, _ in opened:
        writer.close()
    kinds = Counter(kind for kind, _ in results)
    seconds = [s for kind, s in results if kind == "closed without a response"]
    when = f" after {min(seconds):.1f}-{max(seconds):.1f} s" if seconds else ""
    return f"{answers_text(kinds)}{when}; {refused} not accepted; /healthz while they were open: {healthz}"


async def sync_flood(world: World) -> str:
    """One device sends 2,000 ``sync_messages limit=500`` over a 500-message stream."""
    count = world.n(500)
    await flood(world, flood_senders("streamer", count), "syncer", count, 100)
    token = world.tokens["syncer"].encode()
    total = world.n(2_000)
    answers: Counter[str] = Counter()
    async with link(world.port) as conn:
        await conn.connect(Connect("syncer:a", True, 60, "syncer", token))
        await conn.send(Subscribe(1, (("chat/device/syncer/a", 0),)).encode())
        while not isinstance(await conn.packet(), Suback):
            pass

        async def read() -> None:
            while (packet := await conn.packet(timeout=5)) is not None:
                if isinstance(packet, Publish):
                    kind = event_type(packet.payload)
                    answers[(error_code(packet.payload) or "error") if kind == "error" else (kind or "?")] += 1
            answers["connection closed"] += 1

        reader = asyncio.create_task(read())
        for i in range(total):
            body = command("sync_messages", since_seq=0, limit=500)
            await conn.send(Publish("chat/in/syncer/a", body, 1, packet_id=i % 65535 + 1).encode())
        with contextlib.suppress(TimeoutError):
            await reader  # until 5 s pass without an answer
    return f"{total:,} syncs sent; answers: {answers_text(answers)}"


async def will_forgery(world: World) -> str:
    """CONNECTs with a will on topics the client may not publish to (another user's stream,
    device topic, inbox and presence; its own stream; another device's inbox), with and without
    retain: each must be refused, and nothing must reach dave."""
    token = world.tokens["forger"].encode()
    topics = [
        "chat/user/dave",
        "chat/device/dave/laptop",
        "chat/in/dave/laptop",
        "chat/presence/dave",
        "chat/user/forger",
        "chat/in/forger/other",
    ]
    payload = b'{"type":"new_message","seq":1,"from_user":"carol","content":"FORGED"}'
    connects = [
        Connect("forger:phone", True, 30, "forger", token, Will(topic, payload, 1, retain))
        for _ in range(world.n(10))
        for topic in topics
        for retain in (False, True)
    ]
    assert world.innocent is not None
    seen_before = world.innocent.forged_seen
    codes = await connacks(world, connects, concurrency=4)
    await asyncio.sleep(1)
    forged = world.innocent.forged_seen - seen_before
    return f"{answers_text(codes)}; forged events that reached dave: {forged}"


@dataclasses.dataclass(frozen=True)
class Attack:
    name: str
    original: str
    guarded_by: str
    run: Callable[[World], Awaitable[str]]
    users: Callable[[World], list[str]]


def attacks(scale: float) -> list[Attack]:
    def n(full: int) -> int:
        return max(1, round(full * scale))

    return [
        Attack(
            "control: the same 15,000 x 16 KB to a device that reads",
            "(not measured)",
            "-",
            control_flood,
            lambda w: ["reader", *flood_senders("readerf", n(15_000))],
        ),
        Attack(
            "slow reader, TCP, QoS 2: 15,000 x 16 KB",
            "91 -> 386 MB",
            "tests/security/test_exhaustion.py::test_a_reader_that_never_reads_is_closed_at_the_buffer_limit",
            lambda w: slow_reader(w, websocket=False),
            lambda w: ["slowtcp", *flood_senders("slowtcpf", n(15_000))],
        ),
        Attack(
            "slow reader, WebSocket: 15,000 x 16 KB",
            "91 -> 399 MB",
            "tests/security/test_exhaustion.py::test_a_reader_that_never_reads_is_closed_at_the_buffer_limit",
            lambda w: slow_reader(w, websocket=True),
            lambda w: ["slowws", *flood_senders("slowwsf", n(15_000))],
        ),
        Attack(
            "retained Last Wills on any topic: 1,000 x 60 KB",
            "+78 MB",
            "tests/security/test_wills_and_sessions.py::test_a_retained_will_is_refused_even_on_the_own_inbox",
            retained_wills,
            lambda w: ["willy"],
        ),
        Attack(
            "retained QoS 2 PUBLISH on the own inbox, 1,500 device ids x 60 KB",
            "+112 MB",
            "tests/security/test_wills_and_sessions.py::test_nobody_but_the_server_retains_anything, "
            "tests/security/test_exhaustion.py::test_new_device_ids_per_user_are_bounded",
            retained_inbox,
            lambda w: ["inboxer"],
        ),
        Attack(
            "3,000 offline clean_session=0 sessions (one user)",
            "+74 MB",
            "tests/security/test_wills_and_sessions.py::test_offline_persistent_sessions_are_bounded_per_user_and_expire",
            offline_sessions,
            lambda w: ["sessioner"],
        ),
        Attack(
            "500 messages to those offline sessions",
            "up to 399 MB",
            "tests/security/test_wills_and_sessions.py::test_offline_persistent_sessions_are_bounded_per_user_and_expire",
            offline_messages,
            lambda w: flood_senders("queuer", n(500)),
        ),
        Attack(
            "QoS 2 PUBLISH without PUBREL: 2,000 x 60 KB, one connection",
            "(not measured)",
            "tests/security/test_wills_and_sessions.py::test_qos2_sends_are_handled_once_and_unreleased_ones_are_bounded",
            qos2_unreleased,
            lambda w: ["qos2er"],
        ),
        Attack(
            "1,100 idle HTTP connections",
            "all 1,024 descriptors",
            "tests/security/test_http_limits.py, tests/security/test_fd_exhaustion.py",
            idle_http,
            lambda w: [],
        ),
        Attack(
            "2,000 sync_messages limit=500 over a 500-message stream",
            "other users' CONNACK > 60 s",
            "tests/security/test_exhaustion.py::test_a_sync_flood_is_refused_and_does_not_starve_connects",
            sync_flood,
            lambda w: ["syncer", *flood_senders("streamer", n(500))],
        ),
        Attack(
            "Last Will forgery on others' topics",
            "forged events delivered",
            "tests/security/test_wills_and_sessions.py::test_a_will_on_anyone_elses_topic_refuses_the_connect",
            will_forgery,
            lambda w: ["forger"],
        ),
    ]


# ---------------------------------------------------------------- running


async def register_all(server: ServerProcess, users: list[str]) -> dict[str, str]:
    """Register in small batches: at most 16 password hashes may wait at once."""
    tokens: dict[str, str] = {}
    for start in range(0, len(users), 6):
        batch = users[start : start + 6]
        for user, token in zip(batch, await asyncio.gather(*(register(server, u) for u in batch)), strict=True):
            tokens[user] = token
    return tokens


async def run_attack(world: World, innocent: Innocent, sampler: RssSampler, attack: Attack, settle: float) -> Row:
    before = sampler.rss() or 0
    started = time.monotonic()
    async with innocent.probing() as during:
        try:
            got = await attack.run(world)
        except Exception as exc:  # reported in the table: the run goes on with the next attack
            traceback.print_exc()
            got = f"**the attack script failed: {type(exc).__name__}: {exc}**"
    ended = time.monotonic()
    await asyncio.sleep(max(0.0, settle - (time.monotonic() - ended)))
    after = sampler.rss() or 0
    peak = max(sampler.peak(started, time.monotonic()), before, after)
    after_probe = await innocent.probe()
    return Row(attack.name, attack.guarded_by, before, peak, after, got, during, after_probe, ended - started)


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def log_summary(log: str) -> str:
    """The server log in numbers: its size, tracebacks, and its WARNING lines by what they say."""
    kinds: Counter[str] = Counter()
    for line in log.splitlines():
        if " WARNING " in line or " ERROR " in line:
            text = line.split(" ", 3)[-1]
            kinds[re.sub(r"\d+", "N", re.sub(r"'[^']*'", "'...'", text))[:110]] += 1
    lines = [f"server log: {len(log):,} characters, {log.count('Traceback')} tracebacks"]
    lines += [f"- {count:,} x `{kind}`" for kind, count in kinds.most_common(8)]
    return "\n".join(lines)


def raise_open_file_limit() -> None:
    """1,100 idle HTTP connections need more than the usual soft limit of 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def markdown(rows: list[Row], originals: dict[str, str], header: str) -> str:
    lines = [
        header,
        "",
        "| attack | before MiB | peak MiB | after MiB | before the fixes | what the attacker got "
        "| innocent user's send-to-ack during / after |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.name} | {mib(row.before)} | {mib(row.peak)} | {mib(row.after)} | {originals[row.name]} "
            f"| {row.attacker_got} | {row.probes_cell()} |"
        )
    lines += ["", "Innocent probes (carol connects, sends to dave; times from CONNECT, and from the send):", ""]
    lines += ["| attack | seconds | probes during: worst | after |", "|---|---|---|---|"]
    for row in rows:
        worst = max(row.during, key=lambda p: (not p.ok, p.ack or math.inf, p.received or math.inf), default=None)
        lines.append(
            f"| {row.name} | {row.seconds:.1f} | {worst.describe() if worst else '-'} "
            f"({sum(p.ok for p in row.during)}/{len(row.during)} within {PROBE_LIMIT:g} s) "
            f"| {row.after_probe.describe() if row.after_probe else '-'} |"
        )
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> int:
    raise_open_file_limit()
    chosen = [a for a in attacks(args.scale) if not args.only or any(o in a.name for o in args.only)]
    with tempfile.TemporaryDirectory(prefix="mqchat-attacks-") as tmp:
        data_dir = Path(tmp) / "data"
        env = {
            "MQCHAT_AUTH__REGISTRATIONS_PER_IP_PER_HOUR": "100000",
            "MQCHAT_METRICS__TOKEN": METRICS_TOKEN,
        }
        server = ServerProcess(
            data_dir,
            f"sqlite+aiosqlite:///{data_dir / 'mqchat.db'}",
            env,
            clean_env=True,
            args=["--log-level", "WARNING"],
            log_path=Path(tmp) / "server.log",
        )
        await server.start()
        assert server.proc is not None
        sampler = RssSampler(server.proc.pid)
        sampler.start()
        rows: list[Row] = []
        dave_connects = 0
        try:
            world = World(server, {}, args.scale)
            users = ["carol", "dave"] + [user for attack in chosen for user in attack.users(world)]
            world.tokens = await register_all(server, users)
            innocent = world.innocent = Innocent(world)
            await innocent.start()
            await asyncio.sleep(args.settle)  # let start-up and registration settle
            for attack in chosen:
                print(f"running: {attack.name}", file=sys.stderr, flush=True)
                if server.proc.returncode is not None:
                    rows.append(Row(attack.name, attack.guarded_by, 0, 0, 0, "**server exited**", [], None, 0))
                    continue
                row = await run_attack(world, innocent, sampler, attack, args.settle)
                print(f"  {mib(row.before)} / {mib(row.peak)} / {mib(row.after)} MiB: {row.attacker_got}",
                      file=sys.stderr, flush=True)  # fmt: skip
                rows.append(row)
            await innocent.stop()
            dave_connects = innocent.dave_connects
        finally:
            sampler.stop()
            log = server.log()
            await server.stop()
        originals = {a.name: a.original for a in chosen}
        when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        command_line = "python scripts/attack_report.py" + "".join(f" {a}" for a in sys.argv[1:])
        header = (
            f"`{command_line}` on {when}, commit {commit()}, Python {platform.python_version()}, "
            f"{os.cpu_count()} CPUs, scale {args.scale:g}, settle {args.settle:g} s"
        )
        print(markdown(rows, originals, header))
        print(f"\ndave, the innocent receiver, connected {dave_connects} time(s) (once: he never lost his connection)")
        print(f"\n{log_summary(log)}", flush=True)
        if args.log:
            await asyncio.to_thread(Path(args.log).write_text, log)
    failed = [r for r in rows if "**" in r.attacker_got or not all(p.ok for p in r.during)]
    return 1 if failed and args.strict else 0


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every attack's size (default 1)")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after each attack before 'after' (5)")
    parser.add_argument("--only", action="append", help="run only the attacks whose name contains this")
    parser.add_argument("--log", help="write the server's log here")
    parser.add_argument("--strict", action="store_true", help="exit 1 if an attack or a probe failed")
    parser.add_argument("--read-stream", nargs=3, metavar=("PORT", "USER", "COUNT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    if arguments.read_stream:
        port, user, count = arguments.read_stream
        asyncio.run(read_stream(int(port), user, os.environ["ATTACK_REPORT_TOKEN"], int(count)))
        sys.exit(0)
    sys.exit(asyncio.run(main(arguments)))
