"""The store on SQLite and PostgreSQL: dedupe, leased claims, fencing, ticks, tokens."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import structlog.testing
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.migration import MigrationContext
from cryptography.fernet import Fernet
from sqlmodel import SQLModel

from syncd.core.errors import ConfigError
from syncd.core.interfaces import ChangeHint
from syncd.store.db import MIGRATIONS, DbTokenStore, EventRow, Store, TokenRow, table_of

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    s = Store.open(db_url)
    await s.migrate()
    yield s
    await s.close()


def hint(event_id: str, object_id: str = "1") -> ChangeHint:
    return ChangeHint(connection="hubspot", object_type="deal", object_id=object_id, event_id=event_id, occurred_at=NOW)


async def test_migrate_twice_is_harmless(store: Store) -> None:
    """Migrating an up-to-date database changes nothing and keeps created_at."""
    first = await store.created_at()
    assert first is not None
    await store.migrate()
    assert await store.created_at() == first


async def test_the_migrated_schema_is_the_one_the_tables_declare(store: Store) -> None:
    """Alembic's comparison of the migrated database with the SQLModel tables finds no difference."""
    async with store.connect() as conn:
        diff = await conn.run_sync(lambda sync: compare_metadata(MigrationContext.configure(sync), SQLModel.metadata))
    assert diff == []


async def test_the_dismissal_migration_goes_down_and_up_again(store: Store) -> None:
    """0005 adds who, when and why a dead letter was dismissed; its downgrade removes them again."""

    def columns(sync: sa.Connection) -> set[str]:
        return {column["name"] for column in sa.inspect(sync).get_columns("dead_letters")}

    def to(revision: str) -> Any:
        def move(sync: sa.Connection) -> None:
            cfg = AlembicConfig()
            cfg.set_main_option("script_location", str(MIGRATIONS))
            cfg.attributes["connection"] = sync
            (command.upgrade if revision == "head" else command.downgrade)(cfg, revision)

        return move

    added = {"dismissed_at", "dismissed_by", "dismissed_why"}
    async with store.begin() as conn:
        assert added <= await conn.run_sync(columns)
        await conn.run_sync(to("0004"))
        assert not added & await conn.run_sync(columns)
        await conn.run_sync(to("head"))
        assert added <= await conn.run_sync(columns)


async def test_a_new_database_has_no_creation_time_until_migrated(tmp_path: Path) -> None:
    """Before the first migration there is no created_at (and no crash reading it)."""
    fresh = Store.open(f"sqlite:///{tmp_path / 'new.db'}")
    try:
        assert await fresh.created_at() is None
        await fresh.migrate()
        assert await fresh.created_at() is not None
    finally:
        await fresh.close()


async def test_duplicate_events_are_stored_once(store: Store) -> None:
    """The same vendor event id is stored once, however often it arrives."""
    assert await store.add_events([hint("e1"), hint("e1"), hint("e2")], now=NOW) == 2
    assert await store.add_events([hint("e1")], now=NOW) == 0
    assert await store.count(EventRow) == 2


async def test_claims_are_exclusive_until_the_lease_expires(store: Store) -> None:
    """A claimed row is not claimed again until its lease runs out, then with a higher attempt."""
    await store.add_events([hint("e1")], now=NOW)
    first = await store.claim(EventRow, owner="a", limit=10, lease_s=30, now=NOW)
    assert [r.attempts for r in first] == [1]
    assert await store.claim(EventRow, owner="b", limit=10, lease_s=30, now=NOW + timedelta(seconds=29)) == []
    again = await store.claim(EventRow, owner="b", limit=10, lease_s=30, now=NOW + timedelta(seconds=31))
    assert [r.attempts for r in again] == [2]


async def test_a_late_writer_is_fenced_off(store: Store) -> None:
    """A worker whose lease was taken over cannot settle the row."""
    await store.add_events([hint("e1")], now=NOW)
    (stale,) = await store.claim(EventRow, owner="a", limit=1, lease_s=5, now=NOW)
    (fresh,) = await store.claim(EventRow, owner="b", limit=1, lease_s=5, now=NOW + timedelta(seconds=10))
    assert not await store.finish(EventRow, stale, status="done", now=NOW)
    assert await store.finish(EventRow, fresh, status="done", now=NOW)


async def test_concurrent_claimers_get_disjoint_rows(store: Store) -> None:
    """Many claimers at once never receive the same row."""
    await store.add_events([hint(f"e{i}", str(i)) for i in range(40)], now=NOW)
    batches = await asyncio.gather(
        *(store.claim(EventRow, owner=f"w{i}", limit=7, lease_s=30, now=NOW) for i in range(8))
    )
    ids = [row.id for batch in batches for row in batch]
    assert len(ids) == len(set(ids)) == 40


async def test_every_transaction_is_counted(store: Store) -> None:
    """The store counts each transaction it begins: writes, reads and claims that find nothing."""
    before = store.transactions
    await store.add_events([hint("e1")], now=NOW)
    assert await store.claim(EventRow, owner="a", limit=10, lease_s=30, now=NOW - timedelta(seconds=1)) == []
    assert await store.count(EventRow) == 1
    async with store.begin() as conn:
        await store.get(EventRow, 1, conn=conn)
        await store.upsert(TokenRow, {"connection": "x", "ciphertext": "c", "version": 1, "updated_at": NOW}, conn)
    assert store.transactions == before + 4


async def test_a_tick_window_runs_once(store: Store) -> None:
    """Only the first replica to claim a (job, window) runs it."""
    results = await asyncio.gather(*(store.claim_tick("poll:hubspot", "42", owner=f"r{i}", now=NOW) for i in range(5)))
    assert results.count(True) == 1
    assert await store.claim_tick("poll:hubspot", "43", owner="r0", now=NOW)


async def test_tokens_are_encrypted_at_rest(store: Store) -> None:
    """OAuth tokens round-trip but are stored only as ciphertext."""
    tokens = DbTokenStore(store, "xero", Fernet.generate_key().decode())
    async with tokens.locked():
        await tokens.save({"access_token": "at-123456", "refresh_token": "rt-abcdef"})
    assert await tokens.load() == {"access_token": "at-123456", "refresh_token": "rt-abcdef"}
    row = await store.get(TokenRow, "xero")
    assert "rt-abcdef" not in row.ciphertext


async def test_tokens_with_the_wrong_key_are_a_config_error(store: Store) -> None:
    """A changed encryption key is reported clearly, not as a crash."""
    await DbTokenStore(store, "xero", Fernet.generate_key().decode()).save({"refresh_token": "x"})
    with pytest.raises(ConfigError, match="encryption_key"):
        await DbTokenStore(store, "xero", Fernet.generate_key().decode()).load()


async def test_pages_yield_every_row_once_in_key_order_while_rows_change(store: Store) -> None:
    """25 events read 4 at a time: each once, in id order, though rows are updated and added meanwhile."""
    await store.add_events([hint(f"e{n:02d}") for n in range(25)], now=NOW)
    table = table_of(EventRow)
    seen: list[int] = []
    sizes: list[int] = []
    async for page in store.pages(EventRow, table.c.connection == "hubspot", key="id", size=4):
        sizes.append(len(page))
        seen += [row.id for row in page]
        # The work done between pages touches the rows just read and adds a new one behind the cursor.
        await store.update(EventRow, [table.c.id.in_([row.id for row in page])], {"status": "done"})
        if len(seen) == 8:
            await store.add_events([hint("late")], now=NOW)
    ids = [row.id for row in await store.select(EventRow, table.c.event_id != "late", order_by=table.c.id)]
    assert seen[:25] == ids
    assert len(seen) == len(set(seen)) == 26  # the one added later has a higher id: read once, at the end
    assert sizes == [4] * 6 + [2]
    assert [page async for page in store.pages(EventRow, table.c.connection == "xero", key="id")] == []


async def test_value_pages_yield_each_distinct_value_once(store: Store) -> None:
    """Distinct object ids of 30 events (10 ids, 3 events each) read 3 at a time: each id once, in order."""
    await store.add_events([hint(f"e{n}", object_id=f"deal-{n % 10:02d}") for n in range(30)], now=NOW)
    column = table_of(EventRow).c.object_id
    pages = [values async for values in store.values_pages(column, size=3)]
    assert [len(values) for values in pages] == [3, 3, 3, 1]
    assert [value for values in pages for value in values] == [f"deal-{n:02d}" for n in range(10)]


async def test_a_savepoint_undoes_only_its_own_work(store: Store) -> None:
    """Work done many at a time in one transaction (the recurring tick's pages): a failing item leaves the rest."""
    table = table_of(EventRow)
    row = _event_row

    async with store.begin() as conn:
        await conn.execute(table.insert().values(**row("kept-1")))

        async def failing_item() -> None:
            async with conn.savepoint():
                await conn.execute(table.insert().values(**row("undone")))
                raise RuntimeError("this item fails")

        with pytest.raises(RuntimeError):
            await failing_item()
        async with conn.savepoint():
            await conn.execute(table.insert().values(**row("kept-2")))
    kept = await store.select(EventRow)
    assert sorted(r.event_id for r in kept) == ["kept-1", "kept-2"]


async def test_a_write_waits_for_another_process_write_lock_without_blocking_the_loop(tmp_path: Path) -> None:
    """SQLite: while another connection (a CLI command) holds the write lock, a write waits on a thread.

    The event loop keeps running meanwhile (a ticker advances), and the write goes through
    once the lock is released; without the lock a write begins on the loop's own thread.
    """
    import sqlite3

    path = tmp_path / "syncd.db"
    s = Store.open(f"sqlite:///{path}")
    await s.migrate()
    try:
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")  # another process's write transaction
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticking = asyncio.create_task(ticker())
        write = asyncio.create_task(s.add_events([hint("locked-out")], now=NOW))
        await asyncio.sleep(0.3)
        assert not write.done()  # waiting for the lock
        assert ticks >= 10  # and the loop was not blocked meanwhile
        other.execute("COMMIT")
        other.close()
        assert await asyncio.wait_for(write, 5.0) == 1
        ticking.cancel()
        assert await s.add_events([hint("free")], now=NOW) == 1
        assert {row.event_id for row in await s.select(EventRow)} == {"locked-out", "free"}
    finally:
        await s.close()


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[tuple[Store, Path]]:
    path = tmp_path / "syncd.db"
    s = Store.open(f"sqlite:///{path}")
    await s.migrate()
    try:
        yield s, path
    finally:
        await s.close()


def _committed_ids(path: Path) -> set[str]:
    """The event ids another connection (another process) sees committed."""
    import sqlite3

    other = sqlite3.connect(path)
    try:
        return {row[0] for row in other.execute("SELECT event_id FROM events")}
    finally:
        other.close()


async def test_write_units_queued_together_share_one_commit_and_each_returns_only_once_committed(
    sqlite_store: tuple[Store, Path],
) -> None:
    """SQLite group commit: ten concurrent writes take far fewer than ten transactions.

    Each caller goes on only when its row is visible to another connection (committed),
    and a unit that fails is undone alone while the rest of its group commits.
    """
    store, path = sqlite_store
    table = table_of(EventRow)
    seen_on_return: dict[str, bool] = {}

    async def write(n: int) -> None:
        event_id = f"unit-{n}"
        async with store.begin() as conn:
            await asyncio.sleep(0)  # the others queue behind this unit meanwhile
            await conn.execute(table.insert().values(**_event_row(event_id)))
            if n == 4:
                raise RuntimeError("unit 4 fails")
        seen_on_return[event_id] = event_id in _committed_ids(path)

    before = store.transactions
    outcomes = await asyncio.gather(*(write(n) for n in range(10)), return_exceptions=True)
    assert [type(o).__name__ for o in outcomes].count("RuntimeError") == 1
    assert isinstance(outcomes[4], RuntimeError)
    assert store.transactions - before <= 3  # a transaction per unit before group commit: 10
    assert seen_on_return == {f"unit-{n}": True for n in range(10) if n != 4}
    assert _committed_ids(path) == {f"unit-{n}" for n in range(10) if n != 4}


async def test_a_read_behind_a_write_unit_sees_it_committed(sqlite_store: tuple[Store, Path]) -> None:
    """A read never joins a group: the group commits first, so the read sees only committed rows."""
    store, path = sqlite_store
    table = table_of(EventRow)
    reads: list[tuple[int, bool]] = []

    async def writer() -> None:
        async with store.begin() as conn:
            await asyncio.sleep(0)
            await conn.execute(table.insert().values(**_event_row("written")))

    async def reader() -> None:
        await asyncio.sleep(0)  # queue behind the writer's unit
        rows = await store.select(EventRow)
        reads.append((len(rows), "written" in _committed_ids(path)))

    await asyncio.gather(writer(), reader())
    assert reads == [(1, True)]


async def test_when_a_group_fails_to_commit_every_unit_in_it_fails(sqlite_store: tuple[Store, Path]) -> None:
    """A unit whose row breaks a deferred foreign key is released, then the group's COMMIT fails.

    Every unit of that group is told (none is reported stored), nothing of it is stored,
    and the next write begins a fresh transaction that commits.
    """
    store, path = sqlite_store
    table = table_of(EventRow)
    async with store.begin() as conn:
        await conn.exec_driver_sql("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
        await conn.exec_driver_sql(
            "CREATE TABLE child (parent_id INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)"
        )

    async def good() -> None:
        async with store.begin() as conn:
            await conn.execute(table.insert().values(**_event_row("good")))

    async def breaks_the_commit() -> None:
        async with store.begin() as conn:
            await conn.exec_driver_sql("INSERT INTO child (parent_id) VALUES (42)")  # checked at COMMIT

    with structlog.testing.capture_logs() as logs:
        outcomes = await asyncio.gather(good(), breaks_the_commit(), return_exceptions=True)
    assert all(isinstance(o, sa.exc.IntegrityError) for o in outcomes), outcomes
    assert [(e["event"], e["units"]) for e in logs if e["log_level"] == "warning"] == [("store_group_commit_failed", 2)]
    assert _committed_ids(path) == set()
    await good()
    assert _committed_ids(path) == {"good"}


async def test_a_caller_cancelled_while_queued_passes_its_turn_on(sqlite_store: tuple[Store, Path]) -> None:
    """A write cancelled while waiting for the connection takes no turn and stores nothing; the rest go on."""
    store, path = sqlite_store
    table = table_of(EventRow)
    release = asyncio.Event()

    async def holder() -> None:
        async with store.begin() as conn:
            await conn.execute(table.insert().values(**_event_row("holder")))
            await release.wait()

    async def write(event_id: str) -> None:
        async with store.begin() as conn:
            await conn.execute(table.insert().values(**_event_row(event_id)))

    first = asyncio.create_task(holder())
    await asyncio.sleep(0)
    cancelled = asyncio.create_task(write("cancelled"))
    after = asyncio.create_task(write("after"))
    await asyncio.sleep(0.01)
    cancelled.cancel()
    release.set()
    await asyncio.wait_for(asyncio.gather(first, after), 5.0)
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert _committed_ids(path) == {"holder", "after"}


def _event_row(event_id: str) -> dict[str, Any]:
    return {
        "connection": "hubspot",
        "object_type": "deal",
        "object_id": event_id,
        "event_id": event_id,
        "occurred_at": NOW,
        "received_at": NOW,
        "status": "pending",
        "attempts": 0,
        "next_at": NOW,
    }


async def test_savepoints_inside_a_unit_that_joined_a_group_undo_only_their_own_work(
    sqlite_store: tuple[Store, Path],
) -> None:
    """A unit in a group (its own savepoint) may take savepoints of its own (the recurring tick's pages)."""
    store, path = sqlite_store
    table = table_of(EventRow)

    async def first() -> None:
        async with store.begin() as conn:
            await asyncio.sleep(0)  # the second queues behind: it joins this group
            await conn.execute(table.insert().values(**_event_row("first")))

    async def second() -> None:
        async with store.begin() as conn:

            async def failing_item() -> None:
                async with conn.savepoint():
                    await conn.execute(table.insert().values(**_event_row("undone")))
                    raise RuntimeError("this item fails")

            with pytest.raises(RuntimeError):
                await failing_item()
            async with conn.savepoint():
                await conn.execute(table.insert().values(**_event_row("kept")))

    before = store.transactions
    await asyncio.gather(first(), second())
    assert store.transactions - before == 1
    assert _committed_ids(path) == {"first", "kept"}
