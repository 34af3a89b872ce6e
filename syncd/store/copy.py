"""The database as a whole: which schema revision it is at, and copying it elsewhere.

``syncd db current`` reads the Alembic revision a database is at and the newest one
this version of syncd ships, creating nothing. ``syncd db copy --to URL`` moves every
row to another database (typically SQLite to PostgreSQL, see ``docs/operations.md``):

1. the source must be at the newest revision (``syncd db upgrade`` first);
2. the target must hold no syncd rows and no foreign table; it is then migrated;
3. the source is read in one snapshot (SQLite: a deferred ``BEGIN`` under WAL, which
   does not block a writer; PostgreSQL: ``REPEATABLE READ READ ONLY``), table by table
   in foreign-key order, in batches, and written in one target transaction: a failed
   copy leaves the target with no rows;
4. PostgreSQL sequences of integer keys are moved past the copied ids, so new inbox,
   outbox and dead-letter rows do not collide with copied ones;
5. rows are counted per table on both sides; a difference is an error.

The ``meta`` table is special: migrating the target writes its own ``created_at``,
which the copy replaces with the source's, because ``created_at`` is the default
``[daemon].billing_start`` and must not move.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool
from sqlmodel import SQLModel

from syncd.core.errors import ConfigError
from syncd.store.db import MIGRATIONS, MetaRow, Store, async_url

ALEMBIC_TABLE = "alembic_version"
NOT_INITIALISED = "not initialised; run syncd db upgrade"


@dataclass(frozen=True, kw_only=True)
class Revision:
    """Where a database's schema is.

    Attributes:
        current: the Alembic revision the database is at; ``None`` when it was never
            migrated (or does not exist yet).
        head: the newest revision this version of syncd ships.
    """

    current: str | None
    head: str

    @property
    def up_to_date(self) -> bool:
        """Whether the database is at the newest revision."""
        return self.current == self.head


@dataclass(frozen=True, kw_only=True)
class TableCopied:
    """One table of a finished copy: rows read from the source and found in the target."""

    table: str
    source_rows: int
    target_rows: int


def redacted(database_url: str) -> str:
    """The URL with its password masked, for messages."""
    return make_url(database_url).render_as_string(hide_password=True)


def head_revision() -> str:
    """The newest migration shipped in ``syncd/store/migrations/versions``."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    if head is None:
        raise ConfigError(f"{MIGRATIONS}: no migration found; the installation is broken, reinstall syncd")
    return head


async def revision(database_url: str) -> Revision:
    """The revision ``database_url`` is at, read without creating or changing anything.

    A SQLite file that does not exist is reported as never migrated and is not created.

    Raises:
        ConfigError: the database cannot be reached.
    """
    head = head_revision()
    if _missing_sqlite_file(database_url):
        return Revision(current=None, head=head)
    async with _reader(database_url) as conn:
        current = await conn.run_sync(lambda sync: MigrationContext.configure(sync).get_current_revision())
    return Revision(current=current, head=head)


async def copy_database(source_url: str, target_url: str, *, batch_rows: int = 1000) -> list[TableCopied]:
    """Copy every row of the syncd database at ``source_url`` into an empty ``target_url``.

    Args:
        source_url: the configured ``[daemon].database_url``; only read.
        target_url: an empty database (SQLite file or PostgreSQL); migrated, then filled.
        batch_rows: rows read and inserted per statement.

    Returns:
        per table, in copy order, the rows in the source and in the target.

    Raises:
        ConfigError: the source is missing or not at the newest revision, the target is
            not empty, or the row counts differ after the copy.
    """
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
    if _same_database(source_url, target_url):
        raise ConfigError(f"--to {redacted(target_url)} is the configured database itself; name another database")
    await _check_source(source_url)
    target = Store.open(target_url)
    try:
        await _check_empty(target, target_url)
        await target.migrate()
        async with _reader(source_url) as src:
            await _check_no_foreign_tables(src, source_url, "source")
            async with target.begin() as dst:
                for table in _tables():
                    await _copy_table(src, dst, table, batch_rows)
                if target.is_postgres:
                    await _reset_sequences(dst)
            return await _verify(src, target)
    finally:
        await target.close()


def _tables() -> list[sa.Table]:
    """syncd's tables, parents before children."""
    return list(SQLModel.metadata.sorted_tables)


def _same_database(one: str, other: str) -> bool:
    a, b = make_url(async_url(one)), make_url(async_url(other))
    if a.drivername.startswith("sqlite") and b.drivername.startswith("sqlite"):
        return Path(a.database or "").resolve() == Path(b.database or "").resolve()
    return (a.drivername, a.host, a.port, a.database) == (b.drivername, b.host, b.port, b.database)


def _missing_sqlite_file(database_url: str) -> bool:
    url = make_url(database_url)
    if not url.drivername.startswith("sqlite") or url.database in (None, "", ":memory:"):
        return False
    return not Path(url.database).exists()


@contextlib.asynccontextmanager
async def _reader(database_url: str) -> AsyncIterator[AsyncConnection]:
    """One read-only snapshot of ``database_url``, on an engine without syncd's write pragmas."""
    engine = create_async_engine(async_url(database_url), poolclass=NullPool)
    if engine.dialect.name == "sqlite":
        _sqlite_deferred_begin(engine)
    try:
        async with contextlib.AsyncExitStack() as stack:
            try:
                conn = await stack.enter_async_context(engine.connect())
                if engine.dialect.name == "postgresql":
                    await conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
                await conn.scalar(sa.select(1))  # opens the snapshot now
            except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
                raise ConfigError(
                    f"database {redacted(database_url)} cannot be read: {type(exc.orig).__name__}"
                ) from exc
            yield conn
    finally:
        await engine.dispose()


def _sqlite_deferred_begin(engine: AsyncEngine) -> None:
    """Make SQLAlchemy's transaction a real SQLite one, so every read sees one snapshot.

    Python's sqlite3 module issues no ``BEGIN`` before a ``SELECT``; a deferred ``BEGIN``
    under WAL gives a snapshot without taking the write lock
    (https://docs.sqlalchemy.org/en/20/dialects/sqlite.html#serializable-isolation-savepoints-transactional-ddl).
    """

    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN")


async def _check_source(source_url: str) -> None:
    if _missing_sqlite_file(source_url):
        raise ConfigError(f"[daemon].database_url: no database at {redacted(source_url)}; nothing to copy")
    found = await revision(source_url)
    if not found.up_to_date:
        at = found.current or "never migrated"
        raise ConfigError(
            f"[daemon].database_url: {redacted(source_url)} is at revision {at}, not {found.head}; "
            "run `syncd db upgrade` on it first"
        )


async def _check_empty(target: Store, target_url: str) -> None:
    """Refuse a target that holds syncd rows (other than ``meta``) or tables syncd does not know."""
    async with target.engine.connect() as conn:
        names = set(await conn.run_sync(lambda sync: sa.inspect(sync).get_table_names()))
        foreign = sorted(names - {t.name for t in _tables()} - {ALEMBIC_TABLE})
        filled = [
            f"{t.name} ({rows} rows)"
            for t in _tables()
            if t.name in names and t.name != MetaRow.__tablename__
            if (rows := await _count(conn, t))
        ]
    if foreign or filled:
        found = ", ".join([*filled, *(f"{name} (not a syncd table)" for name in foreign)])
        raise ConfigError(
            f"--to {redacted(target_url)}: the target database is not empty: {found}; copy into a new, empty database"
        )


async def _check_no_foreign_tables(conn: AsyncConnection, url: str, side: str) -> None:
    names = set(await conn.run_sync(lambda sync: sa.inspect(sync).get_table_names()))
    unknown = sorted(names - {t.name for t in _tables()} - {ALEMBIC_TABLE})
    if unknown:
        raise ConfigError(
            f"{side} {redacted(url)} holds tables this syncd does not know ({', '.join(unknown)}); "
            "they would not be copied; use the syncd version that created them"
        )


async def _count(conn: AsyncConnection, table: sa.Table) -> int:
    return int(await conn.scalar(sa.select(sa.func.count()).select_from(table)) or 0)


async def _copy_table(src: AsyncConnection, dst: AsyncConnection, table: sa.Table, batch_rows: int) -> None:
    if table.name == MetaRow.__tablename__:
        await dst.execute(sa.delete(table))  # the target's own created_at gives way to the source's
    result = await src.stream(sa.select(table).order_by(*table.primary_key.columns))
    async for batch in result.partitions(batch_rows):
        await dst.execute(sa.insert(table), [dict(row._mapping) for row in batch])


async def _reset_sequences(dst: AsyncConnection) -> None:
    """Move each serial sequence past the largest copied id (or back to 1 for an empty table)."""
    for table in _tables():
        column = table.autoincrement_column
        if column is None:
            continue
        highest = sa.func.max(column)
        await dst.execute(
            sa.select(
                sa.func.setval(
                    sa.func.pg_get_serial_sequence(table.name, column.name),
                    sa.func.coalesce(highest, 1),
                    highest.is_not(None),
                )
            ).select_from(table)
        )


async def _verify(src: AsyncConnection, target: Store) -> list[TableCopied]:
    copied: list[TableCopied] = []
    async with target.engine.connect() as dst:
        for table in _tables():
            copied.append(
                TableCopied(
                    table=table.name, source_rows=await _count(src, table), target_rows=await _count(dst, table)
                )
            )
    wrong = [c for c in copied if c.source_rows != c.target_rows]
    if wrong:
        found = ", ".join(f"{c.table}: {c.source_rows} in the source, {c.target_rows} in the target" for c in wrong)
        raise ConfigError(f"the copy is incomplete ({found}); the target must not be used")
    return copied
