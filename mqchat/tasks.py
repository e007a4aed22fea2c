"""Stopping a background task so that a shutdown cannot hang on it.

Python 3.11's ``asyncio.wait_for`` returns the inner result when a cancellation lands just as
the inner wait ends, so the cancellation is lost and a ``while True`` worker goes on. Our own
waits use ``asyncio.timeout`` instead, which does not lose it; libraries may still. And a
``stop()`` written as ``cancel(); with suppress(CancelledError): await task`` also swallows a
cancellation of the caller itself (a shutdown that gives up waiting), then returns as if done.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)

CANCEL_AGAIN_SECONDS = 5.0
"""How long a cancelled task may take to end before it is cancelled again."""
CANCEL_ATTEMPTS = 6
"""Cancellations before giving up on a task that never ends (a shutdown must end)."""


async def stop_task(
    task: asyncio.Future[Any], *, again_after: float = CANCEL_AGAIN_SECONDS, attempts: int = CANCEL_ATTEMPTS
) -> None:
    """Cancel ``task`` and wait until it has ended, cancelling it again if it carries on.

    The task's own ``CancelledError`` is the expected end and is dropped, another exception it
    ends with is raised; a cancellation of the caller is raised at once. A task still running
    after ``attempts`` cancellations is logged as an error and left behind."""
    for attempt in range(attempts):
        if task.done():
            break
        task.cancel()
        await asyncio.wait({task}, timeout=again_after)
        if not task.done() and attempt + 1 < attempts:
            log.warning("%r went on after it was cancelled; cancelling it again", task)
    else:
        if not task.done():
            log.error("%r did not end after %d cancellations; left running", task, attempts)
            return
    if not task.cancelled():
        task.result()
