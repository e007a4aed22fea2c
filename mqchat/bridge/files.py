"""Attachments: uploads checked and kept by content hash, downloads for those who may read them.

An upload arrives in pieces (``Attachments.upload``) and is written to a staging file, hashed
and counted as it comes; past ``files.max_bytes`` it is refused at once (``file_too_large``)
and the staging file removed. Then its type is detected from its bytes (``detect_type``: the
magic numbers of the few formats mqchat accepts; what the client claimed is ignored) and an
image is opened with Pillow for its size. Only then are the bytes handed to the ``FileStore``
(one atomic rename on the local store) and the record written: a failed upload leaves nothing.

Bytes live in a ``FileStore`` under their SHA-256, so identical uploads share them. The
embedded default, ``LocalFileStore``, keeps them under ``{data_dir}/files``; the protocol is
what an S3-compatible store would implement. Uploads no message carries are deleted after
``files.unsent_ttl_seconds`` by ``collect_unsent`` (run every ``files.gc_interval_seconds`` by
``mqchat serve``), bytes included once no record points at them.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import hashlib
import io
import logging
import os
import secrets
import time
import unicodedata
import warnings
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from PIL import Image, ImageOps, UnidentifiedImageError

from mqchat.bridge.store import FileRecords, StoredFile
from mqchat.config import FilesSettings
from mqchat.core.errors import FileTooLarge, UnknownFile, UnsupportedFileType

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
HEAD_BYTES = 4096
MAX_NAME = 255
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})


# ------------------------------------------------------------------ detection


def detect_type(head: bytes) -> str | None:
    """The content type the first bytes of a file announce, among those mqchat knows; None if
    none matches (``text/plain`` is decided later, from the whole file: it has no magic)."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith(b"%PDF-"):
        return "application/pdf"
    if head[4:8] == b"ftyp":
        return "video/mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "video/webm"
    if head.startswith(b"ID3") or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "audio/mpeg"
    if head.startswith(b"OggS"):
        return "audio/ogg"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "application/zip"
    return None


def safe_name(name: str | None) -> str:
    """A file name fit to show and to save: no directories (``../../x`` -> ``x``), no control
    characters, at most 255 characters; ``file`` if nothing is left."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if unicodedata.category(c)[0] != "C").strip().lstrip(".")
    if len(base) > MAX_NAME:
        stem, dot, ext = base.rpartition(".")
        base = (stem[: MAX_NAME - len(ext) - 1] + dot + ext) if dot and len(ext) < 16 else base[:MAX_NAME]
    return base or "file"


# ------------------------------------------------------------------- the store


class FileStore(Protocol):
    """Where the bytes of files live, by SHA-256. Staging is always local (bytes are checked
    before they are accepted); ``put`` takes a staged file in (and consumes it)."""

    async def put(self, sha256: str, staged: Path) -> None: ...

    def open(self, sha256: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """The bytes from ``start`` up to ``end`` (exclusive; None: the end of the file)."""

    async def delete(self, sha256: str) -> None: ...

    def staging_dir(self) -> Path: ...


class LocalFileStore:
    """Files under ``root/ab/abcdef...`` (the hash, fanned out by its first two characters)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def staging_dir(self) -> Path:
        path = self.root / "tmp"
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError("not a SHA-256 hex digest")
        return self.root / sha256[:2] / sha256

    async def put(self, sha256: str, staged: Path) -> None:
        target = self.path(sha256)
        target.parent.mkdir(mode=0o700, exist_ok=True)
        os.replace(staged, target)  # atomic: the name holds the whole file or nothing

    async def open(self, sha256: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        with self.path(sha256).open("rb") as fh:
            fh.seek(start)
            left = None if end is None else end - start
            while left is None or left > 0:
                piece = await asyncio.to_thread(fh.read, CHUNK if left is None else min(CHUNK, left))
                if not piece:
                    return
                if left is not None:
                    left -= len(piece)
                yield piece

    async def delete(self, sha256: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(sha256).unlink()


# ------------------------------------------------------------------ the service


@dataclass(frozen=True, slots=True)
class Thumbnail:
    data: bytes
    content_type: str


class _Staged:
    """One upload on its way in: a staging file, its hash and size so far."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.path = directory / f"{secrets.token_hex(16)}.part"
        self._fh = self.path.open("xb")
        self._max = max_bytes
        self.size = 0
        self.hash = hashlib.sha256()
        self.head = b""
        self._text = codecs.getincrementaldecoder("utf-8")()
        self.is_text = True

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self._max:
            raise FileTooLarge(f"the file is larger than {self._max} bytes (files.max_bytes)")
        self.hash.update(data)
        if len(self.head) < HEAD_BYTES:
            self.head += data[: HEAD_BYTES - len(self.head)]
        if self.is_text:
            try:
                self.is_text = "\x00" not in self._text.decode(data)
            except UnicodeDecodeError:
                self.is_text = False
        self._fh.write(data)

    def close(self) -> None:
        self._fh.close()
        if self.is_text:
            try:
                self._text.decode(b"", final=True)
            except UnicodeDecodeError:
                self.is_text = False

    def discard(self) -> None:
        self._fh.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class Attachments:
    def __init__(self, records: FileRecords, store: FileStore, settings: FilesSettings, cache_dir: Path) -> None:
        self._records = records
        self._store = store
        self.settings = settings
        self._thumbs = cache_dir
        # Between storing bytes and writing their record, the collector must not decide they
        # are unused (one process owns a local store).
        self._commit = asyncio.Lock()

    @property
    def store(self) -> FileStore:
        return self._store

    async def upload(
        self, owner: str, pieces: AsyncIterable[bytes], *, name: str | Callable[[], str | None] | None
    ) -> StoredFile:
        """Take a file in; raises ``FileTooLarge`` or ``UnsupportedFileType`` leaving nothing behind.

        ``name`` may be a function, asked once the bytes are in (a multipart body names its
        file in the part's headers, read along with the bytes)."""
        staged = _Staged(self._store.staging_dir(), self.settings.max_bytes)
        try:
            async for piece in pieces:
                if piece:
                    staged.write(piece)
            staged.close()
            content_type = self._accept(staged)
            width = height = None
            if content_type in IMAGE_TYPES:
                width, height = await asyncio.to_thread(_image_size, staged.path, self.settings.max_bytes)
            record = StoredFile(
                file_id=secrets.token_urlsafe(16),
                owner=owner,
                name=safe_name(name() if callable(name) else name),
                size=staged.size,
                content_type=content_type,
                sha256=staged.hash.hexdigest(),
                created_at=datetime.now(UTC),
                width=width,
                height=height,
            )
            async with self._commit:
                await self._store.put(record.sha256, staged.path)
                try:
                    await self._records.add_file(record)
                except BaseException:
                    if not await self._records.file_hash_in_use(record.sha256):
                        await self._store.delete(record.sha256)
                    raise
            return record
        finally:
            staged.discard()  # gone already when the store took it

    def _accept(self, staged: _Staged) -> str:
        if staged.size == 0:
            raise UnsupportedFileType("the file is empty")
        found = detect_type(staged.head) or ("text/plain" if staged.is_text else None)
        allowed = self.settings.allowed_types
        if found is None or found not in allowed:
            what = f"a {found} file" if found else "a file of a type mqchat does not recognise"
            raise UnsupportedFileType(f"this is {what}; allowed: {', '.join(allowed)} (files.allowed_types)")
        return found

    async def readable(self, user_id: str, file_id: str) -> StoredFile:
        found = await self._records.readable_file(user_id, file_id)
        if found is None:
            raise UnknownFile(f"no file {file_id!r} for you")
        return found

    async def thumbnail(self, record: StoredFile) -> Thumbnail:
        if record.content_type not in IMAGE_TYPES:
            raise UnsupportedFileType(f"{record.content_type} files have no thumbnail; images do")
        size = self.settings.thumbnail_px
        self._thumbs.mkdir(mode=0o700, parents=True, exist_ok=True)
        cached = self._thumbs / f"{record.sha256}-{size}"
        for suffix, kind in ((".jpg", "image/jpeg"), (".png", "image/png")):
            with contextlib.suppress(FileNotFoundError):
                return Thumbnail(cached.with_suffix(suffix).read_bytes(), kind)
        original = b"".join([piece async for piece in self._store.open(record.sha256)])
        thumb = await asyncio.to_thread(_make_thumbnail, original, size)
        suffix = ".jpg" if thumb.content_type == "image/jpeg" else ".png"
        staging = cached.with_name(f"{cached.name}.{secrets.token_hex(4)}.part")
        staging.write_bytes(thumb.data)
        os.replace(staging, cached.with_suffix(suffix))
        return thumb

    async def collect_unsent(self, now: datetime | None = None) -> int:
        """Delete uploads older than ``files.unsent_ttl_seconds`` that no message carries, their
        bytes and thumbnails once unused, and staging files left by a crash. Returns how many."""
        moment = now or datetime.now(UTC)
        cutoff = moment - timedelta(seconds=self.settings.unsent_ttl_seconds)
        async with self._commit:
            gone = await self._records.delete_unsent_files(cutoff)
            for sha in sorted({f.sha256 for f in gone}):
                if not await self._records.file_hash_in_use(sha):
                    await self._store.delete(sha)
                    for thumb in self._thumbs.glob(f"{sha}-*"):
                        thumb.unlink(missing_ok=True)
        stale = moment.timestamp() - 2 * self.settings.upload_timeout_seconds
        for part in self._store.staging_dir().glob("*.part"):
            with contextlib.suppress(FileNotFoundError):
                if part.stat().st_mtime < stale:
                    part.unlink()
        if gone:
            log.info("deleted %d uploads that no message carried", len(gone))
        return len(gone)

    async def run_collector(self) -> None:
        """``collect_unsent`` every ``files.gc_interval_seconds``, until cancelled."""
        while True:
            started = time.monotonic()
            try:
                await self.collect_unsent()
            except Exception:  # the next round tries again
                log.exception("collecting unsent uploads failed")
            await asyncio.sleep(max(0.0, self.settings.gc_interval_seconds - (time.monotonic() - started)))


def _image_size(path: Path, max_bytes: int) -> tuple[int, int]:
    """Width and height of a checked image; a file that only looks like one is refused."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                size = image.size
                image.verify()
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnsupportedFileType(f"the image cannot be read: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise UnsupportedFileType(f"the image is damaged: {exc}") from None
    return int(size[0]), int(size[1])


def _make_thumbnail(data: bytes, size: int) -> Thumbnail:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as opened:
            image = ImageOps.exif_transpose(opened)
            image.thumbnail((size, size))
            out = io.BytesIO()
            if image.mode in ("RGBA", "LA", "P"):
                image.convert("RGBA").save(out, "PNG", optimize=True)
                return Thumbnail(out.getvalue(), "image/png")
            image.convert("RGB").save(out, "JPEG", quality=80)
            return Thumbnail(out.getvalue(), "image/jpeg")
