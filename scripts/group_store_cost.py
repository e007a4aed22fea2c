"""CPU of one group message in the store and in the fan-out's encoding, without the broker.

    python scripts/group_store_cost.py --members 1000 --messages 200

One message at a time to a group of ``--members`` on a fresh SQLite data dir: ``save_messages``
(the transaction that writes the message, one stream row and one head update per member), then
``Fanout.stream_events`` with no broker attached (each member's event encoded and signed). Prints
the process CPU per group message of each part. This is the diagnostic behind "Round 2, second
pass" in docs/performance.md; the end-to-end figure comes from ``mqchat bench --scenario group``.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time

from mqchat.bridge.composition import build_services
from mqchat.bridge.store import SendOutcome, SendRequest
from mqchat.config import Settings


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _measure(members: int, messages: int, warmup: int) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        async with build_services(Settings.load(None, data_dir=data_dir)) as services:
            users = [f"u{i}" for i in range(members)]
            await services.store.create_users({user: "!bench" for user in users})
            group, _ = await services.store.create_group(users[0], "bench", users[1:], members)
            store_s = fanout_s = 0.0
            started = time.perf_counter()
            for i in range(warmup + messages):
                request = SendRequest(users[i % members], f"m{i}", "hello " * 16, "text", group_id=group.group_id)
                before = _cpu()
                (outcome,) = await services.store.save_messages([request])
                stored = _cpu()
                assert isinstance(outcome, SendOutcome), outcome
                await services.chat.fanout.stream_events(outcome.events)
                if i == warmup - 1:
                    started = time.perf_counter()
                if i >= warmup:
                    store_s += stored - before
                    fanout_s += _cpu() - stored
            wall = time.perf_counter() - started
    print("| members | messages | store CPU ms/msg | encode+sign CPU ms/msg | wall ms/msg |")
    print("|---|---|---|---|---|")
    figures = (store_s / messages * 1e3, fanout_s / messages * 1e3, wall / messages * 1e3)
    print(f"| {members} | {messages} | " + " | ".join(f"{figure:.2f}" for figure in figures) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(_measure(args.members, args.messages, args.warmup))


if __name__ == "__main__":
    main()
