"""The runner's open-file watch: installed with the server, gone without a trace when it stops."""

from __future__ import annotations

import asyncio

from mqchat.runner import FdExhaustion


def probes() -> list[asyncio.Task[object]]:
    return [task for task in asyncio.all_tasks() if task.get_name() == "mqchat-fd-probe"]


async def test_the_probe_has_ended_when_uninstall_returns() -> None:
    loop = asyncio.get_running_loop()
    before = loop.get_exception_handler()
    fds = FdExhaustion().install(loop)
    await asyncio.sleep(0)
    assert len(probes()) == 1 and loop.get_exception_handler() is not before
    await fds.uninstall()
    # Not merely cancelled: ended, so nothing of it is pending when the loop closes.
    assert probes() == []
    assert loop.get_exception_handler() is before
    await fds.uninstall()  # twice is harmless
