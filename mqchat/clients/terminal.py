"""``mqchat chat``: a line-oriented terminal chat built on ``ChatClient``.

It lists the conversations with their unread counts, then reads commands::

    /to bob             talk to bob
    /group Weekend trip talk in a group, by its name (or id)
    /send FILE          send a file to the conversation
    /save N [DIR]       save the file of message N (shown as "/save N") into DIR (default .)
    /read               mark the newest message of the conversation read
    /list               list the conversations again
    /quit               leave (end of input too)
    anything else       is sent to the conversation

Incoming messages are printed as they arrive (``[bob] hello``, ``[bob @ Weekend trip] hello``)
and receipts briefly, naming the message (``  (delivered to bob: "hello")``). The open
conversation is marked read as its messages arrive. On a terminal the input line is kept intact
below incoming messages (prompt_toolkit); from a pipe, lines are read as they come.

Before anything else it checks that an mqchat answers: the HTTP API within a few seconds, then
the MQTT port (a ``sync_response`` must arrive on the device topic: another broker on that port
accepts the connection and says nothing). Each failure is one line naming the host, the port
and the flag to pass.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import logging
import os
import sys
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TextIO

from mqchat.clients.client import ChatClient
from mqchat.clients.errors import ApiUnavailable, ClientError, LoginFailed
from mqchat.clients.gaps import HistoryGap, StreamItem
from mqchat.clients.http import HttpApi
from mqchat.core.errors import ChatError
from mqchat.core.protocol import (
    Attachment,
    GroupUpdated,
    MessageDelivered,
    MessageRead,
    MessageRecalled,
    NewMessage,
    TypingEvent,
)

HELP = "commands: /to USER, /group NAME, /send FILE, /save N [DIR], /read, /list, /quit; any other line is sent"
CHECK_SECONDS = 4.0
"""How long each check (HTTP API, MQTT connection, the server's first answer) may take."""


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", required=True, help="your user id")
    secret = parser.add_mutually_exclusive_group()
    secret.add_argument("--password", help="log in with this password (prompted for on a terminal)")
    secret.add_argument("--token", help="an access token (from `mqchat token`) instead of a password")
    parser.add_argument("--server", default="127.0.0.1", help="host of the mqchat server (default 127.0.0.1)")
    parser.add_argument("--mqtt-port", type=int, default=1883, help="MQTT over TCP (default 1883)")
    parser.add_argument("--http-port", type=int, default=8080, help="HTTP API (default 8080)")
    parser.add_argument(
        "--data-dir", type=Path, help="where the chat keeps its outbox and cursor (default ~/.local/share/mqchat)"
    )


def run_chat(args: argparse.Namespace) -> int:
    """Entry point of ``mqchat chat``; returns the exit status."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    password, token = args.password, args.token
    if password is None and token is None:
        if not sys.stdin.isatty():
            print("mqchat: give --password or --token", file=sys.stderr)
            return 2
        password = getpass.getpass(f"password for {args.user}: ")
    data_dir: Path = args.data_dir or Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local/share")) / "mqchat"
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    async def chat() -> int:
        problem = await check_http(args.server, args.http_port)
        if problem is not None:
            print(f"mqchat: {problem}", file=sys.stderr)
            return 1
        client = ChatClient(
            args.user,
            password=password,
            token=token,
            host=args.server,
            mqtt_port=args.mqtt_port,
            http_port=args.http_port,
            store_path=data_dir / f"{args.user}.sqlite3",
            connect_timeout=CHECK_SECONDS,
        )
        where = f"{args.server}:{args.mqtt_port}"
        if sys.stdin.isatty() and sys.stdout.isatty():
            return await _interactive(TerminalChat(client, sys.stdout, mqtt_where=where))
        return await TerminalChat(client, sys.stdout, mqtt_where=where).run(_stdin_lines())

    try:
        return asyncio.run(chat())
    except KeyboardInterrupt:
        return 130
    except ClientError as exc:  # e.g. the data file is open in another terminal
        print(f"mqchat: {exc}", file=sys.stderr)
        return 1


async def check_http(host: str, port: int) -> str | None:
    """Why the HTTP API of an mqchat server is not at ``host:port``, or None when it is."""
    try:
        answer = await HttpApi(f"http://{host}:{port}", timeout=CHECK_SECONDS).request("GET", "/healthz")
    except ApiUnavailable as exc:
        reason = exc.__cause__ or exc
        return (
            f"cannot reach the mqchat HTTP API at {host}:{port} ({reason}); is `mqchat serve` running there? "
            "pass --server HOST and --http-port PORT (the ports `mqchat serve` prints)"
        )
    except ChatError as exc:
        return f"{host}:{port} answers HTTP, but not as mqchat ({exc.message}); pass mqchat's --http-port"
    if not isinstance(answer, dict) or answer.get("status") != "ok":
        return f"{host}:{port} answers HTTP, but not as mqchat; pass mqchat's --http-port"
    return None


async def _interactive(chat: TerminalChat) -> int:
    """On a terminal: prompt_toolkit keeps the line being typed below what arrives."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.patch_stdout import patch_stdout

    lines: asyncio.Queue[str | None] = asyncio.Queue()
    session: PromptSession[str] = PromptSession()

    async def read() -> None:
        while True:
            try:
                lines.put_nowait(await session.prompt_async("> "))
            except (EOFError, KeyboardInterrupt):
                lines.put_nowait(None)
                return

    with patch_stdout(raw=True):
        chat.out = sys.stdout
        reader = asyncio.create_task(read())
        try:
            return await chat.run(lines)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


def _stdin_lines() -> asyncio.Queue[str | None]:
    """Lines of stdin, read by a daemon thread (works for terminals, pipes and files alike;
    a blocked read never holds up the exit). ``None`` marks the end of input."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    def read() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line.rstrip("\r\n"))
        loop.call_soon_threadsafe(lines.put_nowait, None)

    threading.Thread(target=read, name="mqchat-stdin", daemon=True).start()
    return lines


def _folder(name: str) -> Path | None:
    path = Path(name).expanduser()
    return path if path.is_dir() else None


def _size(count: int) -> str:
    for unit in ("B", "kB", "MB"):
        if count < 1000 or unit == "MB":
            return f"{count} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count = count / 1000  # type: ignore[assignment]
    return f"{count} B"


def _quote(text: str | None, width: int = 40) -> str:
    if text is None:
        return "(recalled)"
    one_line = " ".join(text.split())
    return f'"{one_line[: width - 1]}…"' if len(one_line) > width else f'"{one_line}"'


class TerminalChat:
    def __init__(self, client: ChatClient, out: TextIO, *, mqtt_where: str = "the MQTT port") -> None:
        self.client = client
        self.out = out
        self.mqtt_where = mqtt_where
        self.target: str | None = None
        """``user:{peer}`` or ``group:{group_id}``."""
        self.newest: dict[str, int] = {}
        """The newest message id seen per conversation, for /read."""
        self.mine: set[str] = set()
        """client_msg_ids sent from this terminal: not echoed back."""
        self.texts: dict[int, str] = {}
        """What the messages sent from here said, by id: receipts name the message."""
        self.groups: dict[str, str] = {}
        """Names of the groups the user is in, by id."""
        self.files: list[Attachment] = []
        """Files shown so far; ``/save N`` takes the N-th."""
        self.sends: set[asyncio.Task[None]] = set()

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    async def run(self, lines: asyncio.Queue[str | None]) -> int:
        async with self.client:
            waiting = asyncio.create_task(self.connect())
            early: list[str] = []
            while not waiting.done():  # /quit works while connecting, too
                line_task = asyncio.create_task(lines.get())
                await asyncio.wait({waiting, line_task}, return_when=asyncio.FIRST_COMPLETED)
                if not line_task.done():
                    line_task.cancel()
                    continue
                line = line_task.result()
                if line is None or line.strip() == "/quit":
                    waiting.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await waiting
                    self.say("bye")
                    return 0
                early.append(line)
            problem = waiting.result()
            if problem is not None:
                self.say(f"mqchat: {problem}")
                return 1
            self.say(HELP)
            printer = asyncio.create_task(self.print_events())
            typing = asyncio.create_task(self.print_typing())
            try:
                for line in early:
                    if not await self.handle(line.strip()):
                        break
                else:
                    while (line := await lines.get()) is not None:
                        if not await self.handle(line.strip()):
                            break
                if self.sends:  # let what was typed last get its ack (the outbox keeps it anyway)
                    await asyncio.wait(self.sends, timeout=5)
            finally:
                tasks = (printer, typing, *self.sends)
                for task in tasks:
                    task.cancel()
                await asyncio.wait(tasks, timeout=5)
        self.say("bye")
        return 0

    async def connect(self) -> str | None:
        """Connect and wait for the server's first answer; why not, as one line, or None."""
        try:
            async with asyncio.timeout(CHECK_SECONDS * 2):
                await self.client.wait_connected()
        except LoginFailed as exc:
            return f"{exc} (MQTT at {self.mqtt_where}: if that is not mqchat's MQTT port, pass --mqtt-port)"
        except TimeoutError:
            return (
                f"no MQTT connection to {self.mqtt_where} within {CHECK_SECONDS * 2:g} s; "
                "pass --mqtt-port with the MQTT port `mqchat serve` prints"
            )
        except (ClientError, ChatError) as exc:
            return f"cannot reach the server: {exc}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CHECK_SECONDS
        while not self.client.heard_from_server:
            if loop.time() > deadline:
                return (
                    f"{self.mqtt_where} accepted the MQTT connection, but no mqchat answered on it (no "
                    f"sync_response within {CHECK_SECONDS:g} s): probably another broker; pass --mqtt-port "
                    "with the MQTT port `mqchat serve` prints"
                )
            await asyncio.sleep(0.05)
        try:
            await self.list_conversations()
        except (ClientError, ChatError) as exc:
            return f"cannot list the conversations: {exc}"
        return None

    async def handle(self, line: str) -> bool:
        """Act on one input line; False to quit."""
        if not line:
            return True
        command, _, rest = line.partition(" ")
        rest = rest.strip()
        if command == "/quit":
            return False
        if command == "/to":
            if not rest:
                self.say("  usage: /to USER")
            else:
                await self.open(f"user:{rest}", f"talking to {rest}")
        elif command == "/group":
            await self.open_group(rest)
        elif command == "/send":
            self.start_send(rest or None)
        elif command == "/save":
            await self.save(rest)
        elif command == "/read":
            await self.mark_read()
        elif command == "/list":
            await self.list_conversations()
        elif command == "/help":
            self.say(HELP)
        elif line.startswith("/"):
            self.say(f"  unknown command {command}; {HELP}")
        else:
            self.start_send(None, line)
        return True

    async def open(self, target: str, announce: str) -> None:
        self.target = target
        self.say(f"  {announce}")
        await self.mark_read(quiet=True)  # the open conversation is read

    async def open_group(self, wanted: str) -> None:
        if not wanted:
            self.say("  usage: /group NAME (or its id)")
            return
        await self.refresh_groups()
        by_name = [gid for gid, name in self.groups.items() if name.casefold() == wanted.casefold()]
        if wanted in self.groups:
            by_name = [wanted]
        if not by_name:
            known = ", ".join(sorted(self.groups.values())) or "none"
            self.say(f"  you are in no group called {wanted!r} (your groups: {known})")
        elif len(by_name) > 1:
            self.say(f"  several groups are called {wanted!r}; use an id: {', '.join(sorted(by_name))}")
        else:
            await self.open(f"group:{by_name[0]}", f"talking in {self.groups[by_name[0]]}")

    def start_send(self, name: str | None, text: str = "") -> None:
        path = Path(name).expanduser() if name is not None else None
        if self.target is None:
            self.say("  choose someone first: /to USER or /group NAME")
            return
        if path is None and not text:
            self.say("  usage: /send FILE")
            return
        if path is not None and not path.is_file():
            self.say(f"  (no file {str(path)!r})")
            return
        self.spawn(self.send(self.target, text, path))

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self.sends.add(task)
        task.add_done_callback(self.sends.discard)

    async def send(self, target: str, text: str, path: Path | None = None) -> None:
        kind, _, ident = target.partition(":")
        try:
            if kind == "group":
                ack = await self.client.send_to_group(ident, text, attachment=path)
            else:
                ack = await self.client.send(ident, text, attachment=path)
        except ChatError as exc:
            self.say(f"  (not sent: {exc.message})")
            return
        except ClientError as exc:
            self.say(f"  (not sent yet: {exc}; it stays in the outbox)")
            return
        self.mine.add(ack.client_msg_id)
        self.texts[ack.server_msg_id] = text or (path.name if path else "")
        self.newest[target] = max(self.newest.get(target, 0), ack.server_msg_id)
        self.say(f"  (sent #{ack.server_msg_id}{f': {path.name}' if path else ''})")

    async def save(self, rest: str) -> None:
        number, _, directory = rest.partition(" ")
        if not number.isdigit() or not 1 <= int(number) <= len(self.files):
            self.say("  usage: /save N [DIR], N as shown after a file (/save 1 ...)")
            return
        folder = _folder(directory.strip() or ".")
        if folder is None:
            self.say(f"  (no folder {directory.strip()!r})")
            return
        try:
            saved = await self.client.save_attachment(self.files[int(number) - 1], folder)
        except (ChatError, ClientError) as exc:
            self.say(f"  (not saved: {getattr(exc, 'message', exc)})")
            return
        self.say(f"  (saved {saved})")

    async def mark_read(self, *, quiet: bool = False) -> None:
        if self.target is None:
            self.say("  choose a conversation first")
            return
        newest = self.newest.get(self.target)
        if newest is None:
            try:
                page = await self.client.history(self.target, limit=1)
            except ChatError:
                page = []
            newest = page[0].server_msg_id if page else None
        if newest is None:
            if not quiet:
                self.say("  (nothing to mark read)")
            return
        await self.client.mark_read(newest)
        if not quiet:
            self.say(f"  (marked read up to #{newest})")

    async def refresh_groups(self) -> None:
        self.groups = {g.group_id: g.name for g in await self.client.groups()}

    def title(self, conversation_id: str) -> str:
        kind, _, ident = conversation_id.partition(":")
        return f"{self.groups.get(ident, ident)} (group)" if kind == "group" else ident

    async def list_conversations(self) -> None:
        await self.refresh_groups()
        conversations = [
            c
            for c in await self.client.conversations()
            # A group the user left stays in their stream, but not in the list.
            if not c.conversation_id.startswith("group:") or c.conversation_id.removeprefix("group:") in self.groups
        ]
        if not conversations:
            self.say("no conversations yet")
            return
        self.say("conversations:")
        for conversation in conversations:
            last = conversation.last_message
            if last is not None:
                cid = conversation.conversation_id
                self.newest[cid] = max(self.newest.get(cid, 0), last.server_msg_id)
            preview = ""
            if last is not None:
                said = last.content or (last.attachment.name if last.attachment else None)
                preview = f"  [{last.from_user}] {said if last.recalled_at is None else '(recalled)'}"
            self.say(f"  {self.title(conversation.conversation_id)}: {conversation.unread_count} unread{preview}")

    async def print_events(self) -> None:
        async for event in self.client.events():
            line = await self.describe(event)
            if line is not None:
                self.say(line)
            if (
                isinstance(event, NewMessage)
                and event.from_user != self.client.user_id
                and self.target == self.conversation_of(event)
            ):
                self.spawn(self.client.mark_read(event.server_msg_id))  # the open conversation is read

    async def print_typing(self) -> None:
        async for event in self.client.typing_events():
            if event.state == "started":
                where = f" in {self.groups.get(event.group_id, event.group_id)}" if event.group_id else ""
                self.say(f"  ({event.from_user} is typing{where})")

    def conversation_of(self, event: NewMessage) -> str:
        if event.group_id is not None:
            return f"group:{event.group_id}"
        return f"user:{event.to_user if event.from_user == self.client.user_id else event.from_user}"

    def who(self, user_id: str) -> str:
        return "you" if user_id == self.client.user_id else user_id

    def file_note(self, attachment: Attachment) -> str:
        self.files.append(attachment)
        kind = "image" if attachment.width is not None else "file"
        size = f"{attachment.width}x{attachment.height}, " if attachment.width is not None else ""
        return f"({kind} {attachment.name}, {size}{_size(attachment.size)}: /save {len(self.files)})"

    async def describe(self, event: StreamItem | TypingEvent) -> str | None:
        me = self.client.user_id
        if isinstance(event, HistoryGap):
            return "  (older messages are no longer available on the server)"
        if isinstance(event, NewMessage):
            conversation = self.conversation_of(event)
            if event.group_id is not None:
                if event.group_id not in self.groups:
                    with contextlib.suppress(ChatError, ClientError):
                        await self.refresh_groups()
                who = f"{event.from_user} @ {self.groups.get(event.group_id, event.group_id)}"
            else:
                who = event.from_user if event.from_user != me else f"{me} -> {conversation.removeprefix('user:')}"
            self.newest[conversation] = max(self.newest.get(conversation, 0), event.server_msg_id)
            if event.from_user == me and event.client_msg_id in self.mine:
                return None  # typed here: already on screen
            if event.content is None:
                return f"[{who}] (recalled)"
            parts = [event.content] if event.content else []
            if event.attachment is not None:
                parts.append(self.file_note(event.attachment))
            return f"[{who}] {' '.join(parts)}"
        if isinstance(event, MessageDelivered):
            return f"  (delivered to {event.delivered_to}: {self.which(event.message_id)})"
        if isinstance(event, MessageRead):
            return f"  (read by {event.read_by}: {self.which(event.message_id)})"
        if isinstance(event, MessageRecalled):
            return f"  ({self.who(event.recalled_by)} recalled message #{event.message_id})"
        if isinstance(event, GroupUpdated):
            return await self.group_notice(event)
        return None  # read markers from our other devices: nothing to show

    def which(self, message_id: int) -> str:
        """A receipt's message in words: its text when sent from here (receipts are watermarks:
        everything up to it is covered)."""
        text = self.texts.get(message_id)
        return _quote(text) if text is not None else f"up to #{message_id}"

    async def group_notice(self, event: GroupUpdated) -> str:
        known = self.groups.get(event.group_id)  # a group just left is no longer listed
        with contextlib.suppress(ChatError, ClientError):
            await self.refresh_groups()
        name = self.groups.get(event.group_id) or known or event.group_id
        by, user = self.who(event.by), self.who(event.user_id)
        if event.action == "created":
            notice = f"{by} created the group {name}"
        elif event.action == "member_added":
            notice = f"{by} added {user} to {name}"
        elif event.action == "member_removed":
            notice = f"{by} removed {user} from {name}"
        else:
            notice = f"{user} left {name}"
        gone = event.user_id == self.client.user_id and event.action in ("member_removed", "member_left")
        if gone and self.target == f"group:{event.group_id}":
            self.target = None
            notice += "; choose another conversation: /to USER or /group NAME"
        return f"  ({notice})"
