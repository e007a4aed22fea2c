"""Attachments: the ``files`` table, and the file a message carries (``messages.attachment_id``
and its description, ``messages.attachment``).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision: str | None = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("file_id", sa.String(length=64), primary_key=True),
        sa.Column("owner", sa.String(length=64), sa.ForeignKey("users.user_id"), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("content_type", sa.String(length=100), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_files_sha256", "files", ["sha256"])
    op.create_index("ix_files_created_at", "files", ["created_at"])
    op.add_column("messages", sa.Column("attachment_id", sa.String(length=64), nullable=True))
    op.add_column("messages", sa.Column("attachment", sa.Text(), nullable=True))
    op.create_index("ix_messages_attachment_id", "messages", ["attachment_id"])


def downgrade() -> None:
    op.drop_index("ix_messages_attachment_id", table_name="messages")
    op.drop_column("messages", "attachment")
    op.drop_column("messages", "attachment_id")
    op.drop_index("ix_files_created_at", table_name="files")
    op.drop_index("ix_files_sha256", table_name="files")
    op.drop_table("files")
