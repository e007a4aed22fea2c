"""users.role, users.disabled_at_ms, users.deleted_at_ms: administrators, disabled and deleted accounts.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("users", sa.Column("role", sa.String(length=16), nullable=False, server_default="user"))
    op.add_column("users", sa.Column("disabled_at_ms", sa.BigInteger(), nullable=True))
    op.add_column("users", sa.Column("deleted_at_ms", sa.BigInteger(), nullable=True))
    op.create_index("ix_users_disabled_at_ms", "users", ["disabled_at_ms"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_users_disabled_at_ms", table_name="users")
    op.drop_column("users", "deleted_at_ms")
    op.drop_column("users", "disabled_at_ms")
    op.drop_column("users", "role")
