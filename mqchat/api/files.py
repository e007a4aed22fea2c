"""``POST /v1/files``, ``GET /v1/files/{id}`` (with ranges) and ``GET /v1/files/{id}/thumbnail``.

The upload is ``multipart/form-data`` with one part named ``file``; it is parsed as it arrives
(python-multipart's streaming parser) and handed piece by piece to ``Attachments.upload``,
which writes it to a staging file: a file is never held in memory whole. ``BodySizeLimit``
lets this one path through unbuffered, with ``files.max_bytes`` as its limit.
"""

from __future__ import annotations

import asyncio
import re
import urllib.parse
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import FastAPI, Header, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header

from mqchat.api.deps import ServicesDep, UserDep
from mqchat.api.errors import error_body
from mqchat.bridge.files import IMAGE_TYPES
from mqchat.bridge.store import StoredFile
from mqchat.core.errors import FileTooLarge, InvalidCommand
from mqchat.core.protocol import Attachment

UPLOAD_PATH = "/v1/files"
MULTIPART_OVERHEAD = 16 * 1024
"""Bytes a multipart body may carry besides the file (boundaries, part headers)."""
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_DRAIN_CAP = 1024 * 1024


class FilePublic(Attachment):
    """An uploaded file: put its ``id`` in a message's ``attachment``."""


def _public(record: StoredFile) -> FilePublic:
    return FilePublic(**record.public().model_dump())


class _Parts:
    """Feeds a multipart body to the parser and yields the bytes of the part named ``file``."""

    def __init__(self, content_type: str) -> None:
        kind, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise InvalidCommand("send the file as multipart/form-data, in a part named 'file'")
        self.filename: str | None = None
        self.found = False
        self._header = b""
        self._value = b""
        self._headers: dict[bytes, bytes] = {}
        self._in_file = False
        self._done_file = False
        self._out: list[bytes] = []
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._begin,
                "on_header_field": lambda d, s, e: self._add("_header", d[s:e]),
                "on_header_value": lambda d, s, e: self._add("_value", d[s:e]),
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_done,
                "on_part_data": self._data,
                "on_part_end": self._end,
            },
        )

    def _add(self, name: str, data: bytes) -> None:
        setattr(self, name, getattr(self, name) + data)

    def _begin(self) -> None:
        self._headers = {}

    def _header_end(self) -> None:
        self._headers[self._header.lower()] = self._value
        self._header = self._value = b""

    def _headers_done(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if options.get(b"name") == b"file" and not self._done_file:
            self._in_file = self.found = True
            raw = options.get(b"filename")
            self.filename = raw.decode("utf-8", "replace") if raw is not None else None

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self._out.append(data[start:end])

    def _end(self) -> None:
        if self._in_file:
            self._in_file, self._done_file = False, True

    async def file_bytes(self, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in body:
            self._parser.write(chunk)
            if self._out:
                pieces, self._out = self._out, []
                for piece in pieces:
                    yield piece
        self._parser.finalize()
        if not self.found:
            raise InvalidCommand("the multipart body has no part named 'file'")


def _content_disposition(record: StoredFile) -> str:
    # Images are shown in place; anything else is only ever saved, never rendered by a browser.
    kind = "inline" if record.content_type in IMAGE_TYPES else "attachment"
    ascii_name = record.name.encode("ascii", "replace").decode().replace('"', "_").replace("\\", "_")
    return f"{kind}; filename=\"{ascii_name}\"; filename*=UTF-8''{urllib.parse.quote(record.name)}"


def _range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """``(start, end)`` (end exclusive) for a single satisfiable range; None to serve the
    whole file (no header, or one this server does not do: several ranges); ``"unsatisfiable"``."""
    if header is None:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if first == "" and last == "":
        return None
    if first == "":  # the last N bytes
        count = int(last)
        if count == 0:
            return "unsatisfiable"
        return max(0, size - count), size
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if start >= size or end <= start:
        return "unsatisfiable"
    return start, end


def install_file_routes(app: FastAPI) -> None:
    @app.post(
        UPLOAD_PATH,
        status_code=201,
        tags=["files"],
        response_model_exclude_none=True,
        responses={
            413: {"description": "Larger than files.max_bytes (file_too_large)"},
            415: {"description": "Not one of files.allowed_types, by its bytes (unsupported_file_type)"},
        },
    )
    async def upload(request: Request, user: UserDep, services: ServicesDep) -> FilePublic:
        """Upload a file (``multipart/form-data``, one part named ``file``). Its type is detected
        from its bytes; the name is kept without any directory part. Send it with a message's
        ``attachment``; an upload no message carries is deleted after ``files.unsent_ttl_seconds``."""
        parts = _Parts(request.headers.get("content-type", ""))
        settings = services.settings.files
        body = request.stream()
        try:
            async with asyncio.timeout(settings.upload_timeout_seconds):
                record = await services.files.upload(user, parts.file_bytes(body), name=lambda: parts.filename)
        except TimeoutError:
            limit = settings.upload_timeout_seconds
            answer = error_body("request_timeout", f"the upload did not arrive within {limit:g} s")
            return JSONResponse(answer, status_code=408, headers={"Connection": "close"})  # type: ignore[return-value]
        except FileTooLarge:
            await _drain(body)
            raise
        return _public(record)

    @app.get("/v1/files/{file_id}", tags=["files"], response_class=StreamingResponse)
    async def download(
        file_id: str,
        user: UserDep,
        services: ServicesDep,
        range_header: Annotated[str | None, Header(alias="Range")] = None,
    ) -> Response:
        """The file, for its uploader and for whoever has a message carrying it in their stream
        (the conversation's participants; for a group, the members when it was sent); 404
        ``unknown_file`` for anyone else. Single byte ranges (``Range: bytes=0-99``) get 206."""
        record = await services.files.readable(user, file_id)
        headers = {
            "Accept-Ranges": "bytes",
            "Content-Disposition": _content_disposition(record),
            "Cache-Control": "private, max-age=86400",
            "ETag": f'"{record.sha256}"',
        }
        media_type = "text/plain; charset=utf-8" if record.content_type == "text/plain" else record.content_type
        wanted = _range(range_header, record.size)
        if wanted == "unsatisfiable":
            body = error_body("range_not_satisfiable", f"the file has {record.size} bytes")
            return JSONResponse(body, status_code=416, headers={"Content-Range": f"bytes */{record.size}"})
        if wanted is None:
            headers["Content-Length"] = str(record.size)
            return StreamingResponse(services.files.store.open(record.sha256), media_type=media_type, headers=headers)
        assert not isinstance(wanted, str)
        start, end = wanted
        headers["Content-Length"] = str(end - start)
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{record.size}"
        stream = services.files.store.open(record.sha256, start, end)
        return StreamingResponse(stream, status_code=206, media_type=media_type, headers=headers)

    @app.get("/v1/files/{file_id}/thumbnail", tags=["files"], response_class=Response)
    async def thumbnail(file_id: str, user: UserDep, services: ServicesDep) -> Response:
        """A small version of an image (longer side ``files.thumbnail_px``), JPEG or PNG; same
        access as the file. 415 ``unsupported_file_type`` for files that are not images."""
        record = await services.files.readable(user, file_id)
        thumb = await services.files.thumbnail(record)
        return Response(thumb.data, media_type=thumb.content_type, headers={"Cache-Control": "private, max-age=86400"})


async def _drain(body: AsyncIterator[bytes]) -> None:
    """Read the rest of a refused upload (up to a cap), so the client reads the 413 rather
    than a reset."""
    dropped = 0
    try:
        async for chunk in body:
            dropped += len(chunk)
            if dropped > _DRAIN_CAP:
                return
    except Exception:  # the client went away: nothing to answer to
        return
