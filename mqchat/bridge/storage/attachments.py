"""File records: uploads, who may read them, and the uploads no message carries.

A user may read a file they uploaded, or one carried by a message in their own stream: the
conversation's participants, and for a group the members at the time of the message (the
stream holds exactly those messages, as for history).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, exists, insert, select

from mqchat.bridge.storage.base import StoreBase
from mqchat.bridge.storage.streams import NEW_MESSAGE, utc
from mqchat.bridge.store import StoredFile
from mqchat.bridge.tables import files, messages, stream_events


def row_to_file(row: Any) -> StoredFile:
    return StoredFile(
        file_id=row.file_id,
        owner=row.owner,
        name=row.name,
        size=int(row.size),
        content_type=row.content_type,
        sha256=row.sha256,
        created_at=utc(row.created_at) or row.created_at,
        width=row.width,
        height=row.height,
    )


def files_for_send(conn: Connection, file_ids: set[str]) -> dict[str, StoredFile]:
    """The records of the files a batch of sends names, locked against the collector of unsent
    uploads (row locks on PostgreSQL; SQLite's write lock already covers it)."""
    if not file_ids:
        return {}
    query = select(files).where(files.c.file_id.in_(sorted(file_ids))).order_by(files.c.file_id).with_for_update()
    return {row.file_id: row_to_file(row) for row in conn.execute(query)}


_CARRIED = exists().where(messages.c.attachment_id == files.c.file_id)


class AttachmentsStore(StoreBase):
    async def add_file(self, record: StoredFile) -> None:
        row = {
            "file_id": record.file_id,
            "owner": record.owner,
            "name": record.name,
            "size": record.size,
            "content_type": record.content_type,
            "sha256": record.sha256,
            "width": record.width,
            "height": record.height,
            "created_at": record.created_at,
        }
        await self.db.run("add_file", lambda conn: conn.execute(insert(files).values(**row)), write=True)

    async def readable_file(self, user_id: str, file_id: str) -> StoredFile | None:
        carried = (
            select(stream_events.c.seq)
            .select_from(stream_events.join(messages, messages.c.id == stream_events.c.message_id))
            .where(
                stream_events.c.user_id == user_id,
                stream_events.c.kind == NEW_MESSAGE,
                messages.c.attachment_id == file_id,
                messages.c.recalled_at.is_(None),
            )
            .limit(1)
        )

        def txn(conn: Connection) -> StoredFile | None:
            row = conn.execute(select(files).where(files.c.file_id == file_id)).first()
            if row is None:
                return None
            if row.owner == user_id or conn.execute(carried).first() is not None:
                return row_to_file(row)
            return None

        return await self.db.run("readable_file", txn)

    async def delete_unsent_files(self, uploaded_before: datetime) -> list[StoredFile]:
        def txn(conn: Connection) -> list[StoredFile]:
            stale = conn.execute(
                select(files).where(files.c.created_at < uploaded_before, ~_CARRIED).with_for_update()
            ).all()
            if not stale:
                return []
            ids = [row.file_id for row in stale]
            # Re-checked in the DELETE itself: a send that took the file meanwhile keeps it.
            conn.execute(delete(files).where(files.c.file_id.in_(ids), ~_CARRIED))
            left = {row.file_id for row in conn.execute(select(files.c.file_id).where(files.c.file_id.in_(ids)))}
            return [row_to_file(row) for row in stale if row.file_id not in left]

        return await self.db.run("delete_unsent_files", txn, write=True)

    async def file_hash_in_use(self, sha256: str) -> bool:
        query = select(files.c.file_id).where(files.c.sha256 == sha256).limit(1)
        return await self.db.run("file_hash_in_use", lambda conn: conn.execute(query).first() is not None)
