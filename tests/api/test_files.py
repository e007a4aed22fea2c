"""Attachments: upload, send over MQTT and HTTP, download with ranges, thumbnails, refusals, collection.

Against a real server, over SQLite and PostgreSQL (the ``server`` fixture).
"""

from __future__ import annotations

import io
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from PIL import Image

from mqchat.bridge.files import detect_type, safe_name
from mqchat.config import Settings
from mqchat.runner import RunningServer, run_server
from tests.support.accounts import http_client, register
from tests.support.devices import connect_device


def png(width: int = 40, height: int = 30, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, "PNG")
    return out.getvalue()


async def upload(
    http: httpx.AsyncClient, data: bytes, name: str = "photo.png", claimed: str = "image/png"
) -> httpx.Response:
    return await http.post("/v1/files", files={"file": (name, data, claimed)})


def stored_files(settings: Settings) -> list[Path]:
    root = settings.resolved_files_dir()
    return [p for p in root.rglob("*") if p.is_file() and "thumbs" not in p.parts] if root.exists() else []


async def test_an_image_is_uploaded_sent_over_mqtt_and_downloaded_by_the_peer(
    server: RunningServer, settings: Settings
) -> None:
    alice, bob = await register(server, "alice"), await register(server, "bob")
    image = png(40, 30)
    async with http_client(server, alice) as http:
        answer = await upload(http, image, name="../../etc/holiday.png", claimed="text/html")
    assert answer.status_code == 201, answer.text
    meta = answer.json()
    # The type comes from the bytes, the name loses its directories, the size and dimensions are measured.
    assert meta["content_type"] == "image/png" and meta["name"] == "holiday.png"
    assert (meta["size"], meta["width"], meta["height"]) == (len(image), 40, 30)

    async with connect_device(server, "alice", "phone", alice) as phone, connect_device(server, "bob", "pc", bob) as pc:
        await phone.publish(
            {"type": "send_message", "client_msg_id": "m-1", "to_user": "bob", "content": "", "attachment": meta["id"]}
        )
        ack = await phone.next("message_ack")
        message = await pc.next("new_message")
    assert message["msg_type"] == "image"  # labelled by the file when the sender left the default
    assert message["attachment"] == {k: meta[k] for k in ("id", "name", "size", "content_type", "width", "height")}
    assert "content" in message and message["content"] == ""

    async with http_client(server, bob) as http:
        whole = await http.get(f"/v1/files/{meta['id']}")
        assert whole.status_code == 200 and whole.content == image
        assert whole.headers["content-type"] == "image/png" and whole.headers["accept-ranges"] == "bytes"
        assert "holiday.png" in whole.headers["content-disposition"]
        part = await http.get(f"/v1/files/{meta['id']}", headers={"Range": "bytes=8-15"})
        assert part.status_code == 206 and part.content == image[8:16]
        assert part.headers["content-range"] == f"bytes 8-15/{len(image)}"
        tail = await http.get(f"/v1/files/{meta['id']}", headers={"Range": "bytes=-4"})
        assert tail.status_code == 206 and tail.content == image[-4:]
        beyond = await http.get(f"/v1/files/{meta['id']}", headers={"Range": f"bytes={len(image)}-"})
        assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(image)}"
        thumb = await http.get(f"/v1/files/{meta['id']}/thumbnail")
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(thumb.content)).size == (40, 30)  # never enlarged
        history = await http.get("/v1/conversations/user:alice/messages")
        assert history.json()["messages"][0]["attachment"]["id"] == meta["id"]
    assert ack["server_msg_id"] == message["server_msg_id"]


async def test_only_the_uploader_and_the_conversation_may_download(server: RunningServer) -> None:
    alice, bob, eve = [await register(server, name) for name in ("alice", "bob", "eve")]
    async with http_client(server, alice) as http:
        meta = (await upload(http, png())).json()
        # Before it is sent, only the uploader can read it.
        assert (await http.get(f"/v1/files/{meta['id']}")).status_code == 200
    for token in (bob, eve):
        async with http_client(server, token) as http:
            refused = await http.get(f"/v1/files/{meta['id']}")
            assert refused.status_code == 404 and refused.json()["error"]["code"] == "unknown_file"
    async with http_client(server, alice) as http:
        sent = await http.post("/v1/messages", json={"client_msg_id": "f1", "to_user": "bob", "attachment": meta["id"]})
        assert sent.status_code == 200, sent.text
    async with http_client(server, bob) as http:
        assert (await http.get(f"/v1/files/{meta['id']}")).status_code == 200
    async with http_client(server, eve) as http:
        assert (await http.get(f"/v1/files/{meta['id']}")).status_code == 404
        assert (await http.get(f"/v1/files/{meta['id']}/thumbnail")).status_code == 404


async def test_group_members_at_the_time_of_the_message_may_download(server: RunningServer) -> None:
    alice, bob, carol = [await register(server, name) for name in ("alice", "bob", "carol")]
    async with http_client(server, alice) as http:
        group = (await http.post("/v1/groups", json={"name": "Trip", "members": ["bob"]})).json()
        meta = (await upload(http, b"%PDF-1.4\n% a tiny pdf\n", name="plan.pdf")).json()
        assert meta["content_type"] == "application/pdf" and "width" not in meta
        sent = await http.post(
            "/v1/messages",
            json={
                "client_msg_id": "g1",
                "group_id": group["group_id"],
                "content": "the plan",
                "attachment": meta["id"],
            },
        )
        assert sent.status_code == 200, sent.text
        # carol joins after the message: it is not in her stream, so neither is the file.
        assert (
            await http.post(f"/v1/groups/{group['group_id']}/members", json={"user_id": "carol"})
        ).status_code == 204
    async with http_client(server, bob) as http:
        got = await http.get(f"/v1/files/{meta['id']}")
        assert got.status_code == 200 and got.headers["content-disposition"].startswith("attachment;")
        assert (await http.get(f"/v1/files/{meta['id']}/thumbnail")).json()["error"]["code"] == "unsupported_file_type"
    async with http_client(server, carol) as http:
        assert (await http.get(f"/v1/files/{meta['id']}")).status_code == 404


async def test_someone_elses_file_in_a_message_is_refused_clearly(server: RunningServer) -> None:
    alice, bob = await register(server, "alice"), await register(server, "bob")
    async with http_client(server, alice) as http:
        meta = (await upload(http, png())).json()
    async with http_client(server, bob) as http:
        refused = await http.post(
            "/v1/messages", json={"client_msg_id": "x", "to_user": "alice", "attachment": meta["id"]}
        )
        assert refused.status_code == 404
        error = refused.json()["error"]
        assert error["code"] == "unknown_file" and "not a file you uploaded" in error["message"]
        missing = await http.post("/v1/messages", json={"client_msg_id": "y", "to_user": "alice", "attachment": "nope"})
        assert missing.json()["error"]["code"] == "unknown_file"
        empty = await http.post("/v1/messages", json={"client_msg_id": "z", "to_user": "alice", "content": ""})
        assert empty.status_code == 422
    async with connect_device(server, "bob", "pc", bob) as pc:
        await pc.publish({"type": "send_message", "client_msg_id": "m", "to_user": "alice", "attachment": meta["id"]})
        error = await pc.next("error")
        assert error["code"] == "unknown_file" and error["ref"] == "m"


async def test_oversized_and_wrong_type_uploads_are_refused_and_leave_nothing(
    tmp_path: Path, database_url: str
) -> None:
    settings = Settings.load(
        None,
        data_dir=tmp_path / "data",
        database_url=database_url,
        mqtt={"host": "127.0.0.1", "port": 0, "ws_port": 0},
        http={"host": "127.0.0.1", "port": 0},
        files={"max_bytes": 4096, "allowed_types": ["image/png", "text/plain"]},
    )
    async with run_server(settings) as server:
        alice = await register(server, "alice")
        async with http_client(server, alice) as http:
            big = await upload(http, os.urandom(5000), name="big.bin")
            assert big.status_code == 413 and big.json()["error"]["code"] == "file_too_large"

            async def chunked() -> object:
                yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n\r\n'
                for _ in range(10):
                    yield b"x" * 1000
                yield b"\r\n--b--\r\n"

            streamed = await http.post(
                "/v1/files", content=chunked(), headers={"Content-Type": "multipart/form-data; boundary=b"}
            )
            assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "file_too_large"
            pdf = await upload(http, b"%PDF-1.7\n...", name="x.pdf", claimed="image/png")
            assert pdf.status_code == 415 and pdf.json()["error"]["code"] == "unsupported_file_type"
            binary = await upload(http, b"\x00\x01\x02garbage", name="x.png")
            assert binary.status_code == 415
            fake_png = await upload(http, b"\x89PNG\r\n\x1a\n" + b"not really", name="fake.png")
            assert fake_png.status_code == 415 and "image" in fake_png.json()["error"]["message"]
            no_part = await http.post("/v1/files", files={"other": ("a.txt", b"hello", "text/plain")})
            assert no_part.status_code == 422
            assert stored_files(settings) == []  # nothing kept, not even a staging file
            text = await upload(http, "héllo\n".encode(), name="note.txt", claimed="application/octet-stream")
            assert text.status_code == 201 and text.json()["content_type"] == "text/plain"
            assert len(stored_files(settings)) == 1


async def test_uploads_never_sent_are_collected_and_sent_ones_kept(server: RunningServer, settings: Settings) -> None:
    alice = await register(server, "alice")
    await register(server, "bob")
    async with http_client(server, alice) as http:
        kept = (await upload(http, png(color=(1, 2, 3)))).json()
        same_bytes = (await upload(http, png(color=(1, 2, 3)))).json()
        dropped = (await upload(http, png(color=(9, 9, 9)))).json()
        await http.post("/v1/messages", json={"client_msg_id": "k", "to_user": "bob", "attachment": kept["id"]})
        assert len(stored_files(settings)) == 2  # identical bytes are kept once
        files = server.services.files
        assert await files.collect_unsent() == 0  # nothing is old enough yet
        later = datetime.now(UTC) + timedelta(seconds=settings.files.unsent_ttl_seconds + 1)
        assert await files.collect_unsent(now=later) == 2
        assert (await http.get(f"/v1/files/{kept['id']}")).status_code == 200
        assert (await http.get(f"/v1/files/{dropped['id']}")).status_code == 404
        assert (await http.get(f"/v1/files/{same_bytes['id']}")).status_code == 404
        assert len(stored_files(settings)) == 1  # the shared bytes stay for the sent copy


async def test_a_recalled_message_no_longer_shares_its_file(server: RunningServer) -> None:
    alice, bob = await register(server, "alice"), await register(server, "bob")
    async with http_client(server, alice) as http:
        meta = (await upload(http, png())).json()
        ack = (
            await http.post("/v1/messages", json={"client_msg_id": "r", "to_user": "bob", "attachment": meta["id"]})
        ).json()
        assert (await http.post(f"/v1/messages/{ack['server_msg_id']}/recall")).status_code == 204
    async with http_client(server, bob) as http:
        assert (await http.get(f"/v1/files/{meta['id']}")).status_code == 404
        page = (await http.get("/v1/conversations/user:alice/messages")).json()
        assert "attachment" not in page["messages"][0] or page["messages"][0]["attachment"] is None


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"\x89PNG\r\n\x1a\n....", "image/png"),
        (b"\xff\xd8\xff\xe0", "image/jpeg"),
        (b"GIF89a", "image/gif"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image/webp"),
        (b"%PDF-1.5", "application/pdf"),
        (b"\x00\x00\x00\x18ftypmp42", "video/mp4"),
        (b"PK\x03\x04", "application/zip"),
        (b"<html><script>", None),
    ],
)
def test_types_are_detected_from_the_bytes(head: bytes, expected: str | None) -> None:
    assert detect_type(head) == expected


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\me\\photo.jpg", "photo.jpg"),
        ("a\x00b\nc.txt", "abc.txt"),
        ("..", "file"),
        (".hidden", "hidden"),
        ("", "file"),
        ("x" * 300 + ".png", "x" * 251 + ".png"),
    ],
)
def test_file_names_lose_paths_and_control_characters(given: str, kept: str) -> None:
    assert safe_name(given) == kept
