"""The three shipped mappings in one config, against the emulators, as a new admin would run them.

Every deal is taken by exactly one pipeline and every invoice line reaches Xero with an
account code: Xero's emulator refuses an approved line without one.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import httpx

from connectors.harvest.emulator import HarvestEmulator
from connectors.hubspot.emulator import HubSpotEmulator
from connectors.xero.emulator import XeroEmulator
from syncd.core.billing import with_ledger_codes
from syncd.core.interfaces import DraftKind, EngagementType, InvoiceLine, InvoiceState
from syncd.core.mapping import load_mapping
from syncd.daemon import Daemon
from syncd.engine import recurring
from syncd.engine.scheduler import poll_connection, tick_recurring
from syncd.plumbing.settings import load_config
from syncd.store.db import DeadLetterRow
from tests.connectors.test_xero import client_record, draft, rig
from tests.harness import HARVEST_URL, REPO, SYNCD_URL, Stack, seed_company, write_config

FIXED = REPO / "mappings" / "hubspot-xero.toml"
RETAINER = REPO / "mappings" / "hubspot-xero-retainer.toml"
HOURLY = REPO / "mappings" / "hubspot-harvest-xero.toml"
SHIPPED = (FIXED, RETAINER, HOURLY)


class Clock:
    """The one clock of the daemon and the emulators."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def at(day: date, hour: int = 15) -> datetime:
    return datetime(day.year, day.month, day.day, hour, tzinfo=UTC)


@contextlib.asynccontextmanager
async def all_three(folder: Path, db_url: str, clock: Clock) -> AsyncIterator[Stack]:
    """A daemon running the three shipped mappings as three pipelines on the same connections."""
    hub = HubSpotEmulator(rate_limits=False, clock=clock)
    xero = XeroEmulator(rate_limits=False, clock=clock)
    harvest = HarvestEmulator(rate_limits=False, clock=clock)
    extra = f"""
[connections.harvest]
connector = "harvest"
base_url = "{HARVEST_URL}"
token = "{harvest.token}"
account_id = "{harvest.account_id}"
user_agent = "syncd tests (ops@example.com)"

[[pipelines]]
crm = "hubspot"
invoicing = "xero"
mapping = "{RETAINER}"

[[pipelines]]
crm = "hubspot"
invoicing = "xero"
mapping = "{HOURLY}"
time_tracking = "harvest"
"""
    path = write_config(
        folder,
        db_url,
        hub,
        xero,
        mapping=FIXED,
        daemon_extra='billing_start = "2026-12-01T00:00:00+00:00"',
        extra=extra,
    )
    config = load_config(path)
    mounts = {
        "http://hubspot.test": httpx.ASGITransport(app=hub.app),
        "http://xero.test": httpx.ASGITransport(app=xero.app),
        "http://harvest.test": httpx.ASGITransport(app=harvest.app),
    }
    daemon = Daemon(config, mounts=mounts, poll=False, workers=0, clock=clock)
    async with (
        daemon.lifespan(),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=daemon.app()), base_url=SYNCD_URL) as web,
    ):
        await daemon.runtime.connectors["hubspot"].ensure_properties()
        hub.subscribe(f"{SYNCD_URL}/webhooks/hubspot", web)
        xero.subscribe(f"{SYNCD_URL}/webhooks/xero", web)
        yield Stack(hub=hub, xero=xero, daemon=daemon, web=web, config=config, harvest=harvest)


def invoices_of(s: Stack, deal_name: str) -> list[dict[str, object]]:
    return [
        invoice
        for invoice in s.xero.invoices()
        if any(str(line["Description"]).startswith(deal_name) for line in invoice["LineItems"])  # type: ignore[attr-defined]
    ]


async def test_one_deal_of_each_type_becomes_one_approved_invoice_with_account_codes(
    tmp_path: Path, db_url: str
) -> None:
    """Fixed fee with and without line items, a retainer and hours from Harvest each make one invoice, all coded."""
    clock = Clock(at(date(2027, 1, 4)))
    async with all_three(tmp_path, db_url, clock) as s:
        assert s.harvest is not None
        company = seed_company(s.hub)
        company_id, contact = company
        common = {"pipeline": "default", "dealstage": "contractsent", "deal_currency_code": "USD"}
        items = s.hub.add_deal(
            {**common, "dealname": "Website rebuild"},
            company_id=company_id,
            contact_ids=[contact],
            line_items=[
                {"name": "Discovery workshop", "quantity": "1", "price": "2500.00", "hs_sku": "SETUP-FEE"},
                {"name": "Build sprint", "quantity": "4", "price": "2500.00"},
            ],
        )
        bare = s.hub.add_deal(
            {**common, "dealname": "Logo design", "billing_type": "fixed_fee", "amount": "1800.00"},
            company_id=company_id,
            contact_ids=[contact],
        )
        retainer = s.hub.add_deal(
            {
                **common,
                "dealname": "Care plan",
                "billing_type": "retainer",
                "amount": "1000.00",
                "service_start_date": "2027-01-01",
            },
            company_id=company_id,
            contact_ids=[contact],
        )
        client = s.harvest.add_client("Northwind")
        task = s.harvest.add_task("Development")
        person = s.harvest.add_user("Ada", "Lovelace")
        project = s.harvest.add_project(client, "Platform", bill_by="Tasks")
        s.harvest.assign_task(project, task, hourly_rate=Decimal("150"))
        s.harvest.assign_user(project, person)
        hourly = s.hub.add_deal(
            {
                **common,
                "dealname": "Platform build",
                "billing_type": "time_and_materials",
                "harvest_project_id": str(project),
                "service_start_date": "2027-01-04",
                "hours_cap": "5",
            },
            company_id=company_id,
            contact_ids=[contact],
        )
        await poll_connection(s.daemon.runtime, "harvest")
        await s.drain()
        for deal in (items, bare, retainer, hourly):
            await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
            await s.drain()
        clock.now = at(date(2027, 1, 6))
        s.harvest.log_time(
            project_id=project, task_id=task, user_id=person, spent_date=date(2027, 1, 5), hours=Decimal(5), notes="x"
        )
        await poll_connection(s.daemon.runtime, "harvest")
        await s.drain()
        await tick_recurring(s.daemon.runtime, functools.partial(recurring.run_due, s.daemon.engine))
        await s.drain()

        assert await s.daemon.runtime.store.select(DeadLetterRow) == []
        found = {
            name: invoices_of(s, name) for name in ("Website rebuild", "Logo design", "Care plan", "Platform build")
        }
        assert {name: len(invoices) for name, invoices in found.items()} == {
            "Website rebuild": 0,  # its lines are named after the line items
            "Logo design": 1,
            "Care plan": 1,
            "Platform build": 1,
        }
        assert len(s.xero.invoices()) == 4
        for invoice in s.xero.invoices():
            assert invoice["Status"] == "AUTHORISED"
            assert all(line["AccountCode"] == "200" for line in invoice["LineItems"])
        (logo,) = found["Logo design"]
        assert [(line["Description"], line["LineAmount"]) for line in logo["LineItems"]] == [  # type: ignore[index]
            ("Logo design", Decimal("1800.00"))
        ]
        (care,) = found["Care plan"]
        assert care["SubTotal"] == Decimal("1000.00")
        (hours,) = found["Platform build"]
        assert hours["SubTotal"] == Decimal("750.00")
        item_lines = [
            line
            for invoice in s.xero.invoices()
            for line in invoice["LineItems"]  # type: ignore[attr-defined]
            if line["Description"] in ("Discovery workshop", "Build sprint")
        ]
        assert [(line["Description"], line["TaxType"]) for line in item_lines] == [
            ("Discovery workshop", "OUTPUT"),
            ("Build sprint", "OUTPUT"),
        ]


async def test_every_line_kind_a_shipped_mapping_makes_is_accepted_by_xero() -> None:
    """Each (engagement type, line kind) a shipped mapping can make, coded by its [accounts], is accepted approved."""
    async with rig() as r:
        contact_id = await r.connector.upsert_customer(client_record())
        created = 0
        for path in SHIPPED:
            mapping = load_mapping(path)
            made = mapping.generated_line_kinds()
            assert made, path
            for number, (engagement_type, kind) in enumerate(made):
                line = InvoiceLine(
                    description=f"{kind} line", quantity=Decimal(1), unit_price=Decimal("10.00"), kind=kind
                )
                note = kind in ("credit", "adjustment")
                raw = draft(
                    key=f"{path.stem}-{number}",
                    lines=(line,),
                    engagement_type=EngagementType(engagement_type),
                    kind=DraftKind.CREDIT_NOTE if note else DraftKind.INVOICE,
                )
                status = await r.connector.create_invoice(with_ledger_codes(raw, mapping.ledger), contact_id)
                assert status.state is InvoiceState.AUTHORISED, (path, engagement_type, kind)
                created += 1
        assert created == len(r.emulator.invoices()) + len(r.emulator.credit_notes())
        assert created >= 10
