"""``mqchat chat`` driven through its stdin and stdout, two terminals talking to each other."""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.support.accounts import PASSWORD
from tests.support.ports import free_port
from tests.support.processes import ServerProcess
from tests.support.services import service_missing as _service_missing

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
        assert "bob: 2 unread" in await alice.expect("bob: ")
        await alice.expect("[bob] are you there?")  # missed while offline, caught up
        await alice.expect("[bob] ping")
        await bob.expect("commands:")

        await alice.type("/to bob")
        await alice.expect("talking to bob")
        await alice.type("hello bob")
        await alice.expect("(sent #")
        await bob.expect("[alice] hello bob")
        await alice.expect('(delivered to bob: "hello bob")')  # names the message

        await bob.type("/to alice")
        await bob.type("/read")
        await bob.expect("(marked read up to #")
        await alice.expect('(read by bob: "hello bob")')
        await bob.type("hi alice")
        await alice.expect("[bob] hi alice")

        await alice.type("/quit")
        await alice.expect("bye")
        assert await alice.finish() == 0
        assert await bob.finish() == 0  # end of input quits too
    finally:
        alice.kill()
        bob.kill()

    # The next start lists the conversation as read and replays nothing already shown: the
    # conversation alice had open was marked read as bob's messages arrived.
    again = await Terminal.start(server, tmp_path / "alice", "--user", "alice", "--password", PASSWORD)
    try:
        assert "bob: 0 unread" in await again.expect("bob: ")
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


async def test_an_unreachable_http_api_fails_at_once_naming_host_port_and_flag(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mqchat.cli", "chat", "--user", "alice", "--password", PASSWORD,
        "--server", "127.0.0.1", "--http-port", str(port), "--data-dir", str(tmp_path),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    started = time.monotonic()
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 1 and time.monotonic() - started < 10
    message = err.decode()
    assert message.count("\n") == 1, message
    assert f"127.0.0.1:{port}" in message and "--http-port" in message and "--server" in message


async def fake_broker() -> tuple[asyncio.Server, int]:
    """Another MQTT broker: accepts every CONNECT and SUBSCRIBE, and says nothing else."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                first = (await reader.readexactly(1))[0]
                length, shift = 0, 0
                while True:
                    byte = (await reader.readexactly(1))[0]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                body = await reader.readexactly(length)
                kind = first >> 4
                if kind == 1:  # CONNECT
                    writer.write(b"\x20\x02\x00\x00")
                elif kind == 8:  # SUBSCRIBE: grant QoS 1 to each filter
                    count = body[2:].count(b"\x01") or 1
                    writer.write(bytes([0x90, 2 + count]) + body[:2] + b"\x01" * count)
                elif kind == 3 and first & 0x06:  # PUBLISH at QoS 1
                    topic_len = int.from_bytes(body[:2], "big")
                    writer.write(b"\x40\x02" + body[2 + topic_len : 4 + topic_len])
                elif kind == 12:  # PINGREQ
                    writer.write(b"\xd0\x00")
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_an_mqtt_port_of_another_broker_fails_in_seconds(server_process: ServerProcess, tmp_path: Path) -> None:
    await server_process.register("alice")
    broker, port = await fake_broker()
    try:
        for mqtt_port, expected in ((port, "no mqchat answered"), (free_port(), "no MQTT connection to")):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mqchat.cli", "chat", "--user", "alice", "--password", PASSWORD,
                "--server", "127.0.0.1", "--http-port", str(server_process.http_port), "--mqtt-port", str(mqtt_port),
                "--data-dir", str(tmp_path / str(mqtt_port)),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            started = time.monotonic()
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 1 and time.monotonic() - started < 15, out.decode()
            line = next(x for x in out.decode().splitlines() if x.startswith("mqchat:"))
            assert expected in line and f"127.0.0.1:{mqtt_port}" in line and "--mqtt-port" in line
    finally:
        broker.close()
        await broker.wait_closed()


async def test_groups_by_name_notices_files_and_leaving(server_process: ServerProcess, tmp_path: Path) -> None:
    server = server_process
    alice_token = await server.register("alice")
    await server.register("bob")
    async with server.http(alice_token) as http:
        group = (await http.post("/v1/groups", json={"name": "Weekend trip", "members": ["bob"]})).json()
    bob = await Terminal.start(server, tmp_path / "bob", "--user", "bob", "--password", PASSWORD)
    alice = await Terminal.start(server, tmp_path / "alice", "--user", "alice", "--token", alice_token)
    try:
        assert "Weekend trip (group): 0 unread" in await bob.expect("Weekend trip")
        await bob.expect("(alice created the group Weekend trip)")
        await alice.expect("commands:")
        await alice.type("/group weekend TRIP")
        await alice.expect("talking in Weekend trip")
        note = tmp_path / "list.txt"
        note.write_text("tent, stove\n")
        await alice.type(f"/send {note}")
        await alice.expect("(sent #")
        line = await bob.expect("[alice @ Weekend trip]")
        assert "(file list.txt, 12 B: /save 1)" in line
        downloads = tmp_path / "downloads"
        downloads.mkdir()
        await bob.type(f"/save 1 {downloads}")
        await bob.expect("(saved ")
        assert (downloads / "list.txt").read_text() == "tent, stove\n"
        await bob.type("/group Weekend trip")
        await bob.expect("talking in Weekend trip")
        async with server.http(alice_token) as http:
            removed = await http.delete(f"/v1/groups/{group['group_id']}/members/bob")
            assert removed.status_code == 204
        await bob.expect("(alice removed you from Weekend trip; choose another conversation")
        await bob.type("/list")
        assert "no conversations yet" in await bob.expect("conversations")
        await bob.type("/quit")
        assert await bob.finish() == 0
        await alice.type("/quit")
        assert await alice.finish() == 0
    finally:
        alice.kill()
        bob.kill()


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True, timeout=10).stdout


async def screen_with(session: str, text: str, timeout: float = 20, *, last: str | None = None) -> list[str]:
    """The terminal's lines once ``text`` is on it (and, with ``last``, once the last non-empty
    line is that: prompt_toolkit redraws the prompt a moment after printing a message above it)."""
    async with asyncio.timeout(timeout):
        while True:
            lines = tmux("capture-pane", "-p", "-t", session).splitlines()
            shown = [line.rstrip() for line in lines if line.strip()]
            if any(text in line for line in lines) and (last is None or (shown and shown[-1] == last)):
                return lines
            await asyncio.sleep(0.1)


async def test_on_a_terminal_incoming_messages_leave_the_typed_line_intact(
    server_process: ServerProcess, tmp_path: Path
) -> None:
    if shutil.which("tmux") is None:
        _service_missing("tmux is not installed (scripts/install-test-deps.sh installs it)")
    server = server_process
    await server.register("alice")
    bob_token = await server.register("bob")
    session = f"mqchat-{uuid.uuid4().hex[:8]}"
    command = shlex.join(
        [
            sys.executable, "-m", "mqchat.cli", "chat", "--user", "alice", "--password", PASSWORD,
            "--server", "127.0.0.1", "--mqtt-port", str(server.mqtt_port), "--http-port", str(server.http_port),
            "--data-dir", str(tmp_path),
        ]
    )  # fmt: skip
    tmux("new-session", "-d", "-s", session, "-x", "100", "-y", "30", command)
    try:
        await screen_with(session, "commands:")
        tmux("send-keys", "-t", session, "/to bob", "Enter")
        await screen_with(session, "talking to bob")
        tmux("send-keys", "-t", session, "-l", "half a thought")
        await screen_with(session, "> half a thought")
        async with server.http(bob_token) as http:
            for i in range(3):
                sent = await http.post(
                    "/v1/messages", json={"client_msg_id": f"b{i}", "to_user": "alice", "content": f"ping {i}"}
                )
                assert sent.status_code == 200
        lines = [line for line in (await screen_with(session, "[bob] ping 2", last="> half a thought")) if line.strip()]
        # Every message on a line of its own, above the prompt; the typed text still whole at the bottom.
        assert lines[-1].rstrip() == "> half a thought", lines
        assert [line for line in lines if "ping" in line] == ["[bob] ping 0", "[bob] ping 1", "[bob] ping 2"], lines
        tmux("send-keys", "-t", session, " indeed", "Enter")
        await screen_with(session, "(sent #")
        async with server.http(bob_token) as http:
            page = (await http.get("/v1/conversations/user:alice/messages")).json()["messages"]
            assert page[0]["content"] == "half a thought indeed"
        tmux("send-keys", "-t", session, "/quit", "Enter")
        await screen_with(session, "bye")
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            tmux("kill-session", "-t", session)
