"""Administration: what ``mqchat user | group`` and the ``/v1/admin`` routes do.

Both go through ``Administration``, so a command line and an HTTP request change the same
things. What a command line cannot do is end the live connections of a server in another
process: every serving node therefore looks, every ``WATCH_SECONDS``, for accounts disabled
or deleted since its last look and closes their connections itself (one indexed query). Over
HTTP the serving node closes them at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Literal, Protocol

from mqchat.bridge.auth import Accounts
from mqchat.bridge.chat import ChatService
from mqchat.bridge.store import Emitted, GroupInfo, GroupSummary, UserRecord
from mqchat.core.ids import check_id
from mqchat.tasks import stop_task

log = logging.getLogger(__name__)

Role = Literal["user", "admin"]
WATCH_SECONDS = 5.0
_WATCH_SLACK_MS = 30_000  # a disable committed late still falls in the next look


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class AdminStore(Protocol):
    async def list_users(self, after: str, limit: int, *, include_deleted: bool = False) -> list[UserRecord]: ...

    async def get_user(self, user_id: str) -> UserRecord: ...

    async def set_role(self, user_id: str, role: str) -> None: ...

    async def set_disabled(self, user_id: str, at_ms: int | None) -> bool: ...

    async def users_disabled_since(self, since_ms: int) -> list[str]: ...

    async def mark_deleted(self, user_id: str, at_ms: int) -> tuple[Emitted, list[str]]: ...

    async def delete_stream_batch(self, user_id: str, limit: int) -> int: ...

    async def delete_unheld_messages_of(self, sender: str, limit: int) -> int: ...

    async def list_groups(self, after: str, limit: int) -> list[GroupSummary]: ...

    async def get_group(self, group_id: str) -> GroupInfo: ...


class Administration:
    def __init__(self, store: AdminStore, accounts: Accounts, chat: ChatService, *, batch_size: int = 1000) -> None:
        self._store = store
        self._accounts = accounts
        self._chat = chat
        self._batch = batch_size
        self._watcher: asyncio.Task[None] | None = None
        self.connections_closed = 0
        """Connections closed because their account was disabled or deleted (for metrics)."""

    # ------------------------------------------------------------ accounts

    async def list_users(self, after: str = "", limit: int = 100, *, include_deleted: bool = False) -> list[UserRecord]:
        return await self._store.list_users(after, limit, include_deleted=include_deleted)

    async def user(self, user_id: str) -> UserRecord:
        return await self._store.get_user(check_id(user_id, "user_id"))

    async def add_user(self, user_id: str, password: str, *, role: Role = "user") -> None:
        await self._accounts.register(user_id, password)
        if role != "user":
            await self._store.set_role(user_id, role)

    async def set_role(self, user_id: str, role: Role) -> None:
        await self._store.set_role(check_id(user_id, "user_id"), role)

    async def disable(self, user_id: str) -> bool:
        """Refuse the account's logins and tokens from now on and close its connections.
        False if it was disabled already."""
        changed = await self._store.set_disabled(check_id(user_id, "user_id"), now_ms())
        await self._close(user_id)
        await _past_this_millisecond()  # a login after re-enabling gets a token newer than the refusal
        return changed

    async def enable(self, user_id: str) -> bool:
        """Let the account log in again (the tokens refused by disabling stay refused)."""
        return await self._store.set_disabled(check_id(user_id, "user_id"), None)

    async def set_password(self, user_id: str, password: str) -> None:
        """Set a new password without the old one; every earlier token is refused, and the
        account's connections to this node are closed."""
        await self._accounts.reset_password(check_id(user_id, "user_id"), password)
        await self._close(user_id)

    async def delete(self, user_id: str) -> None:
        """Delete the account (storage/admin.py says what that removes and what it keeps).

        Safe to run again: an interrupted deletion is finished."""
        check_id(user_id, "user_id")
        record = await self._store.get_user(user_id)
        emitted, groups = await self._store.mark_deleted(user_id, now_ms())
        await self._close(user_id)
        for group_id in groups:
            await self._chat.groups.refresh(group_id)
        await self._chat.publish_events(emitted)
        if record.deleted_at_ms is None:
            log.info("deleted the account %s (it left %d groups)", user_id, len(groups))
        # In small transactions: sends are stored between them.
        deleted = True
        while deleted:
            deleted = bool(await self._store.delete_stream_batch(user_id, self._batch))
        deleted = True
        while deleted:
            deleted = bool(await self._store.delete_unheld_messages_of(user_id, self._batch))

    async def _close(self, user_id: str) -> None:
        self.connections_closed += await self._chat.close_user(user_id)

    # -------------------------------------------------------------- groups

    async def list_groups(self, after: str = "", limit: int = 100) -> list[GroupSummary]:
        return await self._store.list_groups(after, limit)

    async def group(self, group_id: str) -> GroupInfo:
        return await self._store.get_group(check_id(group_id, "group_id"))

    # ------------------------------------------------------------- watcher

    def start(self) -> None:
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(), name="mqchat-admin-watch")

    async def stop(self) -> None:
        if self._watcher is not None:
            await stop_task(self._watcher)
            self._watcher = None

    async def _watch(self) -> None:
        """Close the connections of accounts disabled or deleted elsewhere (a command line,
        another node). Nothing before start-up matters: such accounts cannot connect."""
        since = now_ms()
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            looked = now_ms()
            try:
                for user_id in await self._store.users_disabled_since(since - _WATCH_SLACK_MS):
                    await self._close(user_id)
            except Exception:  # the watcher must outlive a database outage
                log.warning("could not look for disabled accounts; trying again in %g s", WATCH_SECONDS)
                continue
            since = looked


async def _past_this_millisecond() -> None:
    await asyncio.sleep(0.002)
