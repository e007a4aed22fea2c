"""``python -m mqchat.bench.plain_amqtt PORT``: amqtt 0.12 with anonymous auth and nothing else.

The reference the bench compares mqchat with: the same broker library, without our
plugins, our broker overrides or the chat bridge.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from amqtt.broker import Broker


async def _serve(port: int) -> None:
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await broker.shutdown()


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
