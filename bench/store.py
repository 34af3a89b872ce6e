"""The store's execution models, compared on one deal's transactions (BENCHMARKS.md, "Store").

A won deal costs syncd four transactions (acknowledge, process, create, write back;
``tests/test_engine.py::test_a_won_deal_takes_at_most_four_transactions``). This
benchmark runs the same four transactions, with the same tables, statements and SQLite
settings as :class:`syncd.store.db.Store`, in closed loops of 1 and 16 concurrent
deals, under each way the store could run them:

* ``async`` (the store before this benchmark): SQLAlchemy's async engine, statement by
  statement, over aiosqlite (SQLite: a thread of its own per connection, several hand-offs
  per statement) or psycopg's async connection (PostgreSQL);
* ``thread/tx``: a synchronous engine, each transaction run as one synchronous unit on a
  worker thread (``asyncio.to_thread``: one hand-off per transaction);
* ``thread/statement``: a synchronous engine, each statement (and ``BEGIN``, ``COMMIT``)
  handed to a worker thread on its own: the transaction's code stays async;
* ``inline`` (SQLite only): a synchronous engine whose ``BEGIN IMMEDIATE`` (the only
  statement that may wait, for another process's write lock) runs on a worker thread,
  and every other statement and the ``COMMIT`` on the event loop's thread: one hand-off
  per transaction, the transaction's code stays async.

Reported per model and concurrency: deals per second, CPU per deal (this process's
``process_time``: the store and the event loop, nothing else runs here) and the p99 of
one deal's four transactions. Nothing here is syncd's engine: only its storage work.

Run alone: ``python -m bench.store`` (``--full`` for the long profile).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bench import report, stack
from bench.load import closed_loop
from bench.report import Latencies, Profile, Row
from syncd.store.db import (
    BillingEventRow,
    ClientRow,
    EffectRow,
    EngagementRow,
    EventRow,
    InvoiceRow,
    OutcomeRow,
    SourceRecordRow,
    Store,
    async_url,
    sync_url,
    table_of,
)

Transaction = list[sa.Executable]
RunDeal = Callable[[Sequence[Transaction]], Awaitable[None]]
LEASE = timedelta(seconds=60)


async def run(profile: Profile) -> list[Row]:
    """Every store row: each database, each model, each concurrency."""
    rows: list[Row] = []
    databases = ["sqlite"]
    if profile.postgres:
        if stack.postgres_available():
            databases.append("postgres")
        else:
            rows.append(Row(measurement="store", setting="postgres", metric="deals/s", value=None, note="no server"))
    for db in databases:
        with tempfile.TemporaryDirectory(prefix="syncd-bench-store-") as tmp:
            for model in MODELS[db]:
                folder = Path(tmp) / model.replace("/", "-")
                folder.mkdir()
                with stack.database(db, folder) as url:
                    rows += await _model(profile, db, model, url)
    return rows


async def _model(profile: Profile, db: str, model: str, url: str) -> list[Row]:
    store = Store.open(url)
    await store.migrate()
    await store.close()
    rows: list[Row] = []
    async with _runner(model, url) as run_deal:
        deals = itertools.count()
        is_pg = db == "postgres"

        async def work(_n: int) -> float | None:
            await run_deal(deal_transactions(next(deals), is_pg=is_pg))
            return time.perf_counter()

        await closed_loop(clients=4, duration_s=min(1.0, profile.store_s), warmup_s=0.0, work=work)  # warm caches
        for clients in (1, 16):
            started = time.process_time()
            result = await closed_loop(clients=clients, duration_s=profile.store_s, warmup_s=0.0, work=work)
            cpu_s = time.process_time() - started
            setting = f"{db} {model} c={clients}"
            latency = Latencies.of(result.latencies_s)
            rows += [
                Row(measurement="store", setting=setting, metric="deals/s", value=result.per_s, note=result.failures),
                Row(
                    measurement="store",
                    setting=setting,
                    metric="CPU per deal (4 transactions)",
                    value=cpu_s / max(1, result.completed) * 1000,
                    unit="ms",
                ),
                Row(
                    measurement="store",
                    setting=setting,
                    metric="p99 one deal",
                    value=latency.p99_ms,
                    unit="ms",
                    note=f"n={latency.count}",
                ),
            ]
    return rows


MODELS = {
    "sqlite": ("async", "thread/tx", "thread/statement", "inline"),
    "postgres": ("async", "thread/tx", "thread/statement"),
}


@contextlib.asynccontextmanager
async def _runner(model: str, url: str) -> AsyncIterator[RunDeal]:
    """A function running one deal's transactions under ``model``."""
    if model == "async":
        async_engine = _async_engine(url)
        try:
            yield lambda deal: _async_deal(async_engine, deal)
        finally:
            await async_engine.dispose()
        return
    engine = _sync_engine(url)
    one_writer = asyncio.Lock()  # SQLite has one writer: queue in asyncio, not in a thread
    try:
        writer = one_writer if engine.dialect.name == "sqlite" else None
        if model == "thread/tx":
            yield lambda deal: _threaded_deal(engine, deal, writer)
        elif model == "thread/statement":
            yield lambda deal: _statement_threaded_deal(engine, deal, writer)
        else:
            yield lambda deal: _inline_deal(engine, deal, one_writer)
    finally:
        engine.dispose()


def _sync_engine(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(
            url, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=1, max_overflow=0
        )
        _sqlite_settings(engine)
        return engine
    return sa.create_engine(sync_url(url), pool_size=10, max_overflow=10)


def _sqlite_settings(engine: sa.Engine) -> None:
    """WAL, a busy timeout and ``BEGIN IMMEDIATE``, as the store sets them."""

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=30000", "foreign_keys=ON"):
            dbapi_conn.execute(f"PRAGMA {pragma}")

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _async_engine(url: str) -> AsyncEngine:
    """The store's engine before it moved to a synchronous one: SQLAlchemy async over aiosqlite / psycopg async."""
    if url.startswith("sqlite"):
        engine = create_async_engine(
            async_url(url), connect_args={"timeout": 30}, pool_size=1, max_overflow=0, pool_timeout=60
        )
        _sqlite_settings(engine.sync_engine)
        return engine
    return create_async_engine(async_url(url), pool_size=10, max_overflow=10)


async def _async_deal(engine: AsyncEngine, deal: Sequence[Transaction]) -> None:
    for statements in deal:
        async with engine.begin() as conn:
            for statement in statements:
                _consume(await conn.execute(statement))


async def _threaded_deal(engine: sa.Engine, deal: Sequence[Transaction], lock: asyncio.Lock | None) -> None:
    for statements in deal:
        async with lock or contextlib.nullcontext():
            await asyncio.to_thread(_run_sync, engine, statements)


def _run_sync(engine: sa.Engine, statements: Transaction) -> None:
    with engine.begin() as conn:
        for statement in statements:
            _consume(conn.execute(statement))


async def _statement_threaded_deal(engine: sa.Engine, deal: Sequence[Transaction], lock: asyncio.Lock | None) -> None:
    for statements in deal:
        async with lock or contextlib.nullcontext():
            conn = await asyncio.to_thread(_open, engine)
            try:
                for statement in statements:
                    await asyncio.to_thread(_execute, conn, statement)
            except BaseException:
                await asyncio.to_thread(_close, conn, commit=False)
                raise
            await asyncio.to_thread(_close, conn, commit=True)


def _execute(conn: sa.Connection, statement: sa.Executable) -> None:
    _consume(conn.execute(statement))


async def _inline_deal(engine: sa.Engine, deal: Sequence[Transaction], lock: asyncio.Lock) -> None:
    for statements in deal:
        async with lock:
            conn = await asyncio.to_thread(_open, engine)
            try:
                for statement in statements:
                    _consume(conn.execute(statement))
            except BaseException:
                _close(conn, commit=False)
                raise
            _close(conn, commit=True)


def _open(engine: sa.Engine) -> sa.Connection:
    conn = engine.connect()
    conn.begin()
    return conn


def _close(conn: sa.Connection, *, commit: bool) -> None:
    if commit:
        conn.commit()
    conn.close()


def _consume(result: sa.CursorResult[Any]) -> None:
    if result.returns_rows:
        result.all()


def deal_transactions(n: int, *, is_pg: bool) -> list[Transaction]:
    """The statements of deal ``n``'s four transactions, as syncd's store issues them (new client, new deal)."""
    now = datetime(2026, 12, 1, tzinfo=UTC) + timedelta(milliseconds=n)
    insert = postgresql.insert if is_pg else sqlite.insert
    events, effects, clients = table_of(EventRow), table_of(EffectRow), table_of(ClientRow)
    engagements, billing, invoices = table_of(EngagementRow), table_of(BillingEventRow), table_of(InvoiceRow)
    sources, outcomes = table_of(SourceRecordRow), table_of(OutcomeRow)
    deal, client, key = f"{n}", f"hubspot:company:{n}", f"key-{n:08d}"
    data = {"properties": {"dealname": f"Deal {n}", "amount": "12500.00", "dealstage": "closedwon"}, "lines": [1, 2]}
    lease = {"lease_owner": "bench", "lease_until": now + LEASE, "attempts": 1}

    def upsert(table: sa.Table, keys: list[str], values: dict[str, Any]) -> sa.Executable:
        stmt = insert(table).values(**values)
        return stmt.on_conflict_do_update(
            index_elements=keys, set_={k: stmt.excluded[k] for k in values if k not in keys}
        )

    def claim(table: sa.Table) -> sa.Executable:
        free = sa.or_(table.c.lease_until.is_(None), table.c.lease_until < now)
        due = sa.select(table.c.id).where(table.c.status == "pending", table.c.next_at <= now, free)
        due = due.order_by(table.c.next_at, table.c.id).limit(10).with_for_update(skip_locked=True)
        return (
            sa.update(table)
            .where(table.c.id.in_(due.scalar_subquery()))
            .values(lease_owner="bench", lease_until=now + LEASE, attempts=table.c.attempts + 1)
            .returning(*table.c)
        )

    def effect(effect_key: str, kind: str, payload: dict[str, Any]) -> sa.Executable:
        values = {"key": effect_key, "kind": kind, "connection": "xero", "client_key": client, "payload": payload}
        values |= {"status": "pending", "next_at": now, "created_at": now, "updated_at": now, **lease}
        return insert(effects).values(**values).on_conflict_do_nothing(index_elements=["key"]).returning(*effects.c)

    def settle(table: sa.Table, row_key: Any) -> sa.Executable:
        where = table.c.key == row_key if table is effects else table.c.event_id == row_key
        return sa.update(table).where(where, table.c.attempts == 1).values(status="done", lease_owner=None)

    draft = {"key": key, "lines": [{"description": "Discovery workshop", "quantity": "1", "unit_price": "2500.00"}] * 2}
    acknowledge = [
        insert(events)
        .values(
            connection="hubspot",
            object_type="deal",
            object_id=deal,
            event_id=f"e{n}",
            kind="deal.propertyChange",
            occurred_at=now,
            received_at=now,
            status="pending",
            next_at=now,
            **lease,
        )
        .on_conflict_do_nothing(index_elements=["connection", "event_id"])
        .returning(*events.c)
    ]
    process = [
        upsert(
            sources,
            ["connection", "object_type", "object_id"],
            {
                "connection": "hubspot",
                "object_type": "deal",
                "object_id": deal,
                "version": "1",
                "data": data,
                "fetched_at": now,
            },
        ),
        sa.select(clients).where(clients.c.key == client),
        upsert(
            clients,
            ["key"],
            {"key": client, "legal_name": f"Client {n} LLC", "data": data, "external_ids": {}, "updated_at": now},
        ),
        sa.select(engagements).where(engagements.c.key == f"hubspot:deal:{deal}"),
        upsert(
            engagements,
            ["key"],
            {
                "key": f"hubspot:deal:{deal}",
                "client_key": client,
                "type": "one_time",
                "crm_connection": "hubspot",
                "crm_object_id": deal,
                "data": data,
                "won_at": now,
                "source_version": "1",
                "updated_at": now,
            },
        ),
        sa.select(invoices).where(
            invoices.c.engagement_key == f"hubspot:deal:{deal}",
            invoices.c.key.in_(sa.select(billing.c.key).where(billing.c.kind == "deal_won")),
        ),
        insert(billing)
        .values(
            key=key,
            kind="deal_won",
            engagement_key=f"hubspot:deal:{deal}",
            occurrence="won",
            occurred_at=now,
            created_at=now,
            simulated=False,
        )
        .on_conflict_do_nothing(index_elements=["key"])
        .returning(billing.c.key),
        effect(key, "create_invoice", {"draft": draft, "crm": "hubspot", "crm_object_id": deal}),
        sa.update(outcomes)
        .where(outcomes.c.key == f"attention:missing_po:{key}", outcomes.c.status == "open")
        .values(status="resolved", resolved_at=now, detail=outcomes.c.detail + " — resolved: the PO number arrived"),
        sa.select(billing).where(billing.c.engagement_key == f"hubspot:deal:{deal}"),
        settle(events, f"e{n}"),
    ]
    create = [
        sa.update(clients).where(clients.c.key == client).values(external_ids={"xero": f"contact-{n}"}),
        upsert(
            invoices,
            ["key"],
            {
                "key": key,
                "kind": "invoice",
                "engagement_key": f"hubspot:deal:{deal}",
                "client_key": client,
                "crm_connection": "hubspot",
                "crm_object_id": deal,
                "invoicing_connection": "xero",
                "invoice_id": f"invoice-{n}",
                "number": f"INV-{n}",
                "state": "authorised",
                "currency": "USD",
                "total": "13750.00",
                "amount_due": "13750.00",
                "triggered_at": now,
                "created_at": now,
                "updated_at": now,
            },
        ),
        settle(effects, key),
        sa.update(billing).where(billing.c.key == key).values(invoice_key=key),
        sa.select(invoices).where(invoices.c.crm_connection == "hubspot", invoices.c.crm_object_id == deal),
        sa.select(clients).where(clients.c.key == client),
        effect(f"crm:{key}", "write_crm_status", {"crm_object_id": deal}),
    ]
    write_back = [settle(effects, f"crm:{key}"), claim(events), claim(effects)]
    return [acknowledge, process, create, write_back]


if __name__ == "__main__":
    report.main("store", run)
