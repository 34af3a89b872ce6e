"""rate budgets shared by replicas: the next free request slot per key

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 02:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "rate_budgets",
        sa.Column("key", sa.String(), nullable=False),
        sa.Column("next_at_s", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )


def downgrade() -> None:

    op.drop_table("rate_budgets")
