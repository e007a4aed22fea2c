"""What a person sees and does on the browser page: layout from a phone to a desktop, times, names,
errors in words, typing, presence, recall, group members, history, images and files (Chromium)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import Connection, update

from mqchat.bridge.tables import messages
from mqchat.runner import RunningServer
from tests.clients.test_browser import (  # noqa: F401 (fixtures)
    ChatPage,
    database_url,
    pages,
)
from tests.support.accounts import http_client, register

with contextlib.suppress(ImportError):  # the fixtures report it
    from playwright.async_api import Locator, expect

pytestmark = pytest.mark.browser

PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 800}


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (40, 120, 200)).save(out, "PNG")
    return out.getvalue()


async def send_http(server: RunningServer, token: str, cid: str, **target: Any) -> dict[str, Any]:
    async with http_client(server, token) as http:
        sent = await http.post("/v1/messages", json={"client_msg_id": cid, **target})
        assert sent.status_code == 200, sent.text
        return dict(sent.json())


async def backdate(server: RunningServer, message_id: int, days: int) -> None:
    moment = datetime.now(UTC) - timedelta(days=days)

    def txn(conn: Connection) -> None:
        conn.execute(update(messages).where(messages.c.id == message_id).values(created_at=moment))

    await server.services.store.database.run("backdate", txn, write=True)  # type: ignore[attr-defined]


async def natural_width(image: Locator, at_least: int = 1) -> int:
    """The image's decoded width, once it has one."""
    async with asyncio.timeout(20):
        while True:
            width = int(await image.evaluate("img => img.naturalWidth"))
            if width >= at_least:
                return width
            await asyncio.sleep(0.1)


async def fits(chat: ChatPage, width: int) -> None:
    """Nothing wider than the screen: no sideways scrolling."""
    scroll_width = await chat.page.evaluate("document.scrollingElement.scrollWidth")
    assert scroll_width <= width, f"the page is {scroll_width}px wide on a {width}px screen"


async def test_from_a_phone_to_a_desktop_with_screenshots(server: RunningServer, pages: Any, tmp_path: Path) -> None:
    await register(server, "alice")
    bob_token = await register(server, "bob")
    await send_http(server, bob_token, "b1", to_user="alice", content="Are we still on for Saturday? " * 3)
    alice = await pages()
    await alice.login("alice")
    await alice.open_conversation("user:bob")
    await alice.send("Yes! Bringing the tent.")
    await expect(alice.message("Yes! Bringing the tent.")).to_have_attribute("data-status", "sent")

    await alice.page.set_viewport_size(DESKTOP)
    await alice.page.screenshot(path=tmp_path / "desktop-1280.png")
    # The list and the conversation side by side.
    await expect(alice.testid("conversations")).to_be_visible()
    await expect(alice.testid("composer-input")).to_be_visible()
    await expect(alice.testid("back")).to_be_hidden()
    await fits(alice, DESKTOP["width"])

    await alice.page.set_viewport_size(PHONE)
    await alice.page.screenshot(path=tmp_path / "phone-390-conversation.png")
    # One thing at a time on a phone: the open conversation, its message box on screen.
    await expect(alice.testid("conversations")).to_be_hidden()
    box = await alice.testid("composer-input").bounding_box()
    assert box is not None and box["y"] + box["height"] <= PHONE["height"] and box["x"] >= 0
    await fits(alice, PHONE["width"])
    # An error floats over the page and leaves the message box where it was.
    await alice.page.evaluate("showError('Cannot reach the server. Check your connection and try again.')")
    await expect(alice.testid("error")).to_be_visible()
    await alice.page.screenshot(path=tmp_path / "phone-390-error.png")
    after = await alice.testid("composer-input").bounding_box()
    assert after == box
    await alice.testid("error").click()
    await alice.testid("back").click()
    await expect(alice.testid("conversations")).to_be_visible()
    await expect(alice.testid("conversation")).to_be_hidden()
    await alice.page.screenshot(path=tmp_path / "phone-390-list.png")
    await fits(alice, PHONE["width"])
    await alice.open_conversation("user:bob")
    await expect(alice.testid("composer-input")).to_be_visible()


async def test_times_day_separators_and_names_only_where_they_help(
    server: RunningServer, pages: Any, tmp_path: Path
) -> None:
    alice_token = await register(server, "alice")
    bob_token = await register(server, "bob")
    carol_token = await register(server, "carol")
    async with http_client(server, alice_token) as http:
        group = (await http.post("/v1/groups", json={"name": "Trip", "members": ["bob", "carol"]})).json()
    gid = group["group_id"]
    old = await send_http(server, bob_token, "g0", group_id=gid, content="last week's plan")
    await backdate(server, old["server_msg_id"], days=8)
    await send_http(server, bob_token, "g1", group_id=gid, content="first")
    await send_http(server, bob_token, "g2", group_id=gid, content="second")
    await send_http(server, carol_token, "g3", group_id=gid, content="third")
    await send_http(server, alice_token, "g4", group_id=gid, content="mine")
    await send_http(server, carol_token, "g5", group_id=gid, content="fifth")
    await send_http(server, bob_token, "d1", to_user="alice", content="just us")

    alice = await pages()
    await alice.page.set_viewport_size(DESKTOP)
    await alice.login("alice")
    await alice.open_conversation(f"group:{gid}")
    await expect(alice.messages).to_have_count(6)
    separators = await alice.testid("day-separator").all_inner_texts()
    assert len(separators) == 2 and separators[1] == "Today" and separators[0] not in ("Today", "Yesterday")
    # A name starts each run of someone else's messages (again after a day separator); never on mine.
    names = [await m.get_by_test_id("message-from").all_inner_texts() for m in await alice.messages.all()]
    assert names == [["bob"], ["bob"], [], ["carol"], [], ["carol"]]
    times = await alice.testid("message-time").all_inner_texts()
    assert len(times) == 6 and all(len(t) >= 4 and ":" in t for t in times)
    await alice.page.screenshot(path=tmp_path / "group-names-and-days.png")

    await alice.open_conversation("user:bob")
    await expect(alice.messages).to_have_count(1)
    assert await alice.testid("message-from").count() == 0  # one person: no names at all


async def test_errors_in_words_and_an_unknown_user_refused_at_once(server: RunningServer, pages: Any) -> None:
    await register(server, "alice")
    alice = await pages()
    await alice.login("alice")
    await alice.testid("new-chat-user").fill("nobody")
    await alice.testid("new-chat-submit").click()
    await expect(alice.testid("error")).to_have_text("There is no user called nobody.")
    await expect(alice.conversation("user:nobody")).to_have_count(0)
    await expect(alice.testid("conversation")).to_be_hidden()
    await alice.testid("new-chat-user").fill("not a name")
    await alice.testid("new-chat-submit").click()
    await expect(alice.testid("error")).to_contain_text("A user name has 1 to 64 letters")
    await alice.chat_with("alice")  # a note to self is fine
    alice.console_errors = [e for e in alice.console_errors if "404" not in e]  # the refused GET /v1/users/nobody


async def test_a_call_the_server_never_answers_ends_in_words_not_a_spinner(server: RunningServer, pages: Any) -> None:
    await register(server, "alice")
    await register(server, "bob")
    alice = await pages()
    await alice.login("alice")
    stop = asyncio.Event()

    async def never_answer(route: Any) -> None:
        await stop.wait()
        with contextlib.suppress(Exception):  # the page gave up on it already
            await route.abort()

    await alice.page.route("**/v1/users/bob", never_answer)
    await alice.page.clock.install()  # the page's timers from now on run on the test's clock
    try:
        await alice.testid("new-chat-user").fill("bob")
        await alice.testid("new-chat-submit").click()
        await alice.page.clock.fast_forward(29_000)
        await expect(alice.testid("error")).to_be_hidden()  # a slow answer is still awaited
        await alice.page.clock.fast_forward(2_000)  # past the page's 30 s
        await expect(alice.testid("error")).to_have_text("The server did not answer in time. Try again.")
        await expect(alice.conversation("user:bob")).to_have_count(0)
    finally:
        stop.set()
    await alice.page.unroute("**/v1/users/bob")
    await alice.chat_with("bob")  # the next call goes through


async def test_typing_and_presence(server: RunningServer, pages: Any) -> None:
    await register(server, "alice")
    await register(server, "bob")
    alice, bob = await pages(), await pages()
    await alice.login("alice")
    await bob.login("bob")
    await alice.chat_with("bob")
    await alice.send("hi")
    await bob.open_conversation("user:alice")
    status = alice.testid("conversation-status")
    await expect(status).to_have_text("online")  # bob's presence, live
    await bob.testid("composer-input").press_sequentially("on my w")
    await expect(status).to_have_text("typing…")
    await bob.testid("composer-input").press("Enter")
    await expect(alice.message("on my w")).to_have_count(1)
    await expect(status).to_have_text("online")  # his message ends his typing
    await bob.close()
    await expect(status).to_contain_text("last seen today at")


async def test_recall_within_the_window(server: RunningServer, pages: Any) -> None:
    await register(server, "alice")
    await register(server, "bob")
    alice, bob = await pages(), await pages()
    await alice.login("alice")
    await bob.login("bob")
    await alice.chat_with("bob")
    await alice.send("oops, wrong chat")
    await bob.open_conversation("user:alice")
    await expect(bob.message("oops, wrong chat")).to_have_count(1)
    assert await bob.testid("recall").count() == 0  # not on someone else's message
    await alice.message("oops, wrong chat").get_by_test_id("recall").click()
    await expect(alice.message("(message recalled)")).to_have_count(1)
    await expect(bob.message("(message recalled)")).to_have_count(1)
    await expect(bob.message("oops, wrong chat")).to_have_count(0)
    await expect(alice.testid("recall")).to_have_count(0)


async def test_group_creation_and_membership(server: RunningServer, pages: Any) -> None:
    for name in ("alice", "bob", "carol"):
        await register(server, name)
    alice, bob, carol = await pages(), await pages(), await pages()
    for chat, name in ((alice, "alice"), (bob, "bob"), (carol, "carol")):
        await chat.login(name)
    cid = await alice.create_group("Book club", "bob")
    await alice.testid("members-toggle").click()
    members = alice.testid("member-list").get_by_test_id("member")
    await expect(members).to_have_count(2)
    await alice.testid("member-add-user").fill("carol")
    await alice.testid("member-add-submit").click()
    await expect(members).to_have_count(3)
    await expect(carol.conversation(cid)).to_contain_text("Book club")
    await expect(alice.testid("leave-group")).to_be_hidden()  # the owner cannot leave

    await alice.page.locator('[data-testid="member"][data-user="carol"]').get_by_test_id("member-remove").click()
    await expect(members).to_have_count(2)
    await expect(carol.conversation(cid)).to_have_count(0)  # removed: the group leaves her list
    await expect(carol.testid("error")).to_have_text("alice removed you from Book club.")

    await bob.open_conversation(cid)
    await bob.testid("members-toggle").click()
    await expect(bob.testid("member-remove")).to_have_count(0)  # only the owner removes
    await bob.testid("leave-group").click()
    await expect(bob.conversation(cid)).to_have_count(0)
    await expect(bob.testid("conversation")).to_be_hidden()
    await expect(members).to_have_count(1)
    await expect(alice.testid("conversation-status")).to_have_text("1 members")


async def test_an_older_refresh_that_answers_last_does_not_undo_a_member_change(
    server: RunningServer, pages: Any
) -> None:
    for name in ("alice", "bob", "carol"):
        await register(server, name)
    alice = await pages()
    await alice.login("alice")
    cid = await alice.create_group("Book club", "bob")
    await alice.testid("members-toggle").click()
    members = alice.testid("member-list").get_by_test_id("member")
    await expect(members).to_have_count(2)

    # A background refresh reads the group before carol is added and answers only afterwards.
    read, release, answered = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def hold_once(route: Any) -> None:
        if route.request.method != "GET" or read.is_set():
            await route.continue_()
            return
        stale = await route.fetch()
        read.set()
        await release.wait()
        await route.fulfill(response=stale)
        answered.set()

    await alice.page.route("**/v1/groups", hold_once)
    await alice.page.evaluate("refreshInBackground()")
    await asyncio.wait_for(read.wait(), 10)
    await alice.testid("member-add-user").fill("carol")
    await alice.testid("member-add-submit").click()
    await expect(members).to_have_count(3)
    await alice.page.wait_for_timeout(1000)  # the refresh carol's member event asks for, too
    release.set()
    await asyncio.wait_for(answered.wait(), 10)
    await alice.page.wait_for_timeout(500)  # time for the page to apply the stale answer, if it would
    await expect(members).to_have_count(3)
    assert await alice.conversation(cid).count() == 1


async def test_scrolling_back_through_all_of_history(server: RunningServer, pages: Any) -> None:
    await register(server, "alice")
    bob_token = await register(server, "bob")
    texts = [f"message {n:03}" for n in range(130)]
    async with http_client(server, bob_token) as http:
        for n, text in enumerate(texts):
            sent = await http.post("/v1/messages", json={"client_msg_id": f"h{n}", "to_user": "alice", "content": text})
            assert sent.status_code == 200
    alice = await pages()
    await alice.login("alice")
    await alice.open_conversation("user:bob")
    await expect(alice.messages).to_have_count(50)  # the newest page, scrolled to the end
    assert (await alice.texts())[-1] == "message 129"
    for expected in (100, 130):
        await alice.testid("messages").evaluate("list => { list.scrollTop = 0; }")
        await expect(alice.messages).to_have_count(expected)
    assert await alice.texts() == texts  # everything, in order, each once
    await expect(alice.testid("load-older")).to_have_count(0)  # nothing older left


async def test_images_and_files_upload_preview_and_download(server: RunningServer, pages: Any, tmp_path: Path) -> None:
    await register(server, "alice")
    await register(server, "bob")
    alice, bob = await pages(), await pages()
    await alice.login("alice")
    await bob.login("bob")
    await alice.chat_with("bob")
    await alice.testid("attach-input").set_input_files(
        [
            {"name": "beach.png", "mimeType": "image/png", "buffer": png(640, 480)},
            {"name": "packing list.txt", "mimeType": "text/plain", "buffer": b"tent\nstove\n"},
        ]
    )
    await bob.open_conversation("user:alice")
    preview = bob.testid("attachment-preview")
    await expect(preview).to_have_count(1)
    await expect(preview).to_have_attribute("src", re.compile(r"^blob:"))
    assert await natural_width(preview) == 320  # the thumbnail (files.thumbnail_px), not the whole image
    assert await preview.get_attribute("width") == "240"  # scaled to fit, from the server's dimensions
    await bob.page.screenshot(path=tmp_path / "image-and-file.png")

    await bob.testid("attachment-image").click()
    await expect(bob.testid("viewer")).to_be_visible()
    assert await natural_width(bob.testid("viewer-image")) == 640
    await bob.testid("viewer-close").click()

    link = bob.testid("attachment-file")
    await expect(link).to_have_text("packing list.txt · 11 B")
    async with bob.page.expect_download() as download_info:
        await link.click()
    download = await download_info.value
    assert download.suggested_filename == "packing list.txt"
    saved = tmp_path / "saved.txt"
    await download.save_as(saved)
    assert saved.read_bytes() == b"tent\nstove\n"

    # Refusals in words; nothing is sent.
    await alice.testid("attach-input").set_input_files(
        [{"name": "tool.exe", "mimeType": "image/png", "buffer": b"MZ\x90\x00 not an image"}]
    )
    await expect(alice.testid("error")).to_contain_text("That kind of file cannot be sent")
    await expect(alice.messages).to_have_count(2)
    alice.console_errors = [e for e in alice.console_errors if "415" not in e]
