"""The health write: the smallest transaction that proves the database takes writes."""

from __future__ import annotations

import time

from sqlalchemy import Connection, text

from mqchat.bridge.storage.base import StoreBase

# ON CONFLICT ... DO UPDATE: the same statement on SQLite (3.24+) and PostgreSQL.
_UPSERT = text(
    "INSERT INTO health (node_id, checked_at_ms) VALUES (:node_id, :now) "
    "ON CONFLICT (node_id) DO UPDATE SET checked_at_ms = excluded.checked_at_ms"
)


class HealthStore(StoreBase):
    async def health_write(self, node_id: str) -> None:
        """Upsert this node's row in one write transaction; ``StorageUnavailable`` if it fails."""

        def txn(conn: Connection) -> None:
            conn.execute(_UPSERT, {"node_id": node_id, "now": int(time.time() * 1000)})

        await self.db.run("health_write", txn, write=True)
