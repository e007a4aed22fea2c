"""``mqchat chat``: a line-oriented terminal chat built on ``ChatClient``.

It lists the conversations with their unread counts, then reads commands from stdin::

    /to bob         talk to bob
    /group g1       talk in group g1
    /read           mark the newest message of the conversation read
    /list           list the conversations again
    /quit           leave (end of input too)
    anything else   is sent to the conversation

Incoming messages are printed as they arrive (``[bob] hello``, ``[bob@g1] hello`` in a group)
and receipts briefly (``  (delivered to bob)``, ``  (read by bob)``).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import sys
import threading
from pathlib import Path
from typing import TextIO

from mqchat.clients.client import ChatClient
from mqchat.clients.errors import ClientError, LoginFailed
from mqchat.core.errors import ChatError
from mqchat.core.protocol import (
    AnyStreamEvent,
    GroupUpdated,
    MessageDelivered,
    MessageRead,
    MessageRecalled,
    NewMessage,
    TypingEvent,
)

HELP = "commands: /to USER, /group GROUP_ID, /read, /list, /quit; any other line is sent"


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
        client = ChatClient(
            args.user,
            password=password,
            token=token,
            host=args.server,
            mqtt_port=args.mqtt_port,
            http_port=args.http_port,
            store_path=data_dir / f"{args.user}.sqlite3",
        )
        return await TerminalChat(client, sys.stdout).run(_stdin_lines())

    try:
        return asyncio.run(chat())
    except KeyboardInterrupt:
        return 130
    except ClientError as exc:  # e.g. the data file is open in another terminal
        print(f"mqchat: {exc}", file=sys.stderr)
        return 1


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


class TerminalChat:
    def __init__(self, client: ChatClient, out: TextIO) -> None:
        self.client = client
        self.out = out
        self.target: str | None = None
        """``user:{peer}`` or ``group:{group_id}``."""
        self.newest: dict[str, int] = {}
        """The newest message id seen per conversation, for /read."""
        self.mine: set[str] = set()
        """client_msg_ids sent from this terminal: not echoed back."""
        self.sends: set[asyncio.Task[None]] = set()

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    async def run(self, lines: asyncio.Queue[str | None]) -> int:
        async with self.client:
            try:
                async with asyncio.timeout(30):
                    await self.client.wait_connected()
                await self.list_conversations()
            except LoginFailed as exc:
                self.say(f"mqchat: {exc}")
                return 1
            except (TimeoutError, ClientError, ChatError) as exc:
                self.say(f"mqchat: cannot reach the server: {exc or 'timed out'}")
                return 1
            self.say(HELP)
            printer = asyncio.create_task(self.print_events())
            typing = asyncio.create_task(self.print_typing())
            try:
                while (line := await lines.get()) is not None:
                    if not await self.handle(line.strip()):
                        break
                if self.sends:  # let what was typed last get its ack (the outbox keeps it anyway)
                    await asyncio.wait(self.sends, timeout=5)
            finally:
                for task in (printer, typing, *self.sends):
                    task.cancel()
                await asyncio.gather(printer, typing, *self.sends, return_exceptions=True)
        self.say("bye")
        return 0

    async def handle(self, line: str) -> bool:
        """Act on one input line; False to quit."""
        if not line:
            return True
        command, _, rest = line.partition(" ")
        rest = rest.strip()
        if command == "/quit":
            return False
        if command in ("/to", "/group"):
            if not rest:
                self.say(f"  usage: {command} {'USER' if command == '/to' else 'GROUP_ID'}")
            else:
                self.target = f"{'user' if command == '/to' else 'group'}:{rest}"
                self.say(f"  talking to {rest}" if command == "/to" else f"  talking in group {rest}")
        elif command == "/read":
            await self.mark_read()
        elif command == "/list":
            await self.list_conversations()
        elif command == "/help":
            self.say(HELP)
        elif line.startswith("/"):
            self.say(f"  unknown command {command}; {HELP}")
        elif self.target is None:
            self.say("  choose someone first: /to USER or /group GROUP_ID")
        else:
            task = asyncio.create_task(self.send(self.target, line))
            self.sends.add(task)
            task.add_done_callback(self.sends.discard)
        return True

    async def send(self, target: str, text: str) -> None:
        kind, _, ident = target.partition(":")
        try:
            if kind == "group":
                ack = await self.client.send_to_group(ident, text)
            else:
                ack = await self.client.send(to_user=ident, content=text)
        except ChatError as exc:
            self.say(f"  (not sent: {exc.code}: {exc.message})")
            return
        except ClientError as exc:
            self.say(f"  (not sent yet: {exc}; it stays in the outbox)")
            return
        self.mine.add(ack.client_msg_id)
        self.newest[target] = max(self.newest.get(target, 0), ack.server_msg_id)
        self.say(f"  (sent #{ack.server_msg_id})")

    async def mark_read(self) -> None:
        if self.target is None:
            self.say("  choose a conversation first")
            return
        newest = self.newest.get(self.target)
        if newest is None:
            page = await self.client.history(self.target, limit=1)
            newest = page[0].server_msg_id if page else None
        if newest is None:
            self.say("  (nothing to mark read)")
            return
        await self.client.mark_read(newest)
        self.say(f"  (marked read up to #{newest})")

    async def list_conversations(self) -> None:
        conversations = await self.client.conversations()
        if not conversations:
            self.say("no conversations yet")
            return
        self.say("conversations:")
        for conversation in conversations:
            last = conversation.last_message
            if last is not None:
                cid = conversation.conversation_id
                self.newest[cid] = max(self.newest.get(cid, 0), last.server_msg_id)
            name = f" ({conversation.name})" if conversation.name else ""
            preview = f"  [{last.from_user}] {last.content or '(recalled)'}" if last else ""
            self.say(f"  {conversation.conversation_id}{name}: {conversation.unread_count} unread{preview}")

    async def print_events(self) -> None:
        async for event in self.client.events():
            line = self.describe(event)
            if line is not None:
                self.say(line)

    async def print_typing(self) -> None:
        async for event in self.client.typing_events():
            if event.state == "started":
                where = f" in {event.group_id}" if event.group_id else ""
                self.say(f"  ({event.from_user} is typing{where})")

    def describe(self, event: AnyStreamEvent | TypingEvent) -> str | None:
        me = self.client.user_id
        if isinstance(event, NewMessage):
            if event.group_id is not None:
                conversation, who = f"group:{event.group_id}", f"{event.from_user}@{event.group_id}"
            else:
                peer = event.to_user if event.from_user == me else event.from_user
                conversation, who = f"user:{peer}", event.from_user
                if event.from_user == me:
                    who = f"{me} -> {peer}"
            self.newest[conversation] = max(self.newest.get(conversation, 0), event.server_msg_id)
            if event.from_user == me and event.client_msg_id in self.mine:
                return None  # typed here: already on screen
            return f"[{who}] {event.content if event.content is not None else '(recalled)'}"
        if isinstance(event, MessageDelivered):
            return f"  (delivered to {event.delivered_to})"
        if isinstance(event, MessageRead):
            return f"  (read by {event.read_by})"
        if isinstance(event, MessageRecalled):
            return f"  ({event.recalled_by} recalled message #{event.message_id})"
        if isinstance(event, GroupUpdated):
            return f"  (group {event.group_id}: {event.user_id} {event.action.replace('_', ' ')} by {event.by})"
        return None  # read markers from our other devices: nothing to show
