"""Recurring billing end to end: a retainer's year against the HubSpot and Xero emulators.

The daemon, the emulators and the webhooks share one injected clock; a test moves it and
runs the hourly recurring tick (:func:`syncd.engine.scheduler.tick_recurring`), then drains the
engine. Each test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import structlog
from typer.testing import CliRunner

from connectors.hubspot.emulator import HubSpotEmulator
from syncd.cli.main import app
from syncd.core.interfaces import Capability
from syncd.engine.recurring import run_due
from syncd.engine.scheduler import tick_recurring
from syncd.store.db import BillingEventRow, DeadLetterRow, EffectRow, EngagementRow, InvoiceTrailRow, table_of
from syncd.store.outcomes import list_outcomes
from tests.harness import MAPPING, REPO, Stack, seed_company, seed_deal, stack

RETAINER = REPO / "mappings" / "hubspot-xero-retainer.toml"
BILLING_START = 'billing_start = "2026-12-01T00:00:00+00:00"'
NEW_YORK = ZoneInfo("America/New_York")


class Clock:
    """The one clock of the daemon and the emulators; tests set it."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def at(day: date, hour: int = 15) -> datetime:
    """``day`` at ``hour`` UTC (10:00 or 11:00 in New York, the clients' zone)."""
    return datetime(day.year, day.month, day.day, hour, tzinfo=UTC)


async def tick(s: Stack, clock: Clock, when: datetime) -> None:
    """Move the clock, run the recurring tick, and process everything it queued."""
    clock.now = when
    assert await tick_recurring(s.daemon.runtime, functools.partial(run_due, s.daemon.engine))
    await s.drain()


async def edit(s: Stack, clock: Clock, when: datetime, deal: str, properties: dict[str, str]) -> None:
    """Edit the deal at HubSpot at ``when`` (its webhook reaches syncd) and process it."""
    clock.now = when
    await s.hub.set_deal_properties(deal, properties)
    await s.drain()


def retainer_deal(hub: HubSpotEmulator, company: tuple[str, str], *, start: str, amount: str = "1000") -> str:
    """An open monthly retainer deal, billed in advance on the 1st."""
    company_id, contact = company
    return hub.add_deal(
        {
            "dealname": "Managed services",
            "dealstage": "contractsent",
            "pipeline": "default",
            "deal_currency_code": "USD",
            "billing_type": "retainer",
            "amount": amount,
            "billing_cycle": "monthly",
            "billing_anchor_day": "1",
            "billing_timing": "advance",
            "service_start_date": start,
        },
        company_id=company_id,
        contact_ids=[contact],
    )


def documents(s: Stack) -> list[tuple[str, str, Decimal]]:
    """Every Xero invoice and credit note as (kind, issue date, subtotal), by date."""
    found = [("invoice", i["DateString"][:10], Decimal(str(i["SubTotal"]))) for i in s.xero.invoices()]
    found += [("credit_note", c["DateString"][:10], Decimal(str(c["SubTotal"]))) for c in s.xero.credit_notes()]
    return sorted(found, key=lambda item: (item[1], item[0]))


# A year of a $1,000/month retainer starting mid-January, upgraded to $1,500 from March 16
# (recorded March 10), downgraded to $1,200 from June 21 (recorded June 20) and cancelled
# with November 20 as its last day (recorded November 5). Worked out by hand:
YEAR = [
    ("invoice", "2027-01-15", Decimal("548.39")),  # Jan 15-31: 17 of 31 days x 1,000 = 548.387
    ("invoice", "2027-02-01", Decimal("1000.00")),
    ("invoice", "2027-03-01", Decimal("1000.00")),
    ("invoice", "2027-03-10", Decimal("258.06")),  # upgrade: Mar 16-31, 16 of 31 days x 500 = 258.064
    ("invoice", "2027-04-01", Decimal("1500.00")),
    ("invoice", "2027-05-01", Decimal("1500.00")),
    ("invoice", "2027-06-01", Decimal("1500.00")),
    ("credit_note", "2027-06-20", Decimal("100.00")),  # downgrade: Jun 21-30, 10 of 30 days x 300
    ("invoice", "2027-07-01", Decimal("1200.00")),
    ("invoice", "2027-08-01", Decimal("1200.00")),
    ("invoice", "2027-09-01", Decimal("1200.00")),
    ("invoice", "2027-10-01", Decimal("1200.00")),
    ("invoice", "2027-11-01", Decimal("1200.00")),
    ("credit_note", "2027-11-05", Decimal("400.00")),  # cancellation: Nov 21-30 unused, 10 of 30 x 1,200
]


def year_ticks() -> list[date]:
    """The 1st and the 15th of every month of 2027, and January 1st 2028."""
    days = [date(2027, month, day) for month in range(1, 13) for day in (1, 15)]
    return [*days, date(2028, 1, 1)]


async def test_a_year_of_a_retainer_matches_the_invoices_worked_out_by_hand(tmp_path: Path, db_url: str) -> None:
    """A year of a retainer with an upgrade, a downgrade and a cancellation gives exactly the hand-computed invoices and credit notes."""
    clock = Clock(at(date(2027, 1, 10)))
    async with stack(tmp_path, db_url, clock=clock, mapping=RETAINER, daemon_extra=BILLING_START) as s:
        deal = retainer_deal(s.hub, seed_company(s.hub), start="2027-01-15")
        await edit(s, clock, at(date(2027, 1, 10)), deal, {"dealstage": "closedwon"})
        changes = {
            date(2027, 3, 10): {"amount": "1500", "amount_effective_date": "2027-03-16"},
            date(2027, 6, 20): {"amount": "1200", "amount_effective_date": "2027-06-21"},
            date(2027, 11, 5): {"cancellation_date": "2027-11-20"},
        }
        for day in sorted({*year_ticks(), *changes}):
            if day in changes:
                await edit(s, clock, at(day), deal, changes[day])
            await tick(s, clock, at(day))
        assert documents(s) == YEAR
        january = min(s.xero.invoices(), key=lambda invoice: invoice["DateString"])
        assert january["LineItems"][0]["Description"] == "Managed services: 2027-01-15 – 2027-01-31, 17 of 31 days"
        (engagement,) = await s.daemon.runtime.store.select(EngagementRow)
        assert [change["amount"] for change in engagement.data["amount_changes"]] == ["1500", "1200"]
        await tick(s, clock, at(date(2028, 3, 1)))
        assert documents(s) == YEAR


async def test_billing_in_one_run_or_many_gives_the_same_invoices(tmp_path: Path, db_url: str) -> None:
    """Half a year billed tick by tick and the same half year billed in one catch-up run give the same invoices."""
    clock = Clock(at(date(2027, 1, 10)))
    async with stack(tmp_path, db_url, clock=clock, mapping=RETAINER, daemon_extra=BILLING_START) as s:
        company = seed_company(s.hub)
        ticked = retainer_deal(s.hub, company, start="2027-01-15")
        caught_up = retainer_deal(s.hub, company, start="2027-01-15")
        await edit(s, clock, at(date(2027, 1, 10)), caught_up, {"billing_type": "not_yet", "dealstage": "closedwon"})
        await edit(s, clock, at(date(2027, 1, 10)), ticked, {"dealstage": "closedwon"})
        for day in year_ticks()[:11]:
            await tick(s, clock, at(day))
        # The second deal was outside the pipeline until now: every period is due at once.
        await edit(s, clock, at(date(2027, 6, 2)), caught_up, {"billing_type": "retainer"})

        rows = await s.daemon.runtime.store.select(BillingEventRow)
        keys = {
            deal: {row.key for row in rows if row.engagement_key == f"hubspot:deal:{deal}"}
            for deal in (ticked, caught_up)
        }

        def billed(deal: str) -> list[tuple[str, Decimal]]:
            stamps = tuple(f"syncd:{key}" for key in keys[deal])
            mine = [i for i in s.xero.invoices() if i["Reference"].endswith(stamps)]
            return sorted((i["LineItems"][0]["Description"], Decimal(str(i["SubTotal"]))) for i in mine)

        assert len(keys[ticked]) == len(keys[caught_up]) == 6
        assert billed(ticked) == billed(caught_up)
        assert [total for _, total in billed(ticked)] == [Decimal("548.39"), *[Decimal("1000.00")] * 5]


async def test_the_recurring_tick_runs_once_per_window_across_replicas(tmp_path: Path, db_url: str) -> None:
    """Two replicas ticking in the same hour run the recurring job once."""
    clock = Clock(at(date(2027, 2, 1)))
    async with stack(tmp_path, db_url, clock=clock, mapping=RETAINER) as s:
        runs: list[int] = []

        async def run() -> int:
            runs.append(1)
            return 0

        ran = [await tick_recurring(s.daemon.runtime, run) for _ in range(3)]
        clock.now += timedelta(hours=1)
        ran.append(await tick_recurring(s.daemon.runtime, run))
        assert ran == [True, False, False, True]
        assert len(runs) == 2


async def test_a_tool_without_credit_notes_gets_no_negative_invoice(tmp_path: Path, db_url: str) -> None:
    """Without credit notes, a downgrade's credit becomes one dead letter for a person; no negative invoice is created."""
    clock = Clock(at(date(2026, 12, 20)))
    async with stack(tmp_path, db_url, clock=clock, mapping=RETAINER, daemon_extra=BILLING_START) as s:
        xero = s.daemon.runtime.connectors["xero"]
        xero.capabilities = frozenset(xero.capabilities - {Capability.CREDIT_NOTES})
        deal = retainer_deal(s.hub, seed_company(s.hub), start="2027-01-01")
        await edit(s, clock, at(date(2026, 12, 20)), deal, {"dealstage": "closedwon"})
        await tick(s, clock, at(date(2027, 1, 1)))
        await edit(s, clock, at(date(2027, 1, 10)), deal, {"amount": "400", "amount_effective_date": "2027-01-16"})
        await tick(s, clock, at(date(2027, 1, 10)))
        await tick(s, clock, at(date(2027, 2, 1)))
        assert documents(s) == [
            ("invoice", "2027-01-01", Decimal("1000.00")),
            ("invoice", "2027-02-01", Decimal("400.00")),
        ]
        assert all(Decimal(str(invoice["Total"])) > 0 for invoice in s.xero.invoices())
        (letter,) = await s.daemon.runtime.store.select(DeadLetterRow)
        assert letter.source == "manual_credit"
        assert letter.status == "open"
        assert "credit 309.68 USD" in letter.reason  # Jan 16-31: 16 of 31 days x 600 = 309.677
        assert "issue it by hand" in letter.reason


def cli(*args: str) -> Any:
    """Run ``syncd`` with ``args`` (call it in a thread: the command runs its own event loop).

    The command configures logging to the runner's stream, which closes afterwards; the
    test's logging is put back.
    """
    saved, handlers = structlog.get_config(), logging.root.handlers[:]
    try:
        return CliRunner().invoke(app, list(args), catch_exceptions=False)
    finally:
        structlog.configure(**saved)
        logging.root.handlers[:] = handlers


async def test_pilot_bills_a_joining_client_from_then_on_and_backfill_makes_the_rest_real(
    tmp_path: Path, db_url: str
) -> None:
    """A client outside the pilot is only simulated; once it joins it is billed from then on, and backfill bills the chosen simulated periods."""
    clock = Clock(at(date(2026, 12, 20)))
    outside = '[pilot]\nclients = ["hubspot:company:none"]'
    async with stack(tmp_path, db_url, clock=clock, mapping=RETAINER, daemon_extra=BILLING_START, extra=outside) as s:
        company = seed_company(s.hub)
        client_key = f"hubspot:company:{company[0]}"
        deal = retainer_deal(s.hub, company, start="2027-01-01")
        await edit(s, clock, at(date(2026, 12, 20)), deal, {"dealstage": "closedwon"})
        await tick(s, clock, at(date(2027, 1, 1)))
        await tick(s, clock, at(date(2027, 2, 1)))
        assert s.xero.invoices() == []
        store = s.daemon.runtime.store
        assert await store.count(BillingEventRow, table_of(BillingEventRow).c.simulated) == 2
        assert await store.count(EffectRow, table_of(EffectRow).c.status == "simulated") == 2
        hub, xero = s.hub, s.xero
    joined = f'[pilot]\nclients = ["{client_key}"]'
    async with stack(
        tmp_path, db_url, clock=clock, mapping=RETAINER, daemon_extra=BILLING_START, extra=joined, hub=hub, xero=xero
    ) as s:
        await tick(s, clock, at(date(2027, 3, 1)))
        assert documents(s) == [("invoice", "2027-03-01", Decimal("1000.00"))]
        config = str(s.config.path)
        today = {datetime.now(UTC).astimezone(NEW_YORK).date().isoformat()}
        result = await asyncio.to_thread(cli, "backfill", "--client", client_key, "--from", "2027-02-01", "-c", config)
        today.add(datetime.now(UTC).astimezone(NEW_YORK).date().isoformat())
        assert result.exit_code == 0, result.output
        assert "1 billing event(s)" in result.output
        await s.drain()
        issued = {invoice["LineItems"][0]["Description"]: invoice["DateString"][:10] for invoice in s.xero.invoices()}
        assert issued.keys() == {
            "Managed services: 2027-02-01 – 2027-02-28",
            "Managed services: 2027-03-01 – 2027-03-31",
        }
        assert issued["Managed services: 2027-03-01 – 2027-03-31"] == "2027-03-01"
        assert issued["Managed services: 2027-02-01 – 2027-02-28"] in today  # re-dated to the day it is issued
        await tick(s, clock, at(date(2027, 3, 2)))
        assert len(s.xero.invoices()) == 2
        store = s.daemon.runtime.store
        (january,) = await store.select(BillingEventRow, table_of(BillingEventRow).c.simulated)
        assert january.occurrence == "2027-01-01"


async def test_simulate_prints_the_cycle_and_changes_nothing(tmp_path: Path, db_url: str) -> None:
    """`syncd simulate --json` lists every period, change and credit note of a client over the range, and writes nothing."""
    clock = Clock(at(date(2026, 11, 20)))
    async with stack(tmp_path, db_url, clock=clock, mapping=RETAINER, daemon_extra=BILLING_START) as s:
        company = seed_company(s.hub)
        deal = retainer_deal(s.hub, company, start="2026-12-10")
        await edit(s, clock, at(date(2026, 11, 20)), deal, {"dealstage": "closedwon"})
        await edit(s, clock, at(date(2026, 11, 25)), deal, {"cancellation_date": "2027-02-14"})
        store = s.daemon.runtime.store
        before = (await store.count(BillingEventRow), await store.count(EffectRow))
        args = ["simulate", "--client", f"hubspot:company:{company[0]}", "--from", "2026-12-01", "--to", "2027-04-01"]
        result = await asyncio.to_thread(cli, *args, "--json", "-c", str(s.config.path))
        assert result.exit_code == 0, result.output
        rows = json.loads(result.output)
        assert [(row["kind"], row["occurrence"], row["total"]) for row in rows] == [
            ("period_due", "2026-12-01", "709.68"),  # Dec 10-31: 22 of 31 days
            ("period_due", "2027-01-01", "1000.00"),
            ("period_due", "2027-02-01", "500.00"),  # Feb 1-14: 14 of 28 days
        ]
        assert {row["status"] for row in rows} == {"new"}
        assert rows[0]["draft"]["lines"][0]["description"] == "Managed services: 2026-12-10 – 2026-12-31, 22 of 31 days"
        table = await asyncio.to_thread(cli, *args, "-c", str(s.config.path))
        assert table.exit_code == 0, table.output
        assert "709.68" in table.output
        assert (await store.count(BillingEventRow), await store.count(EffectRow)) == before


def with_engagement_keys(tmp_path: Path, source: Path, keys: str) -> Path:
    """A copy of the mapping ``source`` with ``keys`` added to its ``[engagement]`` table."""
    text = source.read_text(encoding="utf-8")
    assert text.count("\n[engagement]\n") == 1
    mapping = tmp_path / source.name
    mapping.write_text(text.replace("\n[engagement]\n", f"\n[engagement]\n{keys}\n"), encoding="utf-8")
    return mapping


async def test_a_deposit_is_invoiced_when_the_deal_is_won(tmp_path: Path, db_url: str) -> None:
    """A fixed fee billed on acceptance with a 30% deposit invoices the deposit once when won, and nothing else yet."""
    keys = 'bill_on = { const = "accepted" }\ndeposit_percent = { number = "deal.properties.deposit_percent" }'
    mapping = with_engagement_keys(tmp_path, MAPPING, keys)
    clock = Clock(at(date(2027, 1, 10)))
    async with stack(tmp_path, db_url, clock=clock, mapping=mapping, daemon_extra=BILLING_START) as s:
        deal = seed_deal(s.hub)
        await edit(s, clock, at(date(2027, 1, 10)), deal, {"deposit_percent": "30", "dealstage": "closedwon"})
        await tick(s, clock, at(date(2027, 1, 11)))
        assert documents(s) == [("invoice", "2027-01-10", Decimal("3750.00"))]  # 30% of 12,500.00
        (invoice,) = s.xero.invoices()
        assert invoice["LineItems"][0]["Description"] == "Website rebuild: deposit, 30%"


async def test_a_retainer_invoices_its_first_period_when_won_if_the_mapping_says_so(
    tmp_path: Path, db_url: str
) -> None:
    """With first_period_on_won, a retainer won in December invoices January on the day it is won, then February on its date."""
    mapping = with_engagement_keys(tmp_path, RETAINER, "first_period_on_won = { const = true }")
    clock = Clock(at(date(2026, 12, 20)))
    async with stack(tmp_path, db_url, clock=clock, mapping=mapping, daemon_extra=BILLING_START) as s:
        deal = retainer_deal(s.hub, seed_company(s.hub), start="2027-01-01")
        await edit(s, clock, at(date(2026, 12, 20)), deal, {"dealstage": "closedwon"})
        await tick(s, clock, at(date(2026, 12, 21)))
        await tick(s, clock, at(date(2027, 1, 1)))
        await tick(s, clock, at(date(2027, 2, 1)))
        assert documents(s) == [
            ("invoice", "2026-12-20", Decimal("1000.00")),
            ("invoice", "2027-02-01", Decimal("1000.00")),
        ]


async def test_a_cancellation_credit_is_allocated_to_the_invoice_it_credits(tmp_path: Path, db_url: str) -> None:
    """Cancelled mid-month after November was invoiced: the credit note is applied to November's invoice, once."""
    clock = Clock(at(date(2027, 10, 20)))
    async with stack(tmp_path, db_url, clock=clock, mapping=RETAINER, daemon_extra=BILLING_START) as s:
        deal = retainer_deal(s.hub, seed_company(s.hub), start="2027-11-01", amount="1200")
        await edit(s, clock, at(date(2027, 10, 20)), deal, {"dealstage": "closedwon"})
        await tick(s, clock, at(date(2027, 11, 1)))
        await edit(s, clock, at(date(2027, 11, 5)), deal, {"cancellation_date": "2027-11-20"})
        await tick(s, clock, at(date(2027, 11, 6)))
        await tick(s, clock, at(date(2027, 11, 7)))
        (november,) = s.xero.invoices()
        (credit,) = s.xero.credit_notes()
        assert Decimal(str(credit["RemainingCredit"])) == 0
        assert Decimal(str(november["AmountDue"])) == Decimal(str(november["Total"])) - Decimal(str(credit["Total"]))
        props = s.hub.deal(deal)["properties"]
        assert Decimal(props["syncd_amount_due"]) == Decimal(str(november["AmountDue"]))
        assert await list_outcomes(s.daemon.runtime.store, kind="attention") == []
        # syncd's own credit note applied to the invoice is no hand correction (syncd/store/trail.py)
        store = s.daemon.runtime.store
        assert await store.count(InvoiceTrailRow, table_of(InvoiceTrailRow).c.kind == "correction") == 0


async def test_a_trigger_in_a_locked_period_is_invoiced_on_the_first_open_day(tmp_path: Path, db_url: str) -> None:
    """Xero's ledger locked to Nov 30: a Nov 1 invoice that reaches Xero late is dated Dec 1 and says which day it was for."""
    clock = Clock(at(date(2027, 10, 20)))
    async with stack(tmp_path, db_url, clock=clock, mapping=RETAINER, daemon_extra=BILLING_START) as s:
        deal = retainer_deal(s.hub, seed_company(s.hub), start="2027-11-01", amount="1200")
        await edit(s, clock, at(date(2027, 10, 20)), deal, {"dealstage": "closedwon"})
        clock.now = at(date(2027, 11, 1))
        assert await tick_recurring(s.daemon.runtime, functools.partial(run_due, s.daemon.engine))
        # the invoice is queued on Nov 1; Xero is not reached until Dec 3, after November was locked
        s.xero.set_lock_dates(period=date(2027, 11, 30))
        clock.now = at(date(2027, 12, 3))
        await s.drain()
        (invoice,) = s.xero.invoices()
        assert invoice["DateString"][:10] == "2027-12-01"
        assert invoice["DueDateString"][:10] == "2027-12-15"  # 14 days, the client's terms
        assert all("(for 2027-11-01)" in line["Description"] for line in invoice["LineItems"])
        assert not await s.daemon.runtime.store.select(DeadLetterRow)


async def seven_won_retainers(s: Stack, clock: Clock) -> list[str]:
    """Seven monthly retainers of one client won on Dec 20, first billed on Jan 1 (1,000 to 1,006)."""
    company = seed_company(s.hub)
    deals = [retainer_deal(s.hub, company, start="2027-01-01", amount=str(1000 + n)) for n in range(7)]
    for deal in deals:
        await edit(s, clock, at(date(2026, 12, 20)), deal, {"dealstage": "closedwon"})
    return deals


async def test_the_hourly_run_reads_engagements_page_by_page_and_handles_each_once(tmp_path: Path, db_url: str) -> None:
    """Seven won retainers read three at a time: each handled once, each first period invoiced once."""
    clock = Clock(at(date(2026, 12, 20)))
    async with stack(tmp_path, db_url, clock=clock, mapping=RETAINER, daemon_extra=BILLING_START) as s:
        deals = await seven_won_retainers(s, clock)
        assert s.xero.invoices() == []  # billed in advance on January 1st
        clock.now = at(date(2027, 1, 1))
        with structlog.testing.capture_logs() as logs:
            recorded = await run_due(s.daemon.engine, page_size=3)
        await s.drain()
        (done,) = [entry for entry in logs if entry["event"] == "recurring_run_done"]
        assert (done["engagements"], done["recorded"], recorded) == (7, 7, 7)
        assert sorted(Decimal(str(i["SubTotal"])) for i in s.xero.invoices()) == [Decimal(1000 + n) for n in range(7)]
        rows = await s.daemon.runtime.store.select(BillingEventRow)
        assert sorted(row.engagement_key for row in rows) == sorted(f"hubspot:deal:{deal}" for deal in deals)
        assert await run_due(s.daemon.engine, page_size=3) == 0


async def test_the_hourly_run_queues_a_page_in_one_transaction_and_a_failing_engagement_alone_is_left_out(
    tmp_path: Path, db_url: str
) -> None:
    """Seven retainers due at once, one of them broken: one write transaction for the page, six invoices.

    The month start's invoices reach the outbox together, so the workers claim them together
    and the ledger's calls carry full batches; a failure is rolled back to its own savepoint.
    """
    clock = Clock(at(date(2026, 12, 20)))
    async with stack(tmp_path, db_url, clock=clock, mapping=RETAINER, daemon_extra=BILLING_START) as s:
        deals = await seven_won_retainers(s, clock)
        store = s.daemon.runtime.store
        broken = f"hubspot:deal:{deals[3]}"
        async with store.begin() as conn:  # its client is gone: billing it raises RecordError
            table = table_of(EngagementRow)
            await conn.execute(table.update().where(table.c.key == broken).values(client_key="client-gone"))
        clock.now = at(date(2027, 1, 1))
        before = store.transactions
        with structlog.testing.capture_logs() as logs:
            recorded = await run_due(s.daemon.engine)
        assert store.transactions - before <= 3  # the page's read(s) and one write for all seven
        assert recorded == 6
        (failed,) = [entry for entry in logs if entry["event"] == "recurring_billing_failed"]
        assert failed["engagement"] == broken
        assert "client-gone" in failed["error"]
        await s.drain()
        assert sorted(Decimal(str(i["SubTotal"])) for i in s.xero.invoices()) == [
            Decimal(1000 + n) for n in range(7) if n != 3
        ]
        rows = await store.select(BillingEventRow)
        assert broken not in {row.engagement_key for row in rows}  # nothing of it was kept
