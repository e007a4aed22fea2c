"""The browser page works under its Content-Security-Policy, and the policy is enforced.

Headless Chromium through Playwright, with the ``browser`` fixture of ``tests/support/browser.py``
(without Playwright or Chromium the test skips, unless ``MQCHAT_REQUIRE_SERVICES=1``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest

from mqchat.runner import RunningServer
from tests.support.accounts import PASSWORD, http_client, register

with contextlib.suppress(ImportError):  # the ``browser`` fixture skips (or fails) the test
    from playwright.async_api import Browser, expect

pytestmark = pytest.mark.browser

WAIT_MS = 20_000

RECORD_VIOLATIONS = """
window.cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.cspViolations.push(`${event.effectiveDirective} ${event.blockedURI}`);
});
"""


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'mqchat.db'}"


async def test_the_page_logs_in_and_chats_under_its_policy_and_inline_script_is_refused(
    server: RunningServer, browser: Browser
) -> None:
    await register(server, "alice")
    bob = await register(server, "bob")
    context = await browser.new_context()
    context.set_default_timeout(WAIT_MS)
    await context.add_init_script(RECORD_VIOLATIONS)
    page = await context.new_page()
    console: list[str] = []
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
    try:
        response = await page.goto(f"http://127.0.0.1:{server.http_port}/")
        assert response is not None
        assert f"ws://127.0.0.1:{server.ws_port}" in response.headers["content-security-policy"]

        await page.get_by_test_id("login-user").fill("alice")
        await page.get_by_test_id("login-password").fill(PASSWORD)
        await page.get_by_test_id("login-submit").click()
        # Online means MQTT over WebSocket, to another port than the page's: allowed by connect-src.
        await expect(page.get_by_test_id("connection")).to_have_text("online", timeout=WAIT_MS)
        message = {"client_msg_id": "csp-1", "to_user": "alice", "content": "under the policy", "msg_type": "text"}
        async with http_client(server, bob) as http:
            assert (await http.post("/v1/messages", json=message)).status_code == 200
        chat = page.locator('[data-testid="conversation-item"][data-conversation-id="user:bob"]')
        await expect(chat).to_be_visible(timeout=WAIT_MS)
        violations: Any = await page.evaluate("window.cspViolations")
        assert violations == [], violations
        assert not [line for line in console if "Content Security Policy" in line], console

        # The policy is enforced, not only sent: injected inline script does not run.
        await page.evaluate(
            "() => { const s = document.createElement('script'); s.textContent = 'window.injected = 1';"
            " document.body.append(s); }"
        )
        assert await page.evaluate("window.injected === undefined")
        assert await page.evaluate("window.cspViolations") == ["script-src-elem inline"]
    finally:
        await context.close()
