"""Alembic environment: syncd passes its own connection (see ``Store.migrate``)."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

import syncd.store.db  # noqa: F401  (registers the tables on SQLModel.metadata)

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("syncd migrations run through `syncd db upgrade` (Store.migrate), not the alembic CLI")
context.configure(connection=connection, target_metadata=SQLModel.metadata, render_as_batch=True, compare_type=True)
with context.begin_transaction():
    context.run_migrations()
