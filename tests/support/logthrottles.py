"""The log throttles are per process (a filter on each throttled logger): reset them so that one
test's lines do not silence the next test's, or one refusal another's within a test."""

from __future__ import annotations

import logging

from mqchat.logthrottle import LogThrottle, ThrottleFilter


def reset_log_throttles() -> None:
    for name in list(logging.root.manager.loggerDict):
        if not name.startswith("mqchat"):
            continue
        for found in logging.getLogger(name).filters:
            if isinstance(found, ThrottleFilter):
                found.throttle = LogThrottle(found.throttle.interval)
