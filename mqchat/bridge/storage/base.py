"""What every concern class of the store shares: its database and that database's dialect."""

from __future__ import annotations

from mqchat.bridge.storage.database import Database
from mqchat.bridge.store import OfflineHook


class StoreBase:
    push_hook: OfflineHook | None = None
    """Set (by the composition root) when push hooks are configured: ``save_messages`` then
    writes a push event for each recipient it calls offline (sends.py)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.sql = db.dialect
