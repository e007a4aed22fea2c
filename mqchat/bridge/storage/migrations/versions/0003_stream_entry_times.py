"""stream_events.created_ms: when each stream entry was appended, for retention.

Entries that exist already get the time of this upgrade (a constant default, which neither
database has to write into every row): retention counts their age from the upgrade, so it
never deletes anything earlier than the configured time after it. On PostgreSQL the default
is dropped again (existing rows keep the value); SQLite cannot drop a default without
rebuilding the table, so there it stays, unused: mqchat writes every entry's time itself.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    upgraded_ms = time.time_ns() // 1_000_000
    op.add_column(
        "stream_events",
        sa.Column("created_ms", sa.BigInteger(), nullable=False, server_default=sa.text(str(upgraded_ms))),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column("stream_events", "created_ms", server_default=None)


def downgrade() -> None:
    op.drop_column("stream_events", "created_ms")
