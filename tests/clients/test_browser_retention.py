"""The browser page and retention: a page offline while retention deleted events it had not read
is answered ``cursor_expired``; it reads on from ``oldest_seq - 1``, shows the kept messages once
each and a line saying older ones are gone (no error, nothing stuck), and stays live (Chromium).

Retention runs in the (in-process) server with a clock set one day after a moment between the
messages that go and those that stay, as tests/e2e/test_retention.py does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest

from mqchat.bridge.retention import RetentionPruner
from mqchat.config import RetentionSettings
from mqchat.core.errors import CursorExpired
from mqchat.runner import RunningServer
from tests.clients.test_browser import (  # noqa: F401 (fixtures)
    database_url,
    pages,
)
from tests.support.accounts import http_client, register

with contextlib.suppress(ImportError):  # the fixtures report it
    from playwright.async_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

DAY_MS = 86_400_000
OLDER_GONE = "Older messages are no longer available on the server."


async def send(server: RunningServer, token: str, numbers: range) -> None:
    async with http_client(server, token) as http:
        for n in numbers:
            body = {"client_msg_id": f"c{n}", "to_user": "bob", "content": f"m{n}"}
            sent = await http.post("/v1/messages", json=body)
            assert sent.status_code == 200, sent.text


async def test_a_page_offline_past_retention_says_older_messages_are_gone_and_stays_live(
    server: RunningServer, pages: Any
) -> None:
    alice = await register(server, "alice")
    bob_token = await register(server, "bob")
    await send(server, alice, range(0, 3))
    bob = await pages(cuttable=True)
    await bob.login("bob")
    await bob.open_conversation("user:alice")
    await expect(bob.messages).to_have_count(3)
    await expect(bob.testid("history-gap")).to_have_count(0)  # nothing is gone yet

    await bob.go_offline()
    await expect(bob.connection).not_to_have_text("online")
    # Three messages and the read marker of opening the conversation (or fewer, if that had
    # not come back yet): nothing reaches the page from now on.
    before = await bob.page.evaluate("state.cursor")
    assert before >= 3
    await send(server, alice, range(3, 10))  # bob's seqs 4-10: retention deletes them
    await asyncio.sleep(0.2)  # entry times are milliseconds: keep the cut clear of both sides
    cut = time.time_ns() // 1_000_000
    await asyncio.sleep(0.2)
    await send(server, alice, range(10, 15))  # seqs 11-15: kept
    pruner = RetentionPruner(server.services.store, RetentionSettings(days=1, offline_days=1, batch_size=3))
    await pruner.run_once(now=cut + DAY_MS)
    with pytest.raises(CursorExpired) as gone:
        await server.services.store.read_stream("bob", 3, 10)
    oldest = gone.value.oldest_seq
    assert oldest is not None and oldest > 4  # bob's entries up to at least seq 4 went
    async with http_client(server, bob_token) as http:
        history = (await http.get("/v1/conversations/user:alice/messages")).json()["messages"]
    kept = [m["content"] for m in reversed(history)]
    assert kept == [f"m{n}" for n in range(10, 15)]  # what the server still has for bob

    await bob.go_online()
    await expect(bob.connection).to_have_text("online")
    # The line, above exactly the kept messages (the conversation rebuilt from the server), and
    # no error banner.
    await expect(bob.messages).to_have_count(len(kept))
    assert await bob.texts() == kept
    await expect(bob.testid("error")).to_be_hidden()
    await expect(bob.testid("history-gap")).to_have_text(OLDER_GONE)
    gap = await bob.page.evaluate("state.gap")
    assert (gap["previous_cursor"], gap["oldest_seq"]) == (before, oldest)
    assert await bob.page.evaluate("state.cursor") >= oldest - 1
    assert await bob.page.evaluate("state.expired") == 1

    # Live again: a new message shows once, after the kept ones.
    await send(server, alice, range(15, 16))
    await expect(bob.message("m15")).to_have_count(1)
    assert await bob.texts() == [*kept, "m15"]
    # The page acked past the gap, so the server's cursor is past it: a reload catches up
    # normally (no refusal), shows the same messages once, and still says older ones are gone.
    await bob.page.reload()
    await expect(bob.connection).to_have_text("online")
    await expect(bob.messages).to_have_count(len(kept) + 1)
    assert await bob.texts() == [*kept, "m15"]
    await expect(bob.testid("history-gap")).to_have_text(OLDER_GONE)
    await asyncio.sleep(1)
    assert await bob.page.evaluate("state.expired") == 0
    assert await bob.page.evaluate("[state.catchingUp, state.held.size]") == [False, 0]
