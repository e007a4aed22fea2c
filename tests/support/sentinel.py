"""Redis with a replica and three Sentinels, all the test's own: free ports, nothing on disk.

Each Sentinel rewrites its config file (Sentinel requires a writable one), so every Sentinel
gets its own file in the work directory. ``SentinelSet.ready`` waits until the Sentinels know
the replica and each other: only then can they agree (quorum 2) that the master is down and
elect one of them to promote the replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis.asyncio as redis

from tests.support.cluster import until_answering
from tests.support.ports import free_port
from tests.support.services import service_missing

REDIS_SERVER = shutil.which("redis-server")
SERVICE = "mymaster"


class _Daemon:
    """One redis-server (a data server or a Sentinel) on its own port; killable."""

    def __init__(self, workdir: Path, name: str, port: int) -> None:
        self.workdir = workdir
        self.name = name
        self.port = port
        self.proc: asyncio.subprocess.Process | None = None

    async def spawn(self, args: Sequence[str]) -> None:
        assert REDIS_SERVER is not None
        with (self.workdir / f"{self.name}.log").open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                REDIS_SERVER, *args, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log
            )

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2)

    async def wait_answering(self, timeout: float = 10) -> None:
        def alive() -> None:
            assert self.proc is not None and self.proc.returncode is None, f"{self.name} exited: see its log"

        await until_answering(self.client(), timeout, alive)

    async def kill(self) -> None:
        """SIGKILL: no goodbye to clients, replicas or Sentinels."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


class SentinelSet:
    """A master, one replica (``--replicaof``) and three Sentinels monitoring ``mymaster`` with
    quorum 2, ``down-after-milliseconds 1000`` and ``failover-timeout 5000``."""

    def __init__(self, workdir: Path) -> None:
        if REDIS_SERVER is None:
            service_missing("redis-server is not installed (apt-get install redis-server)")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.master = _Daemon(workdir, "master", free_port())
        self.replica = _Daemon(workdir, "replica", free_port())
        self.sentinels = [_Daemon(workdir, f"sentinel{k}", free_port()) for k in (1, 2, 3)]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def _server_args(self, daemon: _Daemon) -> list[str]:
        return [
            "--port", str(daemon.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.workdir), "--dbfilename", f"{daemon.name}.rdb",
        ]  # fmt: skip

    async def start(self) -> None:
        await self.master.spawn(self._server_args(self.master))
        await self.master.wait_answering()
        await self.replica.spawn([*self._server_args(self.replica), "--replicaof", "127.0.0.1", str(self.master.port)])
        await self.replica.wait_answering()
        for sentinel in self.sentinels:
            config = self.workdir / f"{sentinel.name}.conf"
            config.write_text(
                f"port {sentinel.port}\n"
                "bind 127.0.0.1\n"
                f"dir {self.workdir}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            await sentinel.spawn([str(config), "--sentinel"])
        for sentinel in self.sentinels:
            await sentinel.wait_answering()

    async def ready(self, timeout: float = 60) -> None:
        """Until the replica is in sync and every Sentinel sees it and the two other Sentinels."""
        async with asyncio.timeout(timeout):
            while True:
                if await self._all_ready():
                    return
                await asyncio.sleep(0.2)

    async def _all_ready(self) -> bool:
        replica = self.replica.client()
        try:
            info = await replica.info("replication")
            if info.get("master_link_status") != "up":
                return False
        finally:
            await replica.aclose()
        for sentinel in self.sentinels:
            state = await self.sentinel_state(sentinel)
            if state is None or state["num-other-sentinels"] < 2 or state["num-slaves"] < 1:
                return False
        return True

    async def sentinel_state(self, sentinel: _Daemon) -> dict[str, Any] | None:
        client = sentinel.client()
        try:
            masters: dict[str, dict[str, Any]] = await client.sentinel_masters()
            return masters.get(SERVICE)
        finally:
            await client.aclose()

    async def master_named_by_sentinels(self) -> int | None:
        """The master's port, if every living Sentinel names the same one."""
        ports = set()
        for sentinel in self.sentinels:
            if sentinel.proc is None or sentinel.proc.returncode is not None:
                continue
            with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                state = await self.sentinel_state(sentinel)
                ports.add(None if state is None else int(state["port"]))
        return ports.pop() if len(ports) == 1 else None

    async def wait_promoted(self, timeout: float = 60) -> None:
        """Until the Sentinels name the replica as master and it accepts writes."""
        client = self.replica.client()
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if await self.master_named_by_sentinels() == self.replica.port:
                        info = await client.info("replication")
                        if info.get("role") == "master":
                            return
                    await asyncio.sleep(0.1)
        finally:
            await client.aclose()

    async def demote_master(self) -> None:
        """``SENTINEL FAILOVER``: the replica is promoted and the old master, alive, is turned
        into its replica (Sentinel then closes the old master's client connections)."""
        client = self.sentinels[0].client()
        try:
            await client.execute_command("SENTINEL", "FAILOVER", SERVICE)
        finally:
            await client.aclose()

    def daemon_on(self, port: int) -> _Daemon:
        return next(d for d in (self.master, self.replica, *self.sentinels) if d.port == port)

    async def kill_all(self) -> None:
        for daemon in (*self.sentinels, self.replica, self.master):
            await daemon.kill()
