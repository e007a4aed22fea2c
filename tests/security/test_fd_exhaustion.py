"""Out of file descriptors: ``mqchat serve`` under a low ``ulimit -n``, flooded with idle connections.

Issue 10: with the limit reached, asyncio's accept loop logged 634,009 tracebacks in 55 s,
and 1,100 idle HTTP connections locked every new MQTT and HTTP client out. Each test starts
the server in a subprocess whose soft and hard RLIMIT_NOFILE are both low (so that the
server's own raise to the hard limit cannot lift it), on asyncio's loop and on uvloop, which
report accept errors differently.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.security.raw import CONNACK_ACCEPTED, connect, raw_client
from tests.support.processes import ServerProcess

pytestmark = pytest.mark.slow

LIMIT = 256
FD_LINE = "new connections cannot be accepted until some close"
AMQTT_PER_CONNECTION = "amqtt.broker: Failed to initialize client session: No data to decode"


def nofile(soft: int, hard: int) -> Callable[[], None]:
    def limit() -> None:  # runs in the child, before exec
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return limit


class LimitedServer(ServerProcess):
    """``mqchat serve`` on SQLite whose open-file limits are ``soft`` and ``hard``."""

    def __init__(
        self, tmp_path: Path, event_loop: str, soft: int = LIMIT, hard: int = LIMIT, env: dict[str, str] | None = None
    ) -> None:
        data_dir = tmp_path / "data"
        # The MQTT flood must stay idle (not closed and logged by the CONNECT timeout) while it lasts.
        env = {"MQCHAT_EVENT_LOOP": event_loop, "MQCHAT_LIMITS__CONNECT_TIMEOUT_SECONDS": "60", **(env or {})}
        super().__init__(
            data_dir,
            f"sqlite+aiosqlite:///{data_dir / 'mqchat.db'}",
            env,
            log_path=tmp_path / "server.log",
            preexec_fn=nofile(soft, hard),
        )
        self.attempts = 0

    async def mqtt_connects(self, user_id: str, token: str) -> bool:
        self.attempts += 1  # a new device id each time: no takeover of a half-open earlier attempt
        try:
            async with raw_client(self.mqtt_port) as raw:
                await raw.send(connect(f"{user_id}:phone{self.attempts}", user_id, token))
                return await raw.read_packet(timeout=3) == CONNACK_ACCEPTED
        except (OSError, TimeoutError):
            return False

    def log_but_amqtt(self) -> str:
        """The log without amqtt's line for each connection that closes before CONNECT: one per
        flood connection (the broker's to bound, not the accept path's)."""
        return "".join(line for line in self.log().splitlines(keepends=True) if AMQTT_PER_CONNECTION not in line)


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_name(request: pytest.FixtureRequest) -> str:
    if request.param == "uvloop":
        pytest.importorskip("uvloop", reason="uvloop is not installed (pip install 'mqchat[fast]')")
    return str(request.param)


@contextlib.asynccontextmanager
async def started(server: LimitedServer) -> AsyncIterator[LimitedServer]:
    try:
        await server.start()
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def flood(port: int, count: int) -> AsyncIterator[list[asyncio.StreamWriter]]:
    """``count`` connections that send nothing; closed on exit."""
    writers: list[asyncio.StreamWriter] = []
    try:
        for _ in range(count):
            with contextlib.suppress(OSError, TimeoutError):
                _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
                writers.append(writer)
        yield writers
    finally:
        for writer in writers:
            writer.close()


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float) -> bool:
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        if await check():
            return True
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.25)


def open_files_limits(pid: int) -> list[str]:
    """Soft and hard, from /proc/{pid}/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return line.split()[3:5]
    raise AssertionError("no open-files line")


async def test_out_of_descriptors_is_one_log_line_and_clients_get_in_once_the_flood_ends(
    tmp_path: Path, event_loop_name: str
) -> None:
    async with started(LimitedServer(tmp_path, event_loop_name)) as server:
        token = await server.register("alice")
        async with flood(server.mqtt_port, LIMIT + 150):  # MQTT: no cap there, so this exhausts the table
            await asyncio.sleep(4)
            during = server.log()
            assert not await server.mqtt_connects("alice", token)  # really out of descriptors
        assert 1 <= during.count(FD_LINE) <= 2, during[-3000:]
        assert "Traceback" not in during and len(during) < 8_000, len(during)

        assert await eventually(lambda: server.mqtt_connects("alice", token), 20)
        assert await eventually(server.healthy, 10)
        after = server.log_but_amqtt()
        assert "Traceback" not in after and len(after) < 8_000, after[-3000:]


async def test_an_http_flood_leaves_descriptors_for_mqtt(tmp_path: Path, event_loop_name: str) -> None:
    """Each HTTP listener holds at most a quarter of the open-file limit (64 of 256 here)."""
    env = {"MQCHAT_HTTP__HEADER_TIMEOUT_SECONDS": "3"}
    async with started(LimitedServer(tmp_path, event_loop_name, env=env)) as server:
        token = await server.register("alice")
        async with flood(server.http_port, LIMIT + 150) as idle:
            assert len(idle) == LIMIT + 150
            await asyncio.sleep(1)
            assert await server.mqtt_connects("alice", token)
            # The idle ones are closed at the head deadline; HTTP clients get in again.
            assert await eventually(server.healthy, 15)
        log = server.log()
    assert "http listener: at most 64 connections (a quarter of the open-file limit 256)" in log
    assert log.count("refusing new ones with 503") == 1, log[-3000:]
    assert FD_LINE not in log and len(log) < 8_000, len(log)


async def test_serve_raises_its_soft_open_file_limit_to_the_hard_limit(tmp_path: Path) -> None:
    async with started(LimitedServer(tmp_path, "asyncio", soft=300, hard=400)) as server:
        assert server.proc is not None
        assert open_files_limits(server.proc.pid) == ["400", "400"]
        assert "open-file limit: 400 (raised from 300, the hard limit)" in server.log()
