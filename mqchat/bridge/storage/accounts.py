"""Accounts: users, password hashes and token revocations."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, and_, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError

from mqchat.bridge.storage.base import StoreBase
from mqchat.bridge.store import TokenStanding
from mqchat.bridge.tables import device_revocations, users
from mqchat.core.errors import UserExists

_REVOKED_AT = select(device_revocations.c.revoked_at_ms).where(
    device_revocations.c.user_id == bindparam("uid"), device_revocations.c.device_id == bindparam("did")
)
_PASSWORD_HASH = select(users.c.password_hash).where(users.c.user_id == bindparam("uid"))
# Runs at every MQTT CONNECT and HTTP request: one statement, built once.
_STANDING = (
    select(
        users.c.tokens_valid_after_ms,
        device_revocations.c.revoked_at_ms,
        users.c.role,
        users.c.disabled_at_ms,
        users.c.deleted_at_ms,
    )
    .select_from(
        users.outerjoin(
            device_revocations,
            and_(device_revocations.c.user_id == users.c.user_id, device_revocations.c.device_id == bindparam("did")),
        )
    )
    .where(users.c.user_id == bindparam("uid"))
)


class AccountsStore(StoreBase):
    async def create_user(self, user_id: str, password_hash: str) -> None:
        def txn(conn: Connection) -> None:
            row = {"user_id": user_id, "password_hash": password_hash, "last_seq": 0, "created_at": datetime.now(UTC)}
            try:
                conn.execute(insert(users), row)
            except IntegrityError as exc:
                # The id itself, or one differing only in case (uq_users_user_id_lower).
                raise UserExists(f"user {user_id!r} already exists (ids differing only in case count as one)") from exc

        await self.db.run("create_user", txn, write=True)

    async def create_users(self, password_hashes: dict[str, str]) -> None:
        now = datetime.now(UTC)
        rows = [
            {"user_id": u, "password_hash": h, "last_seq": 0, "created_at": now} for u, h in password_hashes.items()
        ]

        stmt = self.sql.insert(users).on_conflict_do_nothing(index_elements=["user_id"])

        def txn(conn: Connection) -> None:
            for start in range(0, len(rows), 2000):
                conn.execute(stmt, rows[start : start + 2000])

        await self.db.run("create_users", txn, write=True)

    async def get_password_hash(self, user_id: str) -> str | None:
        def txn(conn: Connection) -> Any:
            return conn.execute(_PASSWORD_HASH, {"uid": user_id}).scalar_one_or_none()

        found = await self.db.run("get_password_hash", txn)
        # A deleted account keeps its row with an empty hash: no password at all.
        return str(found) if found else None

    async def revoke_device(self, user_id: str, device_id: str, at_ms: int) -> None:
        values = {"user_id": user_id, "device_id": device_id, "revoked_at_ms": at_ms}
        stmt = self.sql.upsert_growing(device_revocations, values, ["user_id", "device_id"], ["revoked_at_ms"])
        await self.db.run("revoke_device", lambda conn: conn.execute(stmt), write=True)

    async def device_revoked_at(self, user_id: str, device_id: str) -> int | None:
        def txn(conn: Connection) -> Any:
            return conn.execute(_REVOKED_AT, {"uid": user_id, "did": device_id}).scalar_one_or_none()

        found = await self.db.run("device_revoked_at", txn)
        return None if found is None else int(found)

    async def token_standing(self, user_id: str, device_id: str | None) -> TokenStanding | None:
        def txn(conn: Connection) -> Any:
            return conn.execute(_STANDING, {"uid": user_id, "did": device_id}).one_or_none()

        row = await self.db.run("token_standing", txn)
        if row is None or row.deleted_at_ms is not None:
            return None
        found = [int(ms) for ms in (row.tokens_valid_after_ms, row.revoked_at_ms) if ms]
        return TokenStanding(max(found) if found else None, row.role, row.disabled_at_ms is not None)

    async def revoke_all_tokens(self, user_id: str, at_ms: int) -> None:
        await self.db.run("revoke_all_tokens", lambda conn: self._tokens_valid_after(conn, user_id, at_ms), write=True)

    async def set_password(self, user_id: str, password_hash: str, at_ms: int) -> None:
        def txn(conn: Connection) -> None:
            conn.execute(update(users).where(users.c.user_id == user_id).values(password_hash=password_hash))
            self._tokens_valid_after(conn, user_id, at_ms)

        await self.db.run("set_password", txn, write=True)

    def _tokens_valid_after(self, conn: Connection, user_id: str, at_ms: int) -> None:
        column = users.c.tokens_valid_after_ms
        stmt = (
            update(users)
            .where(users.c.user_id == user_id)
            .values(tokens_valid_after_ms=self.sql.greatest(column, at_ms))
        )
        conn.execute(stmt)
