"""the audit and the invoice trail (issue time, paid day, what was sent and the ledger's content
of each invoice; its trail); the alert hook; the client record (values in force, values seen
at each system, change log, conflicts)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-10 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("invoices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("issued_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("paid_on", sa.Date(), nullable=True))
        batch_op.add_column(sa.Column("sent", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("document", sa.JSON(), nullable=True))
    # Invoices created before this revision: an approved one was issued when it was created.
    op.execute(
        "UPDATE invoices SET issued_at = created_at WHERE state NOT IN ('draft', 'voided') AND issued_at IS NULL"
    )
    with op.batch_alter_table("clients", schema=None) as batch_op:
        batch_op.add_column(sa.Column("record", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("seen", sa.JSON(), nullable=True))
    op.create_table(
        "invoice_trail",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(), nullable=False),
        sa.Column("invoice_key", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("actor", sa.String(), nullable=False),
        sa.Column("summary", sa.String(), nullable=False),
        sa.Column("classes", sa.String(), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
    )
    op.create_index("ix_invoice_trail_invoice_key", "invoice_trail", ["invoice_key"], unique=False)
    op.create_table(
        "pending_alerts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(), nullable=False),
        sa.Column("source", sa.String(), nullable=False),
        sa.Column("title", sa.String(), nullable=False),
        sa.Column("text", sa.String(), nullable=False),
        sa.Column("fields", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
    )
    op.create_table(
        "client_changes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("client_key", sa.String(), nullable=False),
        sa.Column("system", sa.String(), nullable=False),
        sa.Column("field", sa.String(), nullable=False),
        sa.Column("old", sa.JSON(), nullable=True),
        sa.Column("new", sa.JSON(), nullable=True),
        sa.Column("by", sa.String(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_client_changes_client_key", "client_changes", ["client_key"], unique=False)
    op.create_table(
        "client_conflicts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("client_key", sa.String(), nullable=False),
        sa.Column("field", sa.String(), nullable=False),
        sa.Column("owner", sa.String(), nullable=False),
        sa.Column("other", sa.String(), nullable=False),
        sa.Column("owner_value", sa.JSON(), nullable=True),
        sa.Column("other_value", sa.JSON(), nullable=True),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolution", sa.String(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_client_conflicts_client_key", "client_conflicts", ["client_key"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_client_conflicts_client_key", table_name="client_conflicts")
    op.drop_table("client_conflicts")
    op.drop_index("ix_client_changes_client_key", table_name="client_changes")
    op.drop_table("client_changes")
    op.drop_table("pending_alerts")
    op.drop_index("ix_invoice_trail_invoice_key", table_name="invoice_trail")
    op.drop_table("invoice_trail")
    with op.batch_alter_table("clients", schema=None) as batch_op:
        batch_op.drop_column("seen")
        batch_op.drop_column("record")
    with op.batch_alter_table("invoices", schema=None) as batch_op:
        batch_op.drop_column("document")
        batch_op.drop_column("sent")
        batch_op.drop_column("paid_on")
        batch_op.drop_column("issued_at")
