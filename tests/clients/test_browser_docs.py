"""``/docs`` works without internet: Swagger UI comes from the package (Chromium, network blocked)."""

from __future__ import annotations

import contextlib
import re

import pytest

from mqchat.runner import RunningServer
from tests.clients.test_browser import database_url  # noqa: F401 (the fixture: SQLite only)

with contextlib.suppress(ImportError):  # the fixtures report it
    from playwright.async_api import Browser, Route, expect

pytestmark = pytest.mark.browser


async def test_the_api_docs_render_with_the_network_blocked(browser: Browser, server: RunningServer) -> None:
    context = await browser.new_context()
    blocked: list[str] = []
    local = re.compile(r"^(https?|wss?)://(127\.0\.0\.1|localhost)(:\d+)?/")

    async def only_local(route: Route) -> None:
        if local.match(route.request.url) or route.request.url.startswith(("data:", "blob:")):
            await route.continue_()
        else:
            blocked.append(route.request.url)
            await route.abort("internetdisconnected")

    await context.route("**/*", only_local)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    try:
        await page.goto(f"http://127.0.0.1:{server.http_port}/docs")
        await expect(page.locator(".swagger-ui .info .title")).to_contain_text("mqchat", timeout=20_000)
        files = page.locator(".opblock-summary-path", has_text="/v1/files").first
        await expect(files).to_be_visible()
        await files.click()  # an operation opens: the UI is live, not only drawn
        await expect(page.locator(".opblock-body").first).to_be_visible()
    finally:
        await context.close()
    assert blocked == [] and errors == [], (blocked, errors)
