"""dead letters a person dismissed: who, when and why

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:

    with op.batch_alter_table("dead_letters", schema=None) as batch_op:
        batch_op.add_column(sa.Column("dismissed_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("dismissed_by", sa.String(), nullable=True))
        batch_op.add_column(sa.Column("dismissed_why", sa.String(), nullable=True))


def downgrade() -> None:

    with op.batch_alter_table("dead_letters", schema=None) as batch_op:
        batch_op.drop_column("dismissed_why")
        batch_op.drop_column("dismissed_by")
        batch_op.drop_column("dismissed_at")
