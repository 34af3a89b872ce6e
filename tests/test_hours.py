"""Hourly billing end to end: HubSpot deals linked to Harvest projects, invoiced at Xero.

The Harvest emulator is mounted at ``http://harvest.test`` beside the HubSpot and Xero
emulators (``tests/harness.py``); all of them and the daemon share one injected clock.
Each test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import structlog
from typer.testing import CliRunner

from connectors.harvest.emulator import HarvestEmulator
from connectors.hubspot.emulator import HubSpotEmulator
from syncd.cli.main import app
from syncd.engine import hours, recurring
from syncd.engine.scheduler import poll_connection, tick_recurring
from syncd.plumbing.serving import free_port, serve
from syncd.store.db import BillingEventRow, EffectRow, EngagementRow, TimeEntryRow, table_of
from syncd.store.outcomes import list_outcomes
from tests.harness import REPO, Stack, seed_company, stack, write_config

HOURLY = REPO / "mappings" / "hubspot-harvest-xero.toml"
BILLING_START = 'billing_start = "2026-12-01T00:00:00+00:00"'


class Clock:
    """The one clock of the daemon and the emulators; tests set it."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def at(day: date, hour: int = 15) -> datetime:
    """``day`` at ``hour`` UTC (10:00 in New York in winter)."""
    return datetime(day.year, day.month, day.day, hour, tzinfo=UTC)


@dataclass(frozen=True)
class Account:
    """Ids of a seeded Harvest account: one client, two tasks, two people."""

    client: int
    development: int
    design: int
    ada: int
    grace: int


def seed_harvest(harvest: HarvestEmulator) -> Account:
    """A Harvest client with tasks and people, no projects yet."""
    return Account(
        client=harvest.add_client("Northwind"),
        development=harvest.add_task("Development"),
        design=harvest.add_task("Design"),
        ada=harvest.add_user("Ada", "Lovelace"),
        grace=harvest.add_user("Grace", "Hopper", default_hourly_rate=Decimal("140")),
    )


def tasks_project(harvest: HarvestEmulator, account: Account, name: str) -> int:
    """A project billed by task: Development at 150/h, Design at 120/h; Ada assigned."""
    project = harvest.add_project(account.client, name, bill_by="Tasks")
    harvest.assign_task(project, account.development, hourly_rate=Decimal("150"))
    harvest.assign_task(project, account.design, hourly_rate=Decimal("120"))
    harvest.assign_user(project, account.ada)
    return project


def hourly_deal(hub: HubSpotEmulator, company: tuple[str, str], project: int, **properties: str) -> str:
    """An open time-and-materials deal billing Harvest ``project``."""
    company_id, contact = company
    return hub.add_deal(
        {
            "dealname": f"Build {project}",
            "dealstage": "contractsent",
            "pipeline": "default",
            "deal_currency_code": "USD",
            "billing_type": "time_and_materials",
            "harvest_project_id": str(project),
            "service_start_date": "2027-01-04",
            **properties,
        },
        company_id=company_id,
        contact_ids=[contact],
    )


def log(harvest: HarvestEmulator, project: int, task: int, user: int, day: date, hours_: str) -> int:
    """Log hours at Harvest as a person would."""
    return harvest.log_time(
        project_id=project, task_id=task, user_id=user, spent_date=day, hours=Decimal(hours_), notes="work"
    )


async def win(s: Stack, clock: Clock, deal: str, when: datetime) -> None:
    """Win the deal at HubSpot at ``when`` and process its webhook."""
    clock.now = when
    await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
    await s.drain()


async def poll_harvest(s: Stack) -> None:
    """One poll of Harvest's change feed (hints into the inbox), then process everything."""
    await poll_connection(s.daemon.runtime, "harvest")
    await s.drain()


async def tick(s: Stack, clock: Clock, when: datetime) -> None:
    """Move the clock, run the recurring tick if this hour's window is free, and process."""
    clock.now = when
    await tick_recurring(s.daemon.runtime, functools.partial(recurring.run_due, s.daemon.engine))
    await s.drain()


def subtotals(s: Stack) -> list[Decimal]:
    """The subtotal of every Xero invoice, in creation order."""
    return [Decimal(str(invoice["SubTotal"])) for invoice in s.xero.invoices()]


async def test_the_cap_trigger_fires_once_per_step_and_holds_hours_over_the_cap(tmp_path: Path, db_url: str) -> None:
    """Hours reaching each cap step invoice once; hours past a not-to-exceed cap are held, never invoiced."""
    clock = Clock(at(date(2027, 1, 4)))
    harvest = HarvestEmulator(rate_limits=False, clock=clock)
    async with stack(tmp_path, db_url, clock=clock, mapping=HOURLY, harvest=harvest, daemon_extra=BILLING_START) as s:
        account = seed_harvest(harvest)
        project = tasks_project(harvest, account, "Website")
        deal = hourly_deal(s.hub, seed_company(s.hub), project, hours_cap="10", cap_step_percent="50")
        await poll_harvest(s)  # the first poll starts Harvest's feed from now
        await win(s, clock, deal, at(date(2027, 1, 4)))

        clock.now = at(date(2027, 1, 6))
        log(harvest, project, account.development, account.ada, date(2027, 1, 5), "3")
        log(harvest, project, account.development, account.ada, date(2027, 1, 6), "3")
        await poll_harvest(s)
        assert subtotals(s) == [Decimal("900.00")]  # step 1 (5 h) reached at 6 h: 6 x 150
        (first,) = s.xero.invoices()
        assert first["LineItems"][0]["Description"] == f"Build {project}: Development, 2027-01-05 – 2027-01-06"

        clock.now = at(date(2027, 1, 12))
        log(harvest, project, account.design, account.ada, date(2027, 1, 11), "2")
        log(harvest, project, account.development, account.ada, date(2027, 1, 12), "3")
        await poll_harvest(s)
        # step 2 (10 h): 2 h design fit, and of the 3 h development the 2 h under the cap are billed, 1 h held
        assert subtotals(s) == [Decimal("900.00"), Decimal("540.00")]

        clock.now = at(date(2027, 1, 13))
        log(harvest, project, account.development, account.ada, date(2027, 1, 13), "1")
        for _ in range(2):
            await poll_harvest(s)
            await tick(s, clock, at(date(2027, 1, 13)))
        await tick(s, clock, at(date(2027, 2, 1)))
        assert subtotals(s) == [Decimal("900.00"), Decimal("540.00")]
        events = await s.daemon.runtime.store.select(BillingEventRow)
        assert sorted((row.kind, row.occurrence) for row in events) == [
            ("hours_cap_reached", "1"),
            ("hours_cap_reached", "2"),
            ("period_due", "2027-01-01"),  # recorded with nothing to invoice: the rest is over the cap
        ]
        assert await s.daemon.runtime.store.count(EffectRow, table_of(EffectRow).c.kind == "create_invoice") == 2

        # the 2 h over the cap are listed with their reason and need a person ...
        (held,) = await hours.unbilled(s.daemon.runtime)
        assert held.over_cap_hours == Decimal(2)
        attention = await list_outcomes(s.daemon.runtime.store, kind="attention")
        assert {item.reason for item in attention} == {"hours_over_cap"}

        # ... who releases them: the next hours invoice bills them, once
        for entry_id in held.over_cap_entries:
            assert await hours.release_over_cap(s.daemon.runtime.store, "harvest", entry_id, clock.now)
        await tick(s, clock, at(date(2027, 3, 1)))
        await tick(s, clock, at(date(2027, 3, 2)))
        assert subtotals(s) == [Decimal("900.00"), Decimal("540.00"), Decimal("300.00")]
        assert await hours.unbilled(s.daemon.runtime) == []


async def test_a_restart_in_the_middle_of_a_period_run_creates_nothing_twice(tmp_path: Path, db_url: str) -> None:
    """A daemon stopped after queuing part of a period run, then restarted on the same database, invoices each period once."""
    clock = Clock(at(date(2027, 1, 4)))
    harvest = HarvestEmulator(rate_limits=False, clock=clock)
    async with stack(tmp_path, db_url, clock=clock, mapping=HOURLY, harvest=harvest, daemon_extra=BILLING_START) as s:
        account = seed_harvest(harvest)
        company = seed_company(s.hub)
        projects = [tasks_project(harvest, account, name) for name in ("Alpha", "Beta")]
        deals = [hourly_deal(s.hub, company, project) for project in projects]
        for deal in deals:
            await win(s, clock, deal, at(date(2027, 1, 4)))
        clock.now = at(date(2027, 1, 20))
        for day, hours_ in ((date(2027, 1, 5), "4.5"), (date(2027, 1, 19), "2.25")):
            log(harvest, projects[0], account.development, account.ada, day, hours_)
            log(harvest, projects[1], account.design, account.ada, day, hours_)

        clock.now = at(date(2027, 2, 1))
        runtime, engine = s.daemon.runtime, s.daemon.engine
        tracker = runtime.pipelines[0].time_tracker
        assert tracker is not None
        await hours.sync_entries(runtime, "harvest", tracker)
        rows = await runtime.store.select(EngagementRow, order_by=table_of(EngagementRow).c.crm_object_id)
        alpha = next(row for row in rows if row.crm_object_id == deals[0])
        assert len(await recurring.bill_row(engine, runtime.pipelines[0], alpha)) == 1
        hub, xero = s.hub, s.xero
    # The daemon stopped after queuing Alpha's January invoice and before Beta's, with nothing sent.
    assert xero.invoices() == []
    clock.now = at(date(2027, 2, 1), hour=16)
    async with stack(
        tmp_path,
        db_url,
        clock=clock,
        mapping=HOURLY,
        harvest=harvest,
        hub=hub,
        xero=xero,
        daemon_extra=BILLING_START,
    ) as s:
        for _ in range(2):
            await recurring.run_due(s.daemon.engine)
            await s.drain()
        await tick(s, clock, at(date(2027, 2, 1), hour=18))
        store = s.daemon.runtime.store
        descriptions = sorted(invoice["LineItems"][0]["Description"] for invoice in s.xero.invoices())
        assert descriptions == [
            f"Build {projects[0]}: Development, 2027-01-05 – 2027-01-19",
            f"Build {projects[1]}: Design, 2027-01-05 – 2027-01-19",
        ]
        assert sorted(subtotals(s)) == [Decimal("810.00"), Decimal("1012.50")]  # 6.75 h x 120, 6.75 h x 150
        stamped = await store.select(TimeEntryRow)
        keys = {row.project_id: {row.invoice_key} for row in stamped}
        assert len(stamped) == 4
        assert all(len(found) == 1 and None not in found for found in keys.values())
        assert await store.count(BillingEventRow) == 2
        assert await hours.unbilled(s.daemon.runtime) == []


def cli(*args: str, env: dict[str, str] | None = None) -> Any:
    """Run ``syncd`` (call it in a thread: the command runs its own event loop); logging is put back."""
    saved, handlers = structlog.get_config(), logging.root.handlers[:]
    try:
        return CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)
    finally:
        structlog.configure(**saved)
        logging.root.handlers[:] = handlers


async def test_unbilled_lists_hours_on_no_invoice_with_their_worth(tmp_path: Path, db_url: str) -> None:
    """`syncd unbilled` shows each project's billable hours on no invoice and their amount at the project's rates."""
    clock = Clock(at(date(2027, 1, 4)))
    harvest = HarvestEmulator(rate_limits=False, clock=clock)
    async with stack(tmp_path, db_url, clock=clock, mapping=HOURLY, harvest=harvest, daemon_extra=BILLING_START) as s:
        account = seed_harvest(harvest)
        project = harvest.add_project(account.client, "Retained team", bill_by="People")
        harvest.assign_task(project, account.development)
        ada = harvest.assign_user(project, account.ada, hourly_rate=Decimal("160"))
        harvest.assign_user(project, account.grace)  # her default rate: 140
        loose = tasks_project(harvest, account, "Not on any deal")
        company = seed_company(s.hub)
        client_key = f"hubspot:company:{company[0]}"
        deal = hourly_deal(s.hub, company, project)
        await win(s, clock, deal, at(date(2027, 1, 4)))
        clock.now = at(date(2027, 1, 10))
        log(harvest, project, account.development, account.ada, date(2027, 1, 7), "2.5")
        log(harvest, project, account.development, account.grace, date(2027, 1, 8), "1.25")
        harvest.update_time_entry(
            log(harvest, project, account.development, account.ada, date(2027, 1, 9), "4"), billable=False
        )
        log(harvest, loose, account.development, account.ada, date(2027, 1, 9), "2")
        # A custom rate changed on the project applies to every hour, earlier ones too:
        # https://support.getharvest.com/hc/en-us/articles/12522267831181-Editing-billable-rates
        harvest.user_assignments[ada].hourly_rate = Decimal("175")
        await tick(s, clock, at(date(2027, 1, 10)))
        assert s.xero.invoices() == []

        found = await hours.unbilled(s.daemon.runtime)
        assert [(item.project_id, item.client_key, item.hours, item.amount) for item in found] == [
            (str(project), client_key, Decimal("3.75"), Decimal("612.50")),  # 2.5 x 175 + 1.25 x 140
            (str(loose), None, Decimal("2"), None),
        ]
        port = free_port()
        config = write_config(
            tmp_path,
            db_url,
            s.hub,
            s.xero,
            mapping=HOURLY,
            harvest=harvest,
            harvest_url=f"http://127.0.0.1:{port}/v2",
            name="cli.toml",
        )
        async with serve(harvest.app, port):
            result = await asyncio.to_thread(cli, "unbilled", "-c", str(config), env={"COLUMNS": "80"})
            listed = await asyncio.to_thread(cli, "unbilled", "-c", str(config), "--json")
        assert (result.exit_code, listed.exit_code) == (0, 0), result.output + listed.output
        rows = json.loads(listed.output)
        assert [(r["project_id"], r["client"], r["hours"], r["amount"], r["currency"]) for r in rows] == [
            (str(project), client_key, "3.75", "612.50", "USD"),
            (str(loose), None, "2.0", None, None),
        ]
        assert (rows[0]["client_name"], rows[0]["deal_name"]) == ("Northwind Traders LLC", f"Build {project}")
        assert rows[1]["note"] == "no engagement bills this project"
        text = result.output.splitlines()
        assert max(len(line) for line in text) <= 80
        assert f"Northwind Traders LLC ({client_key})" in text
        assert f"  project: harvest:{project}" in text
        assert f"  deal:    Build {project} (hubspot:deal:{deal})" in text
        assert "  hours:   3.75 h · 612.50 USD" in text
        assert "  note:    no engagement bills this project" in text

        await tick(s, clock, at(date(2027, 2, 1)))
        assert subtotals(s) == [Decimal("612.50")]
        assert [item.project_id for item in await hours.unbilled(s.daemon.runtime)] == [str(loose)]


async def test_the_cap_can_come_from_the_harvest_project_budget(tmp_path: Path, db_url: str) -> None:
    """With cap_from_tracker, the Harvest project's budget in hours is the cap; hours past it are held."""
    mapping = tmp_path / "budget.toml"
    mapping.write_text(HOURLY.read_text().replace("# cap_from_tracker = true", "cap_from_tracker = true"))
    clock = Clock(at(date(2027, 1, 4)))
    harvest = HarvestEmulator(rate_limits=False, clock=clock)
    async with stack(tmp_path, db_url, clock=clock, mapping=mapping, harvest=harvest, daemon_extra=BILLING_START) as s:
        account = seed_harvest(harvest)
        project = harvest.add_project(
            account.client, "Audit", bill_by="Project", hourly_rate=Decimal("200"), budget=Decimal("4")
        )
        harvest.assign_task(project, account.development)
        harvest.assign_user(project, account.ada)
        deal = hourly_deal(s.hub, seed_company(s.hub), project)
        await win(s, clock, deal, at(date(2027, 1, 4)))
        clock.now = at(date(2027, 1, 8))
        log(harvest, project, account.development, account.ada, date(2027, 1, 6), "3")
        log(harvest, project, account.development, account.ada, date(2027, 1, 7), "2")
        await tick(s, clock, at(date(2027, 1, 8)))
        # 4 h budget reached at 5 h: 3 h fit, and 1 h of the 2 h entry; its other hour is held
        assert subtotals(s) == [Decimal("800.00")]
        (event,) = await s.daemon.runtime.store.select(BillingEventRow)
        assert (event.kind, event.occurrence) == ("hours_cap_reached", "1")


async def test_hours_under_the_cap_are_a_recorded_skip(tmp_path: Path, db_url: str) -> None:
    """A time entry that reaches no cap step yet ends as a recorded skip saying how far the hours are."""
    clock = Clock(at(date(2027, 1, 4)))
    harvest = HarvestEmulator(rate_limits=False, clock=clock)
    async with stack(tmp_path, db_url, clock=clock, mapping=HOURLY, harvest=harvest, daemon_extra=BILLING_START) as s:
        account = seed_harvest(harvest)
        project = tasks_project(harvest, account, "Website")
        deal = hourly_deal(s.hub, seed_company(s.hub), project, hours_cap="10", cap_step_percent="50")
        await poll_harvest(s)
        await win(s, clock, deal, at(date(2027, 1, 4)))
        clock.now = at(date(2027, 1, 6))
        log(harvest, project, account.development, account.ada, date(2027, 1, 6), "3")
        await poll_harvest(s)
        assert subtotals(s) == []
        (skip,) = await list_outcomes(s.daemon.runtime.store, kind="skip")
        assert skip.reason == "under_cap"
        assert "3.0 of 10 h" in skip.detail


async def test_unbilled_reads_projects_page_by_page_and_lists_each_once(tmp_path: Path, db_url: str) -> None:
    """Seven projects read two at a time: each with open hours listed once, the invoiced one not at all."""
    clock = Clock(at(date(2027, 1, 4)))
    harvest = HarvestEmulator(rate_limits=False, clock=clock)
    async with stack(tmp_path, db_url, clock=clock, mapping=HOURLY, harvest=harvest, daemon_extra=BILLING_START) as s:
        account = seed_harvest(harvest)
        company = seed_company(s.hub)
        projects = [tasks_project(harvest, account, f"Project {n}") for n in range(7)]
        invoiced, linked, *loose = projects
        await win(s, clock, hourly_deal(s.hub, company, invoiced), at(date(2027, 1, 4)))
        await win(s, clock, hourly_deal(s.hub, company, linked), at(date(2027, 1, 4)))
        clock.now = at(date(2027, 1, 10))
        log(harvest, invoiced, account.development, account.ada, date(2027, 1, 7), "3")
        await tick(s, clock, at(date(2027, 2, 1)))  # January's hours of the first project are invoiced
        assert subtotals(s) == [Decimal("450.00")]
        clock.now = at(date(2027, 2, 3))
        for n, project in enumerate(projects[1:], start=1):
            log(harvest, project, account.development, account.ada, date(2027, 2, 2), str(n))
        await tick(s, clock, at(date(2027, 2, 3)))  # reads the new entries
        found = await hours.unbilled(s.daemon.runtime, page_size=2)
        assert [(item.project_id, item.client_key, item.hours) for item in found] == [
            (str(linked), f"hubspot:company:{company[0]}", Decimal(1)),
            *sorted((str(project), None, Decimal(n)) for n, project in enumerate(loose, start=2)),
        ]
        assert found == await hours.unbilled(s.daemon.runtime)  # the same with the default page
