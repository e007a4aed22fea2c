"""At most one log line per kind of event per interval, with a count of the ones left out.

A hostile peer can make some lines happen as often as it can open connections or send
requests (a refused connection, an unparsable request, an ``accept()`` out of file
descriptors). Logged one for one, those lines fill the disk faster than the attack costs
the attacker: 634,009 tracebacks in 55 s before this existed (issue 10).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

DEFAULT_INTERVAL = 10.0
_MAX_KEYS = 1024
"""Keys are message templates, so few; the bound only matters for a caller passing formatted text."""


@dataclass
class _Window:
    started: float
    suppressed: int = 0


class LogThrottle:
    """``allow(key)`` is true once per ``interval`` for each key."""

    def __init__(self, interval: float = DEFAULT_INTERVAL, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._windows: dict[Hashable, _Window] = {}

    def allow(self, key: Hashable) -> int | None:
        """None: leave this one out. Otherwise log it, with the returned number of ones left out
        since the previous line of this key."""
        now = self._clock()
        window = self._windows.get(key)
        if window is not None and now - window.started < self.interval:
            window.suppressed += 1
            return None
        if len(self._windows) >= _MAX_KEYS:
            self._windows.clear()
        self._windows[key] = _Window(now)
        return window.suppressed if window is not None else 0

    def suffix(self, suppressed: int) -> str:
        return f" ({suppressed} more like this in the last {self.interval:g} s)" if suppressed else ""


class ThrottleFilter(logging.Filter):
    """A logging filter applying a ``LogThrottle`` per logger and message template.

    Records above ``max_level`` always pass: an ERROR names a bug to fix, not a peer to ignore.
    """

    def __init__(self, interval: float = DEFAULT_INTERVAL, max_level: int = logging.WARNING) -> None:
        super().__init__()
        self.throttle = LogThrottle(interval)
        self.max_level = max_level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > self.max_level:
            return True
        suppressed = self.throttle.allow((record.name, str(record.msg)))
        if suppressed is None:
            return False
        if suppressed:
            # The template may hold %-placeholders for record.args; the suffix holds none.
            record.msg = f"{record.msg}{self.throttle.suffix(suppressed)}"
        return True
