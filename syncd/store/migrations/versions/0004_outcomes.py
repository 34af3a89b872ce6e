"""outcomes (skips, simulated, needs attention); the invoice that carries a billing event;
the ledger's update time of each document; the record version a hint reports; the client details last pushed to each ledger; time entries billed up to an hours cap

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "outcomes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("reason", sa.String(), nullable=False),
        sa.Column("detail", sa.String(), nullable=False),
        sa.Column("place", sa.String(), nullable=True),
        sa.Column("connection", sa.String(), nullable=True),
        sa.Column("object_type", sa.String(), nullable=True),
        sa.Column("object_id", sa.String(), nullable=True),
        sa.Column("engagement_key", sa.String(), nullable=True),
        sa.Column("client_key", sa.String(), nullable=True),
        sa.Column("billing_event_key", sa.String(), nullable=True),
        sa.Column("trigger_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
    )
    with op.batch_alter_table("outcomes", schema=None) as batch_op:
        batch_op.create_index("ix_outcomes_kind_status", ["kind", "status"], unique=False)
        batch_op.create_index(batch_op.f("ix_outcomes_engagement_key"), ["engagement_key"], unique=False)
    with op.batch_alter_table("billing_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("invoice_key", sa.String(), nullable=True))
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("version", sa.String(), nullable=True))
    with op.batch_alter_table("clients", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pushed", sa.JSON(), nullable=True))
    with op.batch_alter_table("time_entries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("billed_hours", sa.String(), nullable=True))
        batch_op.add_column(sa.Column("remainder_key", sa.String(), nullable=True))
        batch_op.add_column(sa.Column("released_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("invoices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("source_updated_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f("ix_invoices_crm_object_id"), ["crm_object_id"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("invoices", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_invoices_crm_object_id"))
        batch_op.drop_column("source_updated_at")
    with op.batch_alter_table("time_entries", schema=None) as batch_op:
        batch_op.drop_column("released_at")
        batch_op.drop_column("remainder_key")
        batch_op.drop_column("billed_hours")
    with op.batch_alter_table("clients", schema=None) as batch_op:
        batch_op.drop_column("pushed")
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_column("version")
    with op.batch_alter_table("billing_events", schema=None) as batch_op:
        batch_op.drop_column("invoice_key")
    with op.batch_alter_table("outcomes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_outcomes_engagement_key"))
        batch_op.drop_index("ix_outcomes_kind_status")
    op.drop_table("outcomes")
