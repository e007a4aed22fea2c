"""Two users chat through the mqchat Python SDK: alice sends, bob reads and marks it read,
alice sees the read receipt.

Run it against a server (``mqchat serve``)::

    python examples/sdk_chat.py --server 127.0.0.1 --mqtt-port 1883 --http-port 8080

It creates the two accounts the first time (POST /v1/users) and keeps each client's outbox
and cursor in ``--data-dir`` (a temporary directory by default). When the names are taken with
other passwords (the README's walkthrough creates alice and bob), pass other ones:
``--alice carol --bob dave``; it then stops with one line saying so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
from pathlib import Path

from mqchat.clients import ChatClient, HttpApi
from mqchat.clients.errors import ApiUnavailable
from mqchat.core.errors import ChatError, UserExists
from mqchat.core.protocol import MessageRead, NewMessage


async def main(args: argparse.Namespace, data_dir: Path) -> None:
    http = HttpApi(f"http://{args.server}:{args.http_port}")
    for user in (args.alice, args.bob):
        with contextlib.suppress(UserExists):  # a second run
            await http.register(user, args.password)
        try:
            await http.login(user, args.password)
        except ChatError as exc:
            raise SystemExit(
                f"sdk_chat: cannot log in as {user!r} ({exc.message}); the name is probably taken with "
                "another password: pass unused names, e.g. --alice carol --bob dave, or --password"
            ) from None

    def client(user: str) -> ChatClient:
        return ChatClient(
            user,
            password=args.password,
            host=args.server,
            mqtt_port=args.mqtt_port,
            http_port=args.http_port,
            store_path=data_dir / f"{user}.sqlite3",
        )

    async with client(args.alice) as alice, client(args.bob) as bob:
        # Not needed to send (a send made offline waits in the outbox), but this demo wants
        # bob online to watch the message arrive.
        async with asyncio.timeout(30):
            await alice.wait_connected()
            await bob.wait_connected()
        # send() returns once the server has stored the message (its message_ack).
        ack = await alice.send(to_user=args.bob, content="Hello Bob!")
        print(f"{args.alice} sent message #{ack.server_msg_id} (seq {ack.seq} in her stream)", flush=True)

        # Every event of bob's stream comes exactly once, in seq order.
        async for event in bob.events():
            if isinstance(event, NewMessage) and event.server_msg_id == ack.server_msg_id:
                print(f"{args.bob} got: [{event.from_user}] {event.content}", flush=True)
                await bob.mark_read(event.server_msg_id)
                break

        async for event in alice.events():
            if isinstance(event, MessageRead) and event.message_id >= ack.server_msg_id:
                print(f"{args.alice} sees: read by {event.read_by}", flush=True)
                break


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="127.0.0.1")
    parser.add_argument("--mqtt-port", type=int, default=1883)
    parser.add_argument("--http-port", type=int, default=8080)
    parser.add_argument("--alice", default="alice")
    parser.add_argument("--bob", default="bob")
    parser.add_argument("--password", default="example-password")
    parser.add_argument("--data-dir", type=Path)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        try:
            asyncio.run(main(options, options.data_dir or Path(scratch)))
        except ApiUnavailable as exc:
            sys.exit(f"sdk_chat: no mqchat HTTP API at {options.server}:{options.http_port} ({exc}); pass --http-port")
