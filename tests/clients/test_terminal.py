"""``mqchat chat`` driven through its stdin and stdout, two terminals talking to each other."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from tests.support.accounts import PASSWORD
from tests.support.processes import ServerProcess

pytestmark = [pytest.mark.timeout(60), pytest.mark.slow]


class Terminal:
    """One ``mqchat chat`` process; ``expect`` reads its output until a line contains a text."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.transcript: list[str] = []

    @classmethod
    async def start(cls, server: ServerProcess, data_dir: Path, *args: str) -> Terminal:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mqchat.cli", "chat", *args, "--server", "127.0.0.1",
            "--mqtt-port", str(server.mqtt_port), "--http-port", str(server.http_port), "--data-dir", str(data_dir),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        return cls(proc)

    async def expect(self, text: str, timeout: float = 20) -> str:
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    raw = await self.proc.stdout.readline()
                    if not raw:
                        raise AssertionError(f"the chat ended before {text!r}")
                    line = raw.decode().rstrip("\n")
                    self.transcript.append(line)
                    if text in line:
                        return line
        except (TimeoutError, AssertionError) as exc:
            raise AssertionError(f"no {text!r} in:\n" + "\n".join(self.transcript)) from exc

    async def type(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{line}\n".encode())
        await self.proc.stdin.drain()

    async def finish(self) -> int:
        """Close its stdin (end of input) and wait for it to exit."""
        assert self.proc.stdin is not None
        if not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        return await asyncio.wait_for(self.proc.wait(), 20)

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


async def test_two_people_chat_in_their_terminals(server_process: ServerProcess, tmp_path: Path) -> None:
    server = server_process
    await server.register("alice")
    bob_token = await server.register("bob")
    async with server.http(bob_token) as http:  # bob wrote before alice opened her chat
        for i, text in enumerate(["are you there?", "ping"]):
            sent = await http.post("/v1/messages", json={"client_msg_id": f"b{i}", "to_user": "alice", "content": text})
            assert sent.status_code == 200, sent.text

    alice = await Terminal.start(server, tmp_path / "alice", "--user", "alice", "--password", PASSWORD)
    bob = await Terminal.start(server, tmp_path / "bob", "--user", "bob", "--token", bob_token)
    try:
        await alice.expect("conversations:")
        assert "user:bob: 2 unread" in await alice.expect("user:bob")
        await alice.expect("[bob] are you there?")  # missed while offline, caught up
        await alice.expect("[bob] ping")
        await bob.expect("commands:")

        await alice.type("/to bob")
        await alice.expect("talking to bob")
        await alice.type("hello bob")
        await alice.expect("(sent #")
        await bob.expect("[alice] hello bob")
        await alice.expect("(delivered to bob)")

        await bob.type("/to alice")
        await bob.type("/read")
        await bob.expect("(marked read up to #")
        await alice.expect("(read by bob)")
        await bob.type("hi alice")
        await alice.expect("[bob] hi alice")

        await alice.type("/quit")
        await alice.expect("bye")
        assert await alice.finish() == 0
        assert await bob.finish() == 0  # end of input quits too
    finally:
        alice.kill()
        bob.kill()

    # The next start lists the conversation as read and replays nothing already shown.
    again = await Terminal.start(server, tmp_path / "alice", "--user", "alice", "--password", PASSWORD)
    try:
        assert "user:bob: 3 unread" in await again.expect("user:bob")  # alice has not marked any read
        await again.expect("commands:")
        await again.type("/to bob")
        await again.type("/read")
        await again.expect("(marked read up to #")
        await again.type("/quit")
        assert await again.finish() == 0
        assert not any("are you there?" in line for line in again.transcript)
    finally:
        again.kill()


async def test_a_wrong_password_is_a_one_line_error(server_process: ServerProcess, tmp_path: Path) -> None:
    server = server_process
    await server.register("alice")
    chat = await Terminal.start(server, tmp_path, "--user", "alice", "--password", "not-the-password")
    try:
        assert "login of 'alice' refused" in await chat.expect("mqchat:")
        assert await chat.finish() == 1
    finally:
        chat.kill()
