"""The machine's services (PostgreSQL, Chromium, the mosquitto clients): skip without them,
unless ``MQCHAT_REQUIRE_SERVICES=1`` (set by .ci/run), where a missing one is a failure."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

REQUIRE_SERVICES = os.environ.get("MQCHAT_REQUIRE_SERVICES") == "1"


def service_missing(reason: str) -> NoReturn:
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} (MQCHAT_REQUIRE_SERVICES=1 turns this skip into a failure)")
    pytest.skip(reason)
