"""`syncd db current` and `syncd db copy`: the schema revision, and moving a database elsewhere."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import SQLModel
from typer.testing import CliRunner

from connectors.hubspot.emulator import HubSpotEmulator
from connectors.xero.emulator import XeroEmulator
from syncd.cli.main import app
from syncd.core.errors import ConfigError
from syncd.core.interfaces import ChangeHint
from syncd.store.copy import copy_database, head_revision, redacted, revision
from syncd.store.db import (
    BillingEventRow,
    ClientChangeRow,
    ClientConflictRow,
    ClientRow,
    CompanyStandingRow,
    CursorRow,
    DbTokenStore,
    DeadLetterRow,
    EngagementRow,
    EventRow,
    FollowUpTaskRow,
    InvoiceRow,
    InvoiceTrailRow,
    LedgerDocumentRow,
    MetaRow,
    SourceRecordRow,
    Store,
    TimeEntryRow,
    table_of,
)
from tests.harness import write_config

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
CREATED = "2025-01-02T03:04:05+00:00"


def config_for(folder: Path, db_url: str) -> Path:
    return write_config(folder, db_url, HubSpotEmulator(), XeroEmulator())


def hint(event_id: str) -> ChangeHint:
    return ChangeHint(connection="hubspot", object_type="deal", object_id="8812", event_id=event_id, occurred_at=NOW)


async def fill(url: str) -> None:
    """A migrated database with rows in every table, written through the store's API."""
    store = Store.open(url)
    try:
        await store.migrate()
        await store.upsert(MetaRow, {"key": "created_at", "value": CREATED})
        await store.add_events([hint(f"e{i}") for i in range(5)], now=NOW)
        (claimed,) = await store.claim(EventRow, owner="a", limit=1, lease_s=30, now=NOW)
        await store.finish(EventRow, claimed, status="done", now=NOW)
        async with store.begin() as conn:
            for n in range(3):
                await store.add_effect(
                    conn,
                    key=f"inv:{n}",
                    kind="create_invoice",
                    connection="xero",
                    payload={"amount": "548.39", "lines": [n]},
                    now=NOW,
                    client_key="acme",
                )
            await store.add_billing_event(
                conn,
                BillingEventRow(
                    key="eng:1:won",
                    kind="deal_won",
                    engagement_key="eng:1",
                    occurrence="won",
                    occurred_at=NOW,
                    created_at=NOW,
                ),
            )
        await store.add_outcome(
            key="skip:before_billing_start:eng:0",
            kind="skip",
            reason="before_billing_start",
            detail="won before billing_start",
            engagement_key="eng:0",
            created_at=NOW,
        )
        await store.upsert(
            ClientRow,
            {
                "key": "acme",
                "legal_name": "Acme Pty",
                "data": {"terms": 14},
                "external_ids": {"xero": "c-1"},
                "updated_at": NOW,
            },
        )
        await store.upsert(
            EngagementRow,
            {
                "key": "eng:1",
                "client_key": "acme",
                "type": "one_time",
                "crm_connection": "hubspot",
                "crm_object_id": "8812",
                "data": {"amount": "1000.00"},
                "won_at": NOW,
                "source_version": "7",
                "updated_at": NOW,
            },
        )
        await store.upsert(
            InvoiceRow,
            {
                "key": "eng:1:won",
                "engagement_key": "eng:1",
                "client_key": "acme",
                "crm_connection": "hubspot",
                "crm_object_id": "8812",
                "invoicing_connection": "xero",
                "invoice_id": "inv-1",
                "number": "INV-0001",
                "state": "AUTHORISED",
                "currency": "AUD",
                "total": "1100.00",
                "subtotal": "1000.00",
                "amount_due": "1100.00",
                "due_date": date(2026, 12, 11),
                "triggered_at": NOW,
                "created_at": NOW,
                "updated_at": NOW,
            },
        )
        await store.upsert(
            CursorRow,
            {"connection": "harvest", "stream": "time_entries", "cursor": "2026-11-27", "last_success_at": NOW},
        )
        await store.upsert(
            SourceRecordRow,
            {
                "connection": "hubspot",
                "object_type": "deal",
                "object_id": "8812",
                "version": "7",
                "data": {"dealname": "Acme"},
                "fetched_at": NOW,
            },
        )
        await store.upsert(
            TimeEntryRow,
            {
                "connection": "harvest",
                "entry_id": "636709355",
                "project_id": "14307913",
                "data": {"hours": "1.5"},
                "updated_at": NOW,
                "fetched_at": NOW,
                "invoice_key": "eng:1:won",
                "invoiced_at": NOW,
            },
        )
        for n in range(2):
            await store.dead_letter(
                source="effect",
                ref=str(n),
                connection="xero",
                reason="bad code",
                place="lines[0]",
                payload=None,
                now=NOW,
            )
        await store.upsert(
            LedgerDocumentRow,
            {
                "key": "ledger:xero:7d3b",
                "connection": "xero",
                "document_id": "7d3b",
                "client_key": "hubspot:company:1",
                "state": "authorised",
                "currency": "USD",
                "total": "50.00",
                "amount_due": "50.00",
                "due_date": date(2026, 12, 1),
                "updated_at": NOW,
            },
        )
        await store.upsert(
            CompanyStandingRow,
            {
                "crm_connection": "hubspot",
                "company_id": "1",
                "client_key": "hubspot:company:1",
                "figures": {"syncd_outstanding_balance": "50.00"},
                "cause": "INV-1 created",
                "written_at": NOW,
            },
        )
        await store.upsert(
            FollowUpTaskRow,
            {
                "key": "task:eng:1:won:1",
                "document_key": "eng:1:won",
                "step": 1,
                "crm_connection": "hubspot",
                "task_id": "9001",
                "subject": "Collect INV-1",
                "body": "overdue",
                "created_at": NOW,
            },
        )
        store.alerting = True
        for n in range(2):
            await store.queue_alert(None, key=f"alert-{n}", kind="auth_lost", title="xero", detail="401", now=NOW)
        await store.queue_alert(
            None, key="audit_report:2026-11", kind="audit_report", title="t", detail="d", now=NOW, body={"text": "x"}
        )
        await store.vendor_failed("xero", "xero: 503", NOW)
        await store.add_alert(key="audit:2026-11:late", source="audit", title="t", text="x", fields={"n": 1}, now=NOW)
        await store.upsert(
            InvoiceTrailRow,
            {
                "key": "eng:1:won:sent",
                "invoice_key": "eng:1:won",
                "kind": "sent",
                "actor": "syncd",
                "summary": "sent",
                "detail": {"total": "1100.00"},
                "at": NOW,
            },
        )
        async with store.begin() as conn:
            await conn.execute(
                sa.insert(table_of(ClientChangeRow)).values(
                    client_key="acme", system="xero", field="payment_terms_days", old=14, new=30, by="seen", at=NOW
                )
            )
            await conn.execute(
                sa.insert(table_of(ClientConflictRow)).values(
                    client_key="acme",
                    field="legal_name",
                    owner="hubspot",
                    other="xero",
                    owner_value="Acme Pty",
                    other_value="Acme",
                    status="open",
                    opened_at=NOW,
                )
            )
        await DbTokenStore(store, "xero", "4t4Cs0Qg3xA6nGu8Yc2a3rRvy7Dl5MFhb3S2HJZc4Rk=").save({"access_token": "a"})
        await store.claim_tick("poll:hubspot", "2026-11-27T12:00", owner="a", now=NOW)
        await store.take_budget("xero:default", 60.0, 60, NOW)
    finally:
        await store.close()


async def dump(url: str) -> dict[str, list[dict[str, Any]]]:
    """Every row of every syncd table, in primary-key order."""
    store = Store.open(url)
    try:
        async with store.connect() as conn:
            return {
                table.name: [
                    dict(row._mapping)
                    for row in await conn.execute(sa.select(table).order_by(*table.primary_key.columns))
                ]
                for table in SQLModel.metadata.sorted_tables
            }
    finally:
        await store.close()


def copy_with_cli(source: str, target: str, folder: Path) -> str:
    config = config_for(folder, source)
    result = CliRunner().invoke(
        app, ["db", "copy", "--to", target, "--config", str(config), "--batch-rows", "2"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    return result.output


async def keeps_working(url: str) -> None:
    """The copy takes new rows with fresh ids and its claims go on."""
    store = Store.open(url)
    try:
        assert await store.add_events([hint("e-new")], now=NOW) == 1
        ids = [row.id for row in await store.select(EventRow, order_by=EventRow.id)]
        assert ids == sorted(set(ids))
        assert len(ids) == 6
        assert (await store.select(EventRow, EventRow.event_id == "e-new"))[0].id == max(ids)
        await store.dead_letter(
            source="event", ref="x", connection="hubspot", reason="r", place=None, payload=None, now=NOW
        )
        assert await store.count(DeadLetterRow) == 3
        claimed = await store.claim(EventRow, owner="b", limit=10, lease_s=30, now=NOW + timedelta(seconds=1))
        assert len(claimed) == 5  # four copied pending rows and the new one
        assert (await store.created_at()) == datetime.fromisoformat(CREATED)
    finally:
        await store.close()


@pytest.mark.postgres
def test_copy_from_sqlite_to_postgres_keeps_every_row_and_the_copy_works(
    sqlite_url: str, postgres_url: str, tmp_path: Path
) -> None:
    """Every row of every table arrives unchanged, counts are printed, and new ids do not collide."""
    asyncio.run(fill(sqlite_url))
    before = asyncio.run(dump(sqlite_url))
    empty = [name for name, rows in before.items() if not rows]
    assert empty == [], "fill() must write a row into every table; add one for each table listed"
    output = copy_with_cli(sqlite_url, postgres_url, tmp_path)
    assert asyncio.run(dump(postgres_url)) == before
    assert "events" in output
    assert "copied to" in output
    for name, rows in before.items():
        assert any(line.split()[:2] == ["│", name] and str(len(rows)) in line for line in output.splitlines()), name
    asyncio.run(keeps_working(postgres_url))


@pytest.mark.postgres
def test_copy_from_postgres_back_to_sqlite(postgres_url: str, tmp_path: Path) -> None:
    """The copy works the other way too, into a SQLite file that does not exist yet."""
    asyncio.run(fill(postgres_url))
    target = f"sqlite:///{tmp_path / 'back.db'}"
    copy_with_cli(postgres_url, target, tmp_path)
    assert asyncio.run(dump(target)) == asyncio.run(dump(postgres_url))
    asyncio.run(keeps_working(target))


async def test_a_target_with_rows_is_refused_and_left_alone(tmp_path: Path) -> None:
    """A target holding syncd rows is refused, naming the tables; nothing is written to it."""
    source, target = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    await fill(source)
    await fill(target)
    before = await dump(target)
    with pytest.raises(ConfigError, match=r"the target database is not empty: .*events \(5 rows\)"):
        await copy_database(source, target)
    assert await dump(target) == before


async def test_the_configured_database_is_not_its_own_target(tmp_path: Path) -> None:
    """`--to` naming the configured database, even spelled differently, is refused."""
    await fill(f"sqlite:///{tmp_path / 'a.db'}")
    with pytest.raises(ConfigError, match="is the configured database itself"):
        await copy_database(f"sqlite:///{tmp_path / 'a.db'}", f"sqlite+aiosqlite:///{tmp_path / '.' / 'a.db'}")


async def test_a_target_with_foreign_tables_is_refused(tmp_path: Path) -> None:
    """A database of another application is not a copy target."""
    source, target = f"sqlite:///{tmp_path / 'a.db'}", tmp_path / "other.db"
    await fill(source)
    store = Store.open(f"sqlite:///{target}")
    async with store.begin() as conn:
        await conn.exec_driver_sql("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
    await store.close()
    with pytest.raises(ConfigError, match=r"orders \(not a syncd table\)"):
        await copy_database(source, f"sqlite:///{target}")


async def test_a_freshly_migrated_target_is_accepted(tmp_path: Path) -> None:
    """`syncd db upgrade` on the target first is fine: its own created_at gives way to the source's."""
    source, target = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    await fill(source)
    store = Store.open(target)
    await store.migrate()
    await store.close()
    copied = await copy_database(source, target)
    assert {c.table: c.target_rows for c in copied}["meta"] == 1
    assert await dump(target) == await dump(source)


async def test_a_missing_or_old_source_is_refused(tmp_path: Path) -> None:
    """No source file, or a source never migrated, stops the copy before the target is touched."""
    target = tmp_path / "b.db"
    with pytest.raises(ConfigError, match=r"no database at sqlite:///.*nothing\.db; nothing to copy"):
        await copy_database(f"sqlite:///{tmp_path / 'nothing.db'}", f"sqlite:///{target}")
    empty = tmp_path / "empty.db"
    store = Store.open(f"sqlite:///{empty}")
    async with store.begin() as conn:
        await conn.exec_driver_sql("SELECT 1")
    await store.close()
    with pytest.raises(ConfigError, match=r"is at revision never migrated, not .*; run `syncd db upgrade` on it first"):
        await copy_database(f"sqlite:///{empty}", f"sqlite:///{target}")
    assert not target.exists()


def test_db_current_on_a_fresh_sqlite_file_creates_nothing(tmp_path: Path) -> None:
    """`syncd db current` on a database never migrated says so and creates no file."""
    db = tmp_path / "fresh.db"
    result = CliRunner().invoke(app, ["db", "current", "--config", str(config_for(tmp_path, f"sqlite:///{db}"))])
    assert result.exit_code == 0, result.output
    assert "database: not initialised; run syncd db upgrade" in result.output
    assert f"shipped:  {head_revision()}" in result.output
    assert not db.exists()


def test_db_current_after_upgrade_prints_the_head(tmp_path: Path) -> None:
    """After `syncd db upgrade` the database is at the revision shipped."""
    config = config_for(tmp_path, f"sqlite:///{tmp_path / 's.db'}")
    runner = CliRunner()
    assert runner.invoke(app, ["db", "upgrade", "--config", str(config)]).exit_code == 0
    result = runner.invoke(app, ["db", "current", "--config", str(config)])
    assert result.exit_code == 0, result.output
    head = head_revision()
    assert f"database: {head}" in result.output
    assert f"shipped:  {head}" in result.output
    assert "behind" not in result.output


@pytest.mark.postgres
async def test_db_current_on_a_fresh_postgres_database_creates_no_table(postgres_url: str) -> None:
    """On an empty PostgreSQL database the revision is unknown and no table appears."""
    found = await revision(postgres_url)
    assert found.current is None
    assert not found.up_to_date
    store = Store.open(postgres_url)
    try:
        async with store.connect() as conn:
            assert await conn.run_sync(lambda sync: sa.inspect(sync).get_table_names()) == []
    finally:
        await store.close()


def test_an_unreachable_database_is_a_clear_error_without_the_password(tmp_path: Path) -> None:
    """`syncd db current` on a server that does not answer names it, password masked, and exits 1."""
    url = "postgresql+psycopg://syncd:hunter2@127.0.0.1:9/syncd"
    result = CliRunner().invoke(app, ["db", "current", "--config", str(config_for(tmp_path, url))])
    assert result.exit_code == 1
    assert "cannot be read" in result.output
    assert redacted(url) in result.output
    assert "hunter2" not in result.output
