"""The ``chromium_path`` and ``browser`` fixtures of the browser tests (loaded by tests/conftest.py).

Debian's ``chromium`` driven by Playwright (``executable_path``: Playwright's own browser
download is not used; ``MQCHAT_TEST_CHROMIUM`` names another binary). Without Playwright or
Chromium the tests that use them skip, unless ``MQCHAT_REQUIRE_SERVICES=1`` (CI), where they fail.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.services import service_missing

if TYPE_CHECKING:
    from playwright.async_api import Browser

try:
    from playwright.async_api import async_playwright
except ImportError:  # reported by the ``chromium_path`` fixture
    HAVE_PLAYWRIGHT = False
else:
    HAVE_PLAYWRIGHT = True

CHROMIUM = Path(os.environ.get("MQCHAT_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def chromium_path() -> Path:
    if not HAVE_PLAYWRIGHT:
        service_missing("the playwright package is not installed (pip install -e '.[test]')")
    if not CHROMIUM.exists():
        service_missing(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    return CHROMIUM


@pytest.fixture
async def browser(chromium_path: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=str(chromium_path), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()
