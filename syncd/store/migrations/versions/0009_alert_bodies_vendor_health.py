"""alerts: a message of its own (the monthly audit report); vendor_health: each connection's
failing streak, shared by every replica

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-12 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("body", sa.JSON(), nullable=True))

    op.create_table(
        "vendor_health",
        sa.Column("connection", sa.String(), nullable=False),
        sa.Column("failing_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.String(), nullable=True),
        sa.Column("last_failure_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_success_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("connection"),
    )


def downgrade() -> None:
    op.drop_table("vendor_health")
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.drop_column("body")
