"""HAProxy from the shipped ``config/cluster/haproxy.cfg``, on ports the test picked free: the
file reads every port from the environment, so the tests run the very file users run."""

from __future__ import annotations

import asyncio
import csv
import io
import shutil
from collections.abc import Sequence
from pathlib import Path

import httpx

from tests.support.ports import free_port
from tests.support.processes import REPO, ServerProcess
from tests.support.services import service_missing

SHIPPED_CONFIG = REPO / "config" / "cluster" / "haproxy.cfg"
HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")


def haproxy_binary() -> str:
    if HAPROXY is None:
        service_missing("haproxy is not installed (apt-get install haproxy)")
    return HAPROXY


def node_env(nodes: Sequence[ServerProcess]) -> dict[str, str]:
    """The shipped config's variables for node k (1-based) = ``nodes[k - 1]``."""
    env = {}
    for k, server in enumerate(nodes, 1):
        env |= {
            f"MQCHAT_N{k}_MQTT_PORT": str(server.mqtt_port),
            f"MQCHAT_N{k}_WS_PORT": str(server.ws_port),
            f"MQCHAT_N{k}_HTTP_PORT": str(server.http_port),
        }
    return env


class HAProxyProcess:
    """``haproxy -db -f config/cluster/haproxy.cfg`` in front of up to three node processes."""

    def __init__(self, workdir: Path, nodes: Sequence[ServerProcess], config: Path = SHIPPED_CONFIG) -> None:
        assert 1 <= len(nodes) <= 3, "the shipped config has three servers per backend"
        self.binary = haproxy_binary()
        self.config = config
        self.log_path = workdir / "haproxy.log"
        self.mqtt_port, self.ws_port, self.http_port, self.stats_port = (free_port() for _ in range(4))
        self.env = {
            "MQCHAT_LB_HOST": "127.0.0.1",
            "MQCHAT_LB_MQTT_PORT": str(self.mqtt_port),
            "MQCHAT_LB_WS_PORT": str(self.ws_port),
            "MQCHAT_LB_HTTP_PORT": str(self.http_port),
            "MQCHAT_LB_STATS_PORT": str(self.stats_port),
            **node_env(nodes),
        }
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float = 20) -> None:
        """Start and wait until the stats page answers and every node is UP in every backend."""
        workdir = self.log_path.parent
        workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                self.binary, "-db", "-f", str(self.config), stdin=asyncio.subprocess.DEVNULL,
                stdout=log, stderr=log, env=self.env, cwd=workdir,
            )  # fmt: skip
        async with asyncio.timeout(timeout):
            while True:
                if self.proc.returncode is not None:
                    raise AssertionError(f"haproxy exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    rows = await self.servers()
                except httpx.HTTPError:
                    rows = {}
                if rows and all(status == "UP" for status in rows.values()):
                    return
                await asyncio.sleep(0.1)

    async def servers(self) -> dict[tuple[str, str], str]:
        """``(backend, server) -> status`` (``UP``, ``DOWN``, ``UP 1/2`` ...) from the stats CSV;
        only the servers whose node the test gave (others are DOWN for good)."""
        async with httpx.AsyncClient(timeout=3) as http:
            text = (await http.get(f"http://127.0.0.1:{self.stats_port}/stats;csv")).text
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        wanted = {f"n{k}" for k in range(1, 4) if f"MQCHAT_N{k}_MQTT_PORT" in self.env}
        return {(r["pxname"], r["svname"]): r["status"] for r in rows if r["svname"] in wanted}

    async def wait_status(self, server: str, status: str, timeout: float = 30) -> float:
        """Wait until ``server`` has ``status`` in every backend; the seconds it took."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(timeout):
            while True:
                rows = {k: v for k, v in (await self.servers()).items() if k[1] == server}
                if rows and all(v == status for v in rows.values()):
                    return loop.time() - started
                await asyncio.sleep(0.1)

    def watch_status(self, server: str, status: str, timeout: float = 30) -> asyncio.Task[float]:
        """``wait_status`` started now, in the background: the seconds from now to ``status``."""
        return asyncio.create_task(self.wait_status(server, status, timeout))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
