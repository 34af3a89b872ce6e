"""when a queued record was first attempted: give_up_after_s counts from it

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A row attempted before this revision has no first attempt time: the next claim
    # records one, so its give-up window starts then (syncd/engine/loop.py, _retry_or_bury).
    for table in ("events", "effects"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("first_attempt_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    for table in ("effects", "events"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("first_attempt_at")
