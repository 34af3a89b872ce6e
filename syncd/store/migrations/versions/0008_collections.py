"""collections: the latest payment date of each invoice; documents made by hand at the ledger
for known clients; what was last written onto each CRM company; follow-up tasks; the alert queue

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-10 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("invoices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_payment_date", sa.Date(), nullable=True))

    op.create_table(
        "ledger_documents",
        sa.Column("key", sa.String(), nullable=False),
        sa.Column("connection", sa.String(), nullable=False),
        sa.Column("document_id", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("client_key", sa.String(), nullable=False),
        sa.Column("number", sa.String(), nullable=True),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("currency", sa.String(), nullable=False),
        sa.Column("total", sa.String(), nullable=False),
        sa.Column("amount_due", sa.String(), nullable=False),
        sa.Column("amount_paid", sa.String(), nullable=False),
        sa.Column("due_date", sa.Date(), nullable=True),
        sa.Column("last_payment_date", sa.Date(), nullable=True),
        sa.Column("source_updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    with op.batch_alter_table("ledger_documents", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ledger_documents_document_id"), ["document_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_ledger_documents_client_key"), ["client_key"], unique=False)

    op.create_table(
        "company_standings",
        sa.Column("crm_connection", sa.String(), nullable=False),
        sa.Column("company_id", sa.String(), nullable=False),
        sa.Column("client_key", sa.String(), nullable=False),
        sa.Column("figures", sa.JSON(), nullable=False),
        sa.Column("cause", sa.String(), nullable=False),
        sa.Column("written_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("crm_connection", "company_id"),
    )
    with op.batch_alter_table("company_standings", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_company_standings_client_key"), ["client_key"], unique=False)

    op.create_table(
        "follow_up_tasks",
        sa.Column("key", sa.String(), nullable=False),
        sa.Column("document_key", sa.String(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("crm_connection", sa.String(), nullable=False),
        sa.Column("task_id", sa.String(), nullable=False),
        sa.Column("subject", sa.String(), nullable=False),
        sa.Column("body", sa.String(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("key"),
    )
    with op.batch_alter_table("follow_up_tasks", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_follow_up_tasks_document_key"), ["document_key"], unique=False)

    op.create_table(
        "alerts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("title", sa.String(), nullable=False),
        sa.Column("detail", sa.String(), nullable=False),
        sa.Column("place", sa.String(), nullable=True),
        sa.Column("connection", sa.String(), nullable=True),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_owner", sa.String(), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.String(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
    )
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.create_index("ix_alerts_claim", ["status", "next_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.drop_index("ix_alerts_claim")
    op.drop_table("alerts")
    with op.batch_alter_table("follow_up_tasks", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_follow_up_tasks_document_key"))
    op.drop_table("follow_up_tasks")
    with op.batch_alter_table("company_standings", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_company_standings_client_key"))
    op.drop_table("company_standings")
    with op.batch_alter_table("ledger_documents", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ledger_documents_client_key"))
        batch_op.drop_index(batch_op.f("ix_ledger_documents_document_id"))
    op.drop_table("ledger_documents")
    with op.batch_alter_table("invoices", schema=None) as batch_op:
        batch_op.drop_column("last_payment_date")
