"""What the event loop's thread spends to fan one group message out to its members' connections.

    python scripts/fanout_cost.py --members 1000 --messages 200               # CPU per message
    python scripts/fanout_cost.py --members 1000 --messages 20 --callgrind    # instructions

Every member is an ``MqttConnection`` of a real ``MqttServer``, connected and subscribed to its
stream by CONNECT and SUBSCRIBE packets fed to it as from a socket; its writes go to a sink
instead of a socket. ``--messages`` group messages are stored first (not measured); then each is
fanned out (``Fanout.stream_events``: encode, sign, ``MqttServer.deliver``, one PUBLISH per
member, the turn's writes) and every member's PUBACK is fed back, as a device would send it.
That is the broker's own Python per delivery, without the kernel's socket work or the store.

The CPU figure is the thread's CPU time, median over the messages; on a shared VM it moves by
5-10 % from run to run. ``--callgrind`` runs the script twice under valgrind's callgrind, the
messages stored in both but fanned out in one, and prints the difference per message: instructions,
which repeat to within about 1 % for the same code (what is left varies with how the event loop's
turns fall), against 5-20 % for CPU time. valgrind must be installed; about 75 s per run of 20
messages of 1,000 members.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import subprocess
import sys
import tempfile
import time

from mqchat.bridge.composition import build_services
from mqchat.bridge.store import SendOutcome, SendRequest
from mqchat.broker.connection import MqttConnection
from mqchat.broker.server import MqttServer
from mqchat.config import Settings
from mqchat.core.mqtt import Connect, Subscribe, puback
from mqchat.core.topics import stream_topic


class _Sink:
    """A transport that takes every write and sends nothing."""

    def __init__(self) -> None:
        self.bytes = 0
        self._wrote = asyncio.Event()

    def write(self, data: bytes) -> None:
        self.bytes += len(data)
        self._wrote.set()

    async def until(self, count: int) -> None:
        """Until ``count`` bytes in all were written (the server answers in a task)."""
        while self.bytes < count:
            self._wrote.clear()
            await self._wrote.wait()

    def buffered(self) -> int:
        return 0

    def close(self, *, abort: bool) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _connected(server: MqttServer, settings: Settings, user: str, token: str) -> tuple[MqttConnection, _Sink]:
    sink = _Sink()
    connection = MqttConnection(server, settings.limits, "bench")
    connection.attach(sink, ("127.0.0.1", 0))
    connection.data_received(Connect(f"{user}:d", True, 60, user, token.encode()).encode())
    await sink.until(4)  # the CONNACK
    connection.data_received(Subscribe(1, ((stream_topic(user), 1),)).encode())
    await sink.until(4 + 5)  # and the SUBACK
    return connection, sink


async def _measure(members: int, messages: int, fan_out: bool) -> list[float]:
    with tempfile.TemporaryDirectory() as data_dir:
        settings = Settings.load(None, data_dir=data_dir)
        async with build_services(settings) as services:
            users = [f"u{i}" for i in range(members)]
            await services.store.create_users({user: "!bench" for user in users})
            group, _ = await services.store.create_group(users[0], "bench", users[1:], members)
            server = MqttServer(services)
            services.chat.attach(server)
            try:
                connections = [
                    await _connected(server, settings, user, services.tokens.issue(user, 3600)) for user in users
                ]
                stored = []
                for i in range(messages):
                    request = SendRequest(users[i % members], f"m{i}", "hello " * 16, "text", group_id=group.group_id)
                    (outcome,) = await services.store.save_messages([request])
                    assert isinstance(outcome, SendOutcome), outcome
                    stored.append(outcome)
                gc.freeze()  # as ``mqchat serve`` does (cli.py)
                gc.set_threshold(50_000, 20, 100)
                times = []
                for packet_id, outcome in enumerate(stored if fan_out else [], start=1):
                    before = time.thread_time()
                    await services.chat.fanout.stream_events(outcome.events)
                    await asyncio.sleep(0)  # the turn that writes
                    for connection, _ in connections:
                        connection.data_received(puback(packet_id))
                    times.append(time.thread_time() - before)
                if any(connection.unacknowledged for connection, _ in connections):
                    raise RuntimeError("a delivery went unacknowledged: the packet ids were not 1, 2, 3 ...")
                return times
            finally:
                services.chat.attach(None)


def _callgrind_instructions(members: int, messages: int, fan_out: bool) -> int:
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__]
    command += ["--members", str(members), "--messages", str(messages), "--quiet"]
    if not fan_out:  # the same set-up and the same messages stored, none fanned out
        command.append("--store-only")
    # The same hash seed for both runs: set and dict layouts must not differ between them.
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    found = re.search(r"Collected : (\d+)", result.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from valgrind:\n{result.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--callgrind", action="store_true", help="count instructions under valgrind")
    parser.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.callgrind:
        base = _callgrind_instructions(args.members, args.messages, fan_out=False)
        total = _callgrind_instructions(args.members, args.messages, fan_out=True)
        per_message = (total - base) / args.messages
        print("| members | messages | instructions per group message | per delivery |")
        print("|---|---|---|---|")
        print(f"| {args.members} | {args.messages} | {per_message / 1e6:.2f} M | {per_message / args.members:,.0f} |")
        return
    times = sorted(asyncio.run(_measure(args.members, args.messages, fan_out=not args.store_only)))
    if args.quiet or not times:
        return
    median = times[len(times) // 2]
    print("| members | messages | CPU ms per group message (median) | us per delivery |")
    print("|---|---|---|---|")
    print(f"| {args.members} | {args.messages} | {median * 1e3:.2f} | {median * 1e6 / args.members:.2f} |")


if __name__ == "__main__":
    try:
        import uvloop  # as ``mqchat serve`` runs where it is installed
    except ImportError:
        main()
    else:
        uvloop.install()
        main()
