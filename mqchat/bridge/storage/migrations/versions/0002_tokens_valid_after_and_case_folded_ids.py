"""users.tokens_valid_after_ms ("log out everywhere"), and user ids unique regardless of case.

Refuses to run, naming them, if existing user ids differ only in case: which account
keeps the id is the operator's decision, not the migration's.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from mqchat.bridge.storage.schema import SchemaError

revision = "0002"
down_revision: str | None = "0001"
branch_labels = None
depends_on = None

_CLASHES = sa.text(
    "SELECT user_id FROM users WHERE lower(user_id) IN "
    "(SELECT lower(user_id) FROM users GROUP BY lower(user_id) HAVING count(*) > 1) "
    "ORDER BY lower(user_id), user_id"
)


def upgrade() -> None:
    clashes = [row[0] for row in op.get_bind().execute(_CLASHES)]
    if clashes:
        raise SchemaError(
            "cannot apply migration 0002: these user ids differ only in case: "
            f"{', '.join(clashes)}; rename or remove all but one of each before upgrading"
        )
    op.add_column("users", sa.Column("tokens_valid_after_ms", sa.BigInteger(), nullable=False, server_default="0"))
    op.create_index("uq_users_user_id_lower", "users", [sa.text("lower(user_id)")], unique=True)


def downgrade() -> None:
    op.drop_index("uq_users_user_id_lower", table_name="users")
    op.drop_column("users", "tokens_valid_after_ms")
