"""What every concern class of the store shares: its database and that database's dialect."""

from __future__ import annotations

from mqchat.bridge.storage.database import Database


class StoreBase:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.sql = db.dialect
