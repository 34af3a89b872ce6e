"""The one client billing record, end to end: owners, flows, conflicts and their resolution, rates.

HubSpot, Xero and Harvest are the emulators of ``tests/harness.py``; a person's edits are
made as a person would make them (HubSpot's API, ``XeroEmulator.edit_contact_at_xero``,
which also delivers Xero's signed CONTACT webhook). ``syncd client resolve`` runs as a
command against the emulators served on loopback ports.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from click.testing import Result
from typer.testing import CliRunner

from connectors.emulation import Fault
from connectors.harvest.emulator import HarvestEmulator
from connectors.hubspot.emulator import HubSpotEmulator
from syncd.cli.demo import free_port, serve
from syncd.cli.main import app
from syncd.core.errors import ConfigError, RecordError
from syncd.engine.clients import client_record
from syncd.plumbing.settings import load_config
from syncd.store.db import ClientChangeRow, ClientConflictRow, PendingAlertRow, table_of
from syncd.store.outcomes import list_outcomes, resolve_outcome
from tests.harness import Stack, seed_company, seed_deal, stack
from tests.test_hours import (
    BILLING_START,
    HOURLY,
    hourly_deal,
    seed_harvest,
    tasks_project,
)
from tests.test_hours import (
    Clock as HoursClock,
)
from tests.test_hours import (
    at as hours_at,
)
from tests.test_hours import (
    log as log_hours,
)
from tests.test_hours import (
    tick as hours_tick,
)
from tests.test_hours import (
    win as win_hourly,
)


class Clock:
    """One clock for the daemon and the emulators; the test moves it."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


START = 'billing_start = "2026-11-01T00:00:00+00:00"'
TERMS_45 = {"PaymentTerms": {"Sales": {"Day": 45, "Type": "DAYSAFTERBILLDATE"}}}


def _invoke(*args: str) -> Result:
    saved, handlers = structlog.get_config(), logging.root.handlers[:]
    try:
        return CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})
    finally:
        structlog.configure(**saved)
        logging.root.handlers[:] = handlers


async def cli(*args: str) -> Result:
    """``syncd ARGS`` in a thread (the command runs its own event loop), 250 columns wide."""
    return await asyncio.to_thread(_invoke, *args)


async def edit_company(hub: HubSpotEmulator, company_id: str, properties: dict[str, str]) -> None:
    """Edit a company as a HubSpot user would, over the emulator's CRM API."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=hub.app), base_url="http://hubspot.test") as api:
        response = await api.patch(
            f"/crm/v3/objects/companies/{company_id}",
            json={"properties": properties},
            headers={"Authorization": f"Bearer {hub.token}"},
        )
        response.raise_for_status()


async def win(s: Stack, company: tuple[str, str]) -> dict[str, Any]:
    """A new deal of ``company`` won and processed; its Xero invoice."""
    deal = seed_deal(s.hub, company=company)
    await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
    await s.drain()
    return s.xero.invoices()[-1]


def due_days(invoice: dict[str, Any]) -> int:
    """Days from an invoice's date to its due date."""
    return (date.fromisoformat(invoice["DueDateString"][:10]) - date.fromisoformat(invoice["DateString"][:10])).days


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime(2026, 11, 3, 15, 0, tzinfo=UTC))


async def test_terms_changed_at_xero_reach_the_crm_company_and_the_next_due_date(
    tmp_path: Path, db_url: str, clock: Clock
) -> None:
    """The ledger owns the payment terms: changed at Xero, they are written on the HubSpot company and used next."""
    async with stack(tmp_path, db_url, clock=clock, daemon_extra=START) as s:
        company = seed_company(s.hub, terms="14")
        first = await win(s, company)
        assert due_days(first) == 14
        (contact,) = s.xero.contacts()
        clock.at += timedelta(days=2)
        await s.xero.edit_contact_at_xero(contact["ContactID"], TERMS_45)
        await s.drain()
        assert s.hub.company(company[0])["properties"]["payment_terms_days"] == "45"

        second = await win(s, company)
        assert due_days(second) == 45
        assert await list_outcomes(s.daemon.runtime.store, kind="attention") == []
        changes = await s.daemon.runtime.store.select(
            ClientChangeRow,
            table_of(ClientChangeRow).c.field == "payment_terms_days",
            order_by=table_of(ClientChangeRow).c.id,
        )
        assert [(c.system, c.old, c.new, c.by) for c in changes] == [
            ("hubspot", None, 14, "seen"),
            ("xero", None, 14, "syncd"),  # the new contact, created with the terms in force
            ("xero", 14, 45, "seen"),
            ("hubspot", 14, 45, "syncd"),
        ]


async def test_a_conflicting_edit_at_a_non_owner_is_reported_and_nothing_is_overwritten(
    tmp_path: Path, db_url: str, clock: Clock
) -> None:
    """Terms edited at HubSpot (Xero owns them) and the name edited at Xero (HubSpot owns it): two conflicts,
    the owners' values stay in use, neither system is written over, until `syncd client resolve` settles each."""
    async with stack(tmp_path, db_url, clock=clock, daemon_extra=START) as s:
        company = seed_company(s.hub, terms="14")
        key = f"hubspot:company:{company[0]}"
        await win(s, company)
        (contact,) = s.xero.contacts()
        await edit_company(s.hub, company[0], {"payment_terms_days": "60"})
        s.xero.edit_contact(contact["ContactID"], {"Name": "Northwind (AP dept)"})
        second = await win(s, company)

        assert due_days(second) == 14  # the owner's (Xero's) terms
        assert s.hub.company(company[0])["properties"]["payment_terms_days"] == "60"  # not written over
        (contact,) = s.xero.contacts()
        assert contact["Name"] == "Northwind (AP dept)"  # not written over
        assert contact["PaymentTerms"]["Sales"]["Day"] == 14
        assert s.hub.company(company[0])["properties"]["legal_name"] == "Northwind Traders LLC"
        store = s.daemon.runtime.store
        conflicts = await store.select(ClientConflictRow, order_by=table_of(ClientConflictRow).c.id)
        assert [(c.field, c.owner, c.other, c.owner_value, c.other_value, c.status) for c in conflicts] == [
            ("payment_terms_days", "xero", "hubspot", 14, 60, "open"),
            ("legal_name", "hubspot", "xero", "Northwind Traders LLC", "Northwind (AP dept)", "open"),
        ]
        outcomes = await list_outcomes(store, kind="attention")
        assert [o.reason for o in outcomes] == ["client_conflict", "client_conflict"]
        assert "syncd client resolve" in outcomes[0].detail
        with pytest.raises(RecordError, match="syncd client resolve"):
            await resolve_outcome(store, outcomes[0].id or 0, "done")
        alerts = await store.pending_alerts()
        assert [(a.source, a.fields["field"] if a.fields else None) for a in alerts] == [
            ("client", "payment_terms_days"),
            ("client", "legal_name"),
        ]
        third = await win(s, company)  # still no overwrite, and no second conflict for the same edit
        assert due_days(third) == 14
        assert await store.count(ClientConflictRow) == 2
        assert await store.count(PendingAlertRow) == 2

        shown = await cli("client", "show", key, "--format", "json", "--config", str(s.config.path))
        assert shown.exit_code == 0, shown.output
        record = json.loads(shown.output)
        fields = {f["field"]: f for f in record["fields"]}
        assert fields["payment_terms_days"]["value"] == 14
        assert fields["payment_terms_days"]["owner"] == "ledger"
        assert fields["payment_terms_days"]["seen"] == {"hubspot": 60, "xero": 14}
        assert fields["legal_name"]["conflict"]["other_value"] == "Northwind (AP dept)"
        listed = await cli("client", "list", "--config", str(s.config.path))
        assert "Northwind Traders LLC" in listed.output
        assert key in listed.output
        refused = await cli("client", "resolve", key, "tax_id", "--take", "owner", "--config", str(s.config.path))
        assert refused.exit_code == 1
        assert "no open conflict on 'tax_id'" in refused.output
        cli_config, ports = _served_config(s)
        async with serve(s.hub.app, ports[0]), serve(s.xero.app, ports[1]):
            took = await cli("client", "resolve", key, "payment_terms_days", "--take", "other", "--config", cli_config)
            assert took.exit_code == 0, took.output
            kept = await cli("client", "resolve", key, "legal_name", "--take", "owner", "--config", cli_config)
            assert kept.exit_code == 0, kept.output
        (contact,) = s.xero.contacts()
        assert contact["PaymentTerms"]["Sales"]["Day"] == 60  # the other's value, written to the owner
        assert contact["Name"] == "Northwind Traders LLC"  # the owner's value, written over the edit
        assert await list_outcomes(store, kind="attention") == []
        assert await store.count(ClientConflictRow, table_of(ClientConflictRow).c.status == "open") == 0
        fourth = await win(s, company)
        assert due_days(fourth) == 60
        assert await store.count(ClientConflictRow, table_of(ClientConflictRow).c.status == "open") == 0


def _served_config(s: Stack) -> tuple[str, tuple[int, int]]:
    """The stack's config for the command line, its HubSpot and Xero the emulators on free loopback ports."""
    ports = free_port(), free_port()
    text = s.config.path.read_text(encoding="utf-8")
    text = text.replace("http://hubspot.test", f"http://127.0.0.1:{ports[0]}")
    text = text.replace("http://xero.test", f"http://127.0.0.1:{ports[1]}")
    path = s.config.path.with_name("cli.toml")
    path.write_text(text, encoding="utf-8")
    return str(path), ports


async def test_owners_are_configurable_and_checked(tmp_path: Path, db_url: str, clock: Clock) -> None:
    """[clients.owners] payment_terms_days = "crm": terms edited at HubSpot reach Xero; an impossible owner is refused."""
    extra = '[clients.owners]\npayment_terms_days = "crm"\n'
    async with stack(tmp_path, db_url, clock=clock, daemon_extra=START, extra=extra) as s:
        company = seed_company(s.hub, terms="14")
        await win(s, company)
        await edit_company(s.hub, company[0], {"payment_terms_days": "30"})
        second = await win(s, company)
        assert due_days(second) == 30
        (contact,) = s.xero.contacts()
        assert contact["PaymentTerms"]["Sales"]["Day"] == 30
        assert await list_outcomes(s.daemon.runtime.store, kind="attention") == []
    bad = tmp_path / "bad.toml"
    bad.write_text(
        (tmp_path / "config.toml")
        .read_text(encoding="utf-8")
        .replace('payment_terms_days = "crm"', 'billing_contact = "ledger"'),
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as refused:
        load_config(bad)
    (problem,) = refused.value.problems
    assert problem.endswith("[clients].owners: billing_contact can only be owned by crm, not 'ledger'")


async def test_a_rate_changed_at_the_crm_reaches_the_next_invoice_for_hours_from_its_day(
    tmp_path: Path, db_url: str
) -> None:
    """An hourly rate raised on the deal bills hours dated from that day at the new rate, earlier ones at the old;
    hours already invoiced are not billed again, and the change is in the client's change log."""
    clock = HoursClock(hours_at(date(2027, 1, 4)))
    harvest = HarvestEmulator(rate_limits=False, clock=clock)
    async with stack(tmp_path, db_url, clock=clock, mapping=HOURLY, harvest=harvest, daemon_extra=BILLING_START) as s:
        account = seed_harvest(harvest)
        project = tasks_project(harvest, account, "Website")
        company = seed_company(s.hub)
        deal = hourly_deal(s.hub, company, project, hourly_rate="100")
        await win_hourly(s, clock, deal, hours_at(date(2027, 1, 4)))
        log_hours(harvest, project, account.development, account.ada, date(2027, 1, 5), "2")
        log_hours(harvest, project, account.development, account.ada, date(2027, 1, 19), "1")
        await hours_tick(s, clock, hours_at(date(2027, 2, 1)))
        (january,) = s.xero.invoices()
        assert Decimal(str(january["SubTotal"])) == Decimal("300.00")

        clock.now = hours_at(date(2027, 2, 10))
        await s.hub.set_deal_properties(deal, {"hourly_rate": "120"})
        await s.drain()
        clock.now = hours_at(date(2027, 2, 16))
        log_hours(harvest, project, account.development, account.ada, date(2027, 2, 3), "2")  # logged late
        log_hours(harvest, project, account.development, account.ada, date(2027, 2, 15), "1")
        await hours_tick(s, clock, hours_at(date(2027, 3, 1)))

        _, february = s.xero.invoices()
        lines = sorted(
            (Decimal(str(line["Quantity"])), Decimal(str(line["UnitAmount"]))) for line in february["LineItems"]
        )
        assert lines == [(Decimal(1), Decimal(120)), (Decimal(2), Decimal(100))]
        assert Decimal(str(february["SubTotal"])) == Decimal("320.00")
        changes = await s.daemon.runtime.store.select(
            ClientChangeRow, table_of(ClientChangeRow).c.field == f"rate@hubspot:deal:{deal}"
        )
        assert [(c.system, c.old, c.new) for c in changes] == [("hubspot", None, "100"), ("hubspot", "100", "120")]
        record = await client_record(s.daemon.runtime.store, f"hubspot:company:{company[0]}", s.config)
        assert record.ids["harvest projects"] == str(project)
        assert record.ids["xero"] == s.xero.contacts()[0]["ContactID"]
        rate = next(f for f in record.fields if f.field == f"rate@hubspot:deal:{deal}")
        assert (rate.value, rate.owner) == ("120", "crm")


async def test_a_failed_write_to_the_crm_company_does_not_hold_back_the_invoice(
    tmp_path: Path, db_url: str, clock: Clock
) -> None:
    """Terms changed at Xero cannot be written on the company (HubSpot refuses it): the invoice still goes out
    with the ledger's terms, the failure is an outcome that needs attention, and the next invoice writes it."""
    async with stack(tmp_path, db_url, clock=clock, daemon_extra=START) as s:
        company = seed_company(s.hub, terms="14")
        await win(s, company)
        (contact,) = s.xero.contacts()
        s.xero.edit_contact(contact["ContactID"], TERMS_45)
        s.hub.faults.add(Fault(kind="status", status=400, method="PATCH", path_contains="/objects/companies/"))
        second = await win(s, company)
        assert due_days(second) == 45
        (failed,) = await list_outcomes(s.daemon.runtime.store, kind="attention")
        assert failed.reason == "client_write_failed"
        assert "could not be written on the CRM company" in failed.detail
        assert s.hub.company(company[0])["properties"]["payment_terms_days"] == "14"
        await win(s, company)
        assert s.hub.company(company[0])["properties"]["payment_terms_days"] == "45"
