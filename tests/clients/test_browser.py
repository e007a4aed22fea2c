"""The browser page (``mqchat/api/static``) in real headless Chromium, against a real server.

Debian's ``chromium`` driven by Playwright, through the ``browser`` fixture of
``tests/support/browser.py`` (which says when these tests skip). SQLite only: the page does not
care which store the server uses.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mqchat.core.protocol import MessageRead, NewMessage
from mqchat.runner import RunningServer
from tests.clients.support import event_log, make_client, started
from tests.support.accounts import PASSWORD, http_client, register

try:
    from playwright.async_api import Browser, BrowserContext, Locator, Page, WebSocketRoute, expect
except ImportError:  # the ``browser`` fixture skips (or fails) these tests
    pass
else:
    expect.set_options(timeout=20_000)  # generous: the machine is shared; nothing here measures speed

pytestmark = pytest.mark.browser

WAIT_MS = 20_000
"""For page actions, as for ``expect`` above."""


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'mqchat.db'}"


_SEND_ON_CLOSED_SOCKET = "WebSocket is already in CLOSING or CLOSED state."


class Network:
    """The WebSockets of one browser context, through Playwright, so a test can cut them.

    ``context.set_offline(True)`` fails new requests but leaves an open WebSocket connected in
    Chromium, so it cannot take a page off the broker; closing the routed socket does (the page
    sees the connection drop), and refusing new ones keeps it off until ``restore()``.
    """

    def __init__(self) -> None:
        self.up = True
        self.was_cut = False
        self.sockets: list[tuple[WebSocketRoute, WebSocketRoute]] = []

    async def route(self, socket: WebSocketRoute) -> None:
        if not self.up:
            await socket.close(code=1001, reason="offline")
            return
        self.sockets.append((socket, socket.connect_to_server()))

    async def cut(self, context: BrowserContext) -> None:
        self.up = False
        self.was_cut = True
        await context.set_offline(True)  # and HTTP fails too
        for page_side, server_side in self.sockets:
            await server_side.close()
            await page_side.close(code=1001, reason="offline")
        self.sockets.clear()

    async def restore(self, context: BrowserContext) -> None:
        self.up = True
        await context.set_offline(False)


class ChatPage:
    """One user's browser: its own context (own localStorage, so its own device id)."""

    def __init__(self, context: BrowserContext, page: Page, base_url: str) -> None:
        self.context = context
        self.page = page
        self.base_url = base_url
        self.console_errors: list[str] = []
        self.connects = 0
        """MQTT connections the page made (app.js logs each one)."""
        page.on("console", lambda message: self._console(message.type, message.text))
        page.on("pageerror", lambda error: self.console_errors.append(str(error)))

    def _console(self, kind: str, text: str) -> None:
        if kind == "error" and not self._expected_after_cut(text):
            self.console_errors.append(text)
        elif text == "mqtt: connected":
            self.connects += 1

    network: Network | None = None

    def _expected_after_cut(self, text: str) -> bool:
        """Chromium's own message when MQTT.js writes (a PINGREQ, a command) to the socket
        the test has just cut: a consequence of the cut, not an error of the page."""
        return self.network is not None and self.network.was_cut and text == _SEND_ON_CLOSED_SOCKET

    @classmethod
    async def open(
        cls, browser: Browser, server: RunningServer, *, cuttable: bool = False, init_script: str | None = None
    ) -> ChatPage:
        context = await browser.new_context()
        context.set_default_timeout(WAIT_MS)
        if init_script is not None:
            await context.add_init_script(init_script)
        network = None
        if cuttable:
            network = Network()
            await context.route_web_socket(re.compile(r"^ws://"), network.route)
        base_url = f"http://127.0.0.1:{server.http_port}/"
        chat = cls(context, await context.new_page(), base_url)
        chat.network = network
        await chat.page.goto(base_url)
        return chat

    def testid(self, name: str) -> Locator:
        return self.page.get_by_test_id(name)

    @property
    def connection(self) -> Locator:
        return self.testid("connection")

    async def login(self, user: str, password: str = PASSWORD) -> None:
        await self.testid("login-user").fill(user)
        await self.testid("login-password").fill(password)
        await self.testid("login-submit").click()
        await expect(self.connection).to_have_text("online")
        await expect(self.testid("login-form")).to_be_hidden()

    def conversation(self, conversation_id: str) -> Locator:
        return self.page.locator(f'[data-testid="conversation-item"][data-conversation-id="{conversation_id}"]')

    def unread(self, conversation_id: str) -> Locator:
        return self.conversation(conversation_id).get_by_test_id("unread")

    async def open_conversation(self, conversation_id: str) -> None:
        await self.conversation(conversation_id).click()
        await expect(self.testid("conversation")).to_have_attribute("data-conversation-id", conversation_id)

    async def chat_with(self, peer: str) -> None:
        await self.testid("new-chat-user").fill(peer)
        await self.testid("new-chat-submit").click()
        await expect(self.testid("conversation")).to_have_attribute("data-conversation-id", f"user:{peer}")

    async def create_group(self, name: str, members: str) -> str:
        """Create a group through the page; returns its conversation id once it is open."""
        if not await self.testid("new-group-name").is_visible():
            await self.page.locator("#new-group-box summary").click()
        await self.testid("new-group-name").fill(name)
        await self.testid("new-group-members").fill(members)
        await self.testid("new-group-submit").click()
        await expect(self.testid("conversation-title")).to_have_text(name)
        conversation_id = await self.testid("conversation").get_attribute("data-conversation-id")
        assert conversation_id is not None
        return conversation_id

    async def send(self, text: str) -> None:
        await self.testid("composer-input").fill(text)
        await self.testid("composer-input").press("Enter")

    @property
    def messages(self) -> Locator:
        return self.testid("messages").get_by_test_id("message")

    def message(self, text: str) -> Locator:
        return self.messages.filter(has=self.page.get_by_test_id("message-text").get_by_text(text, exact=True))

    async def texts(self) -> list[str]:
        return await self.testid("messages").get_by_test_id("message-text").all_inner_texts()

    async def go_offline(self) -> None:
        assert self.network is not None, "open the page with cuttable=True"
        await self.network.cut(self.context)

    async def go_online(self) -> None:
        assert self.network is not None
        await self.network.restore(self.context)

    async def close(self) -> None:
        await self.context.close()


@pytest.fixture
async def pages(browser: Browser, server: RunningServer) -> AsyncIterator[Any]:
    """``await pages()`` opens a new browser context on the page; all are closed at the end."""
    opened: list[ChatPage] = []

    async def open_page(*, cuttable: bool = False, init_script: str | None = None) -> ChatPage:
        chat = await ChatPage.open(browser, server, cuttable=cuttable, init_script=init_script)
        opened.append(chat)
        return chat

    yield open_page
    for chat in opened:
        await chat.close()
        assert chat.console_errors == [], chat.console_errors


async def test_the_page_and_the_vendored_mqtt_client_are_served(server: RunningServer, pages: Any) -> None:
    async with http_client(server) as http:
        index = await http.get("/")
        assert index.status_code == 200
        assert index.headers["content-type"].startswith("text/html")
        assert (await http.get("/static/vendor/mqtt.min.js")).status_code == 200
        assert (await http.get("/static/nope.js")).status_code == 404
        assert "MIT" in (await http.get("/static/vendor/MQTT.js-LICENSE.md")).text
        config = (await http.get("/v1/client-config")).json()
    # The port the broker bound (the settings say 0), so the page can reach it.
    assert config == {
        "ws_port": server.ws_port,
        "wss_port": None,
        "ws_path": "/mqtt",
        "recall_window_seconds": 120.0,
        "max_file_bytes": 26214400,
    }

    await register(server, "alice")
    alice = await pages()
    await expect(alice.testid("login-form")).to_be_visible()
    assert await alice.page.evaluate("typeof mqtt.connect") == "function"
    await alice.login("alice")
    await expect(alice.testid("me")).to_contain_text("alice")


async def test_a_wrong_password_is_shown_and_nothing_connects(server: RunningServer, pages: Any) -> None:
    await register(server, "alice")
    alice = await pages()
    await alice.testid("login-user").fill("alice")
    await alice.testid("login-password").fill("not-the-password")
    await alice.testid("login-submit").click()
    await expect(alice.testid("error")).to_have_text("Wrong user name or password.")  # words, not a code
    await expect(alice.connection).to_have_text("offline")
    alice.console_errors = [e for e in alice.console_errors if "401" not in e]  # the failed POST /v1/token


async def test_two_browsers_chat_with_unread_counts_and_ticks(server: RunningServer, pages: Any) -> None:
    await register(server, "alice")
    await register(server, "bob")
    alice = await pages()
    await alice.login("alice")
    await alice.chat_with("bob")
    await alice.send("hello bob")
    first = alice.message("hello bob")
    # Stored, but no device of bob has it yet.
    await expect(first).to_have_attribute("data-status", "sent")

    bob = await pages()
    await bob.login("bob")
    # bob's page catches up and acks: delivered; the list shows it unread until he opens it.
    await expect(first).to_have_attribute("data-status", "delivered")
    await expect(bob.unread("user:alice")).to_have_text("1")
    await expect(bob.conversation("user:alice")).to_contain_text("hello bob")

    await bob.open_conversation("user:alice")
    await expect(bob.message("hello bob")).to_have_count(1)
    await expect(first).to_have_attribute("data-status", "read")
    await expect(bob.unread("user:alice")).to_be_hidden()

    # Both have the chat open: messages arrive live and are read at once.
    await bob.send("hi alice")
    await expect(alice.message("hi alice")).to_have_count(1)
    await expect(bob.message("hi alice")).to_have_attribute("data-status", "read")
    await alice.send("how are you?")
    await expect(bob.message("how are you?")).to_have_count(1)
    await expect(alice.message("how are you?")).to_have_attribute("data-status", "read")
    assert await bob.texts() == ["hello bob", "hi alice", "how are you?"]
    assert await alice.texts() == ["hello bob", "hi alice", "how are you?"]


async def test_a_browser_and_a_python_sdk_client_chat_both_ways(
    server: RunningServer, pages: Any, tmp_path: Path
) -> None:
    await register(server, "alice")
    carol_token = await register(server, "carol")
    carol = make_client(
        "carol", tmp_path / "carol.sqlite3", token=carol_token, mqtt_port=server.mqtt_port, http_port=server.http_port
    )
    alice = await pages()
    await alice.login("alice")
    async with started(carol), event_log(carol) as carol_events:
        ack = await carol.send(to_user="alice", content="hello from python")
        await expect(alice.unread("user:carol")).to_have_text("1")
        await alice.open_conversation("user:carol")
        await expect(alice.message("hello from python")).to_have_count(1)
        read = await carol_events.next(MessageRead)
        assert (read.read_by, read.message_id) == ("alice", ack.server_msg_id)

        await alice.send("hello from the browser")
        reply = await carol_events.next(NewMessage)
        while reply.from_user != "alice":  # carol's own message, in her stream too
            reply = await carol_events.next(NewMessage)
        assert reply.content == "hello from the browser"
        # carol's client acked it: delivered; then she reads it.
        mine = alice.message("hello from the browser")
        await expect(mine).to_have_attribute("data-status", "delivered")
        await carol.mark_read(reply.server_msg_id)
        await expect(mine).to_have_attribute("data-status", "read")


async def test_an_offline_browser_catches_up_exactly_once_in_order(server: RunningServer, pages: Any) -> None:
    await register(server, "alice")
    await register(server, "bob")
    alice, bob = await pages(), await pages(cuttable=True)
    await alice.login("alice")
    await bob.login("bob")
    await alice.chat_with("bob")
    await alice.send("before")
    await expect(bob.unread("user:alice")).to_have_text("1")
    await bob.open_conversation("user:alice")
    await expect(bob.message("before")).to_have_count(1)

    await bob.go_offline()
    await expect(bob.connection).not_to_have_text("online")
    sent = [f"while you were away {n}" for n in range(1, 6)]
    for text in sent:
        await alice.send(text)
    for text in sent:
        await expect(alice.message(text)).to_have_attribute("data-status", "sent")
    await expect(bob.messages).to_have_count(1)

    await bob.go_online()
    await expect(bob.connection).to_have_text("online")
    await expect(bob.messages).to_have_count(6)
    assert bob.connects == 2  # the page really lost its connection and made a new one
    assert await bob.texts() == ["before", *sent]
    for text in sent:  # bob's page was open on the chat: they are read once they arrive
        await expect(alice.message(text)).to_have_attribute("data-status", "read")

    # A reload replays nothing twice: history and the stream merge by message id.
    await bob.page.reload()
    await expect(bob.connection).to_have_text("online")
    await expect(bob.messages).to_have_count(6)
    assert await bob.texts() == ["before", *sent]


async def test_a_group_chat_between_two_browsers(server: RunningServer, pages: Any) -> None:
    await register(server, "alice")
    await register(server, "bob")
    alice, bob = await pages(), await pages()
    await alice.login("alice")
    await bob.login("bob")
    conversation_id = await alice.create_group("Weekend trip", "bob")
    assert re.fullmatch(r"group:g[0-9a-f]{16}", conversation_id)

    await alice.send("who brings the tent?")
    await expect(bob.unread(conversation_id)).to_have_text("1")
    await expect(bob.conversation(conversation_id)).to_contain_text("Weekend trip")
    await bob.open_conversation(conversation_id)
    await expect(bob.message("who brings the tent?")).to_have_count(1)
    await expect(alice.message("who brings the tent?")).to_have_attribute("data-status", "read")
    await bob.send("I do")
    await expect(alice.message("I do")).to_have_count(1)
    await expect(bob.message("I do")).to_have_attribute("data-status", "read")


async def test_several_tabs_of_one_browser_each_chat_as_their_own_device(server: RunningServer, pages: Any) -> None:
    """Each tab takes a device id no other open tab holds (a Web Lock per id): both stay online,
    both get every message, and a closed tab's id is taken again by the next one."""
    await register(server, "alice")
    await register(server, "bob")
    alice = await pages()
    await alice.login("alice")
    second = ChatPage(alice.context, await alice.context.new_page(), alice.base_url)
    await second.page.goto(alice.base_url)
    await expect(second.connection).to_have_text("online")  # logged in already: the same browser
    first_device = await alice.page.evaluate("state.device")
    second_device = await second.page.evaluate("state.device")
    assert first_device != second_device
    bob = await pages()
    await bob.login("bob")
    await bob.chat_with("alice")
    await bob.send("to every tab")
    for tab in (alice, second):
        await expect(tab.unread("user:bob")).to_have_text("1")
    await second.open_conversation("user:bob")
    await second.send("from the second tab")
    await alice.open_conversation("user:bob")
    await expect(alice.message("from the second tab")).to_have_count(1)
    await expect(alice.connection).to_have_text("online")
    await expect(second.connection).to_have_text("online")
    assert alice.connects == 1 and second.connects == 1  # neither took the other's connection over
    await second.page.close()
    third = ChatPage(alice.context, await alice.context.new_page(), alice.base_url)
    await third.page.goto(alice.base_url)
    await expect(third.connection).to_have_text("online")
    assert await third.page.evaluate("state.device") == second_device  # ids are reused, not piled up
    assert second.console_errors == [] and third.console_errors == []


# What a page served over plain http from another host sees: no Web Crypto (secure contexts only).
NO_WEB_CRYPTO = "Object.defineProperty(Crypto.prototype, 'subtle', { get() { return undefined; } });"


@pytest.mark.parametrize("engine", ["webcrypto", "js"])
async def test_forged_events_are_ignored_and_the_real_ones_show(server: RunningServer, pages: Any, engine: str) -> None:
    """Forged alice messages at seqs 1-3 reach bob's page (as a Last Will once delivered them);
    its check of the sig drops them, with Web Crypto or with origin.js's own HMAC."""
    alice_token = await register(server, "alice")
    await register(server, "bob")
    bob = await pages(init_script=NO_WEB_CRYPTO if engine == "js" else None)
    await bob.login("bob")
    assert await bob.page.evaluate("state.verify.engine") == engine
    await bob.chat_with("alice")  # open: accepted forgeries would show here at once
    forged = [
        json.dumps({
            "type": "new_message", "seq": seq, "server_msg_id": 9000 + seq, "client_msg_id": f"forged-{seq}",
            "from_user": "alice", "to_user": "bob", "content": f"forged {seq}", "msg_type": "text",
            "created_at": "2026-01-01T00:00:00.000Z", **({"sig": "A" * 43} if seq % 2 else {}),
        }, separators=(",", ":"))
        for seq in (1, 2, 3)
    ]  # fmt: skip
    page = {"type": "sync_response", "events": [json.loads(f) for f in forged], "latest_seq": 3, "has_more": False}
    rejected = await bob.page.evaluate(
        """async ([stream, device]) => {
            const bytes = (text) => new TextEncoder().encode(text);
            const emit = (topic, payload) => state.mqtt.emit("message", topic, bytes(payload), {});
            for (const payload of stream) emit("chat/user/bob", payload);
            for (const payload of device) emit(`chat/device/bob/${state.device}`, payload);
            await state.inbound;
            return { rejected: state.rejected, cursor: state.cursor };
        }""",
        [forged, [json.dumps(page)]],
    )
    assert rejected == {
        "rejected": {"stream: bad signature": 2, "stream: unsigned": 1, "device: unsigned": 1},
        "cursor": 0,
    }
    await expect(bob.messages).to_have_count(0)

    real = [f"real {n}" for n in (1, 2, 3)]
    async with http_client(server, alice_token) as http:
        acks = []
        for n, text in enumerate(real):
            sent = await http.post("/v1/messages", json={"client_msg_id": f"m{n}", "to_user": "bob", "content": text})
            assert sent.status_code == 200, sent.text
            acks.append(sent.json())
        await expect(bob.messages).to_have_count(3)
        assert await bob.texts() == real  # once each, and nothing forged
        # bob's page acked (and read) them: the last one's receipt shows it delivered.
        async with asyncio.timeout(20):
            while True:
                receipts = (await http.get(f"/v1/messages/{acks[-1]['server_msg_id']}/receipts")).json()["receipts"]
                if [r["delivered_at"] is not None for r in receipts if r["user_id"] == "bob"] == [True]:
                    break
                await asyncio.sleep(0.1)
