"""``mqchat serve`` as a subprocess, as a user runs it.

Tests whose server must crash, be killed, restart, run under other resource limits or
whose clients cut their connections use it rather than the in-process server.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

import httpx

from tests.support import accounts
from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
PORT_IN_USE = 2
"""The exit code of ``mqchat serve`` when a port it was given is taken."""


class ServerProcess:
    """``mqchat serve`` on ports picked free, restartable on the same ports and data.

    - ``database_url``: None for the default SQLite file inside ``data_dir``;
    - ``env``: added to this process's environment; with ``clean_env`` the server gets none of
      this process's ``MQCHAT_*`` variables (it runs on its defaults and ``env``);
    - ``args``: more ``mqchat serve`` flags (``--log-level WARNING``);
    - stderr, and stdout unless ``stdout_path`` is given, are appended to ``log_path``
      (default: ``server.log`` next to ``data_dir``), across restarts;
    - ``preexec_fn`` runs in the child before ``exec`` (resource limits).

    Also an async context manager: started on entry, killed on exit.
    """

    def __init__(
        self,
        data_dir: Path,
        database_url: str | None = None,
        env: dict[str, str] | None = None,
        *,
        clean_env: bool = False,
        args: Sequence[str] = (),
        log_path: Path | None = None,
        stdout_path: Path | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.database_url = database_url
        inherited = {k: v for k, v in os.environ.items() if not (clean_env and k.startswith("MQCHAT_"))}
        self.env = {**inherited, **(env or {})}
        self.args = tuple(args)
        self.log_path = log_path or data_dir.parent / "server.log"
        self.stdout_path = stdout_path
        self.preexec_fn = preexec_fn
        self.mqtt_port, self.ws_port, self.http_port = free_port(), free_port(), free_port()
        self.proc: asyncio.subprocess.Process | None = None
        self.up = False
        """Started once: from then on the ports are fixed (clients know them)."""

    async def start(self, timeout: float = 30) -> None:
        """Start (or restart, on the same ports) and wait until healthy. A port taken by
        someone else between ``free_port()`` and the bind makes the first start pick new ports;
        a restart waits for its ports instead."""
        for _ in range(20):
            logged = len(self.log())
            await self._spawn()
            if await self._healthy(timeout):
                self.up = True
                return
            assert self.proc is not None
            if self.proc.returncode != PORT_IN_USE or "already in use" not in self.log()[logged:]:
                raise AssertionError(f"mqchat serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            if not self.up:
                self.mqtt_port, self.ws_port, self.http_port = free_port(), free_port(), free_port()
            await asyncio.sleep(0.25)
        raise AssertionError(f"mqchat serve could not get its ports:\n{self.log_tail()}")

    async def _spawn(self) -> None:
        command = [
            sys.executable, "-m", "mqchat.cli", "serve", "--host", "127.0.0.1",
            "--mqtt-port", str(self.mqtt_port), "--ws-port", str(self.ws_port),
            "--http-port", str(self.http_port), "--data-dir", str(self.data_dir),
            *(["--database-url", self.database_url] if self.database_url is not None else []),
            *self.args,
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            stdout = self.stdout_path.open("ab") if self.stdout_path is not None else log
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *command, stdin=asyncio.subprocess.DEVNULL, stdout=stdout, stderr=log,
                    cwd=REPO, env=self.env, preexec_fn=self.preexec_fn,
                )  # fmt: skip
            finally:
                if stdout is not log:
                    stdout.close()

    async def _healthy(self, timeout: float) -> bool:
        """True once ``/healthz`` answers 200; False if the server exits first."""
        assert self.proc is not None
        deadline = asyncio.get_running_loop().time() + timeout
        while self.proc.returncode is None:
            if await self.healthy():
                return True
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"mqchat serve not healthy after {timeout:g} s:\n{self.log_tail()}")
            await asyncio.sleep(0.05)
        return False

    async def healthy(self) -> bool:
        """Whether ``/healthz`` answers 200 now."""
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.http_port}", timeout=3) as http:
                return (await http.get("/healthz")).status_code == 200
        except httpx.HTTPError:
            return False

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    async def wait(self, timeout: float) -> int:
        """The exit code, once the server has exited by itself."""
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def kill(self) -> None:
        """SIGKILL: no shutdown hook, no flush, nothing runs after this."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def stop(self, grace: float = 10) -> None:
        """SIGTERM, and SIGKILL if it has not exited within ``grace`` seconds."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                await self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 4000) -> str:
        return self.log()[-chars:]

    def stdout(self) -> str:
        assert self.stdout_path is not None, "stdout goes to the log"
        return self.stdout_path.read_text(errors="replace")

    def http(self, token: str | None = None) -> httpx.AsyncClient:
        return accounts.http_client(self, token)

    async def register(self, user_id: str) -> str:
        return await accounts.register(self, user_id)

    async def __aenter__(self) -> ServerProcess:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.kill()
