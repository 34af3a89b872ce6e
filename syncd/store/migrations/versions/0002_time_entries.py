"""time entries read from time trackers, with the billing event that invoiced each

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 01:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "time_entries",
        sa.Column("connection", sa.String(), nullable=False),
        sa.Column("entry_id", sa.String(), nullable=False),
        sa.Column("project_id", sa.String(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("fetched_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("invoice_key", sa.String(), nullable=True),
        sa.Column("invoiced_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("connection", "entry_id"),
    )
    with op.batch_alter_table("time_entries", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_time_entries_project_id"), ["project_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_time_entries_invoice_key"), ["invoice_key"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("time_entries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_time_entries_invoice_key"))
        batch_op.drop_index(batch_op.f("ix_time_entries_project_id"))

    op.drop_table("time_entries")
