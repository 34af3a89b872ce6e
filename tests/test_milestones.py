"""Milestones done at the time tracker, end to end: HubSpot deals, Harvest tasks, Xero invoices.

A ``milestone`` deal's line items are its milestones; each may name a Harvest task of the
deal's Harvest project. Archiving that task on the project (or archiving the project)
marks the milestone done, and the hourly recurring tick invoices it once. Each test runs
on SQLite and on PostgreSQL.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from pathlib import Path

from connectors.harvest.emulator import HarvestEmulator
from connectors.hubspot.emulator import HubSpotEmulator
from syncd.store.db import BillingEventRow
from tests.harness import REPO, Stack, seed_company, stack
from tests.test_hours import BILLING_START, Clock, at, subtotals, tick, win

HOURLY = REPO / "mappings" / "hubspot-harvest-xero.toml"

MILESTONE_ENGAGEMENT = """
[engagement]
type = "milestone"
name = { path = "deal.properties.dealname" }
currency = { path = "deal.properties.deal_currency_code", default = { path = "defaults.currency" } }
time_project_id = { path = "deal.properties.harvest_project_id" }

[engagement.milestones]
each = "line_items"
id = { path = "item.id" }
name = { path = "item.properties.name" }
amount = { money = "item.properties.price" }
tracker_task_id = { path = "item.properties.harvest_task_id" }
tracker_done_when = { path = "item.properties.harvest_done_when", default = "task_inactive" }
"""


def milestone_mapping(folder: Path) -> Path:
    """The hourly worked example with its engagement mapped as Harvest-tracked milestones."""
    text = HOURLY.read_text()
    head, rest = text.split("[engagement]\n", 1)
    tail = rest[rest.index("[invoice]") :]
    head = head.replace('equals = "time_and_materials"', 'equals = "milestones"')
    path = folder / "hubspot-harvest-milestones.toml"
    path.write_text(head + MILESTONE_ENGAGEMENT + "\n" + tail)
    return path


def milestone_deal(hub: HubSpotEmulator, project: int, items: list[dict[str, str]]) -> str:
    """An open milestone deal billing Harvest ``project``, one line item per milestone."""
    company_id, contact = seed_company(hub)
    return hub.add_deal(
        {
            "dealname": "Website",
            "dealstage": "contractsent",
            "pipeline": "default",
            "deal_currency_code": "USD",
            "billing_type": "milestones",
            "harvest_project_id": str(project),
        },
        company_id=company_id,
        contact_ids=[contact],
        line_items=items,
    )


def descriptions(s: Stack) -> list[str]:
    """Every Xero invoice's line descriptions, in creation order."""
    return [line["Description"] for invoice in s.xero.invoices() for line in invoice["LineItems"]]


async def test_a_task_archived_at_harvest_invoices_its_milestone_once(tmp_path: Path, db_url: str) -> None:
    """Archiving a milestone's task on the Harvest project invoices that milestone once, at the next tick."""
    clock = Clock(at(date(2027, 1, 4)))
    harvest = HarvestEmulator(rate_limits=False, clock=clock)
    mapping = milestone_mapping(tmp_path)
    async with stack(tmp_path, db_url, clock=clock, mapping=mapping, harvest=harvest, daemon_extra=BILLING_START) as s:
        client = harvest.add_client("Northwind")
        design, build = harvest.add_task("Design"), harvest.add_task("Build")
        project = harvest.add_project(client, "Website", bill_by="Tasks")
        design_assignment = harvest.assign_task(project, design)
        build_assignment = harvest.assign_task(project, build)
        deal = milestone_deal(
            s.hub,
            project,
            [
                {"name": "Design phase", "quantity": "1", "price": "4000.00", "harvest_task_id": str(design)},
                {"name": "Build phase", "quantity": "1", "price": "6000.00", "harvest_task_id": str(build)},
            ],
        )
        await win(s, clock, deal, at(date(2027, 1, 4)))
        await tick(s, clock, at(date(2027, 1, 5)))
        assert subtotals(s) == []

        clock.now = at(date(2027, 1, 11), hour=9)
        harvest.set_task_assignment_active(design_assignment, False)
        await tick(s, clock, at(date(2027, 1, 11), hour=10))
        await tick(s, clock, at(date(2027, 1, 11), hour=11))
        assert subtotals(s) == [Decimal("4000.00")]
        assert descriptions(s) == ["Design phase"]

        clock.now = at(date(2027, 1, 25), hour=9)
        harvest.set_task_assignment_active(build_assignment, False)
        await tick(s, clock, at(date(2027, 1, 25), hour=10))
        await tick(s, clock, at(date(2027, 1, 26), hour=10))
        assert subtotals(s) == [Decimal("4000.00"), Decimal("6000.00")]
        assert descriptions(s) == ["Design phase", "Build phase"]
        events = await s.daemon.runtime.store.select(BillingEventRow)
        assert sorted(row.kind for row in events) == ["milestone_done", "milestone_done"]
        # each completes when Harvest archived its task (the assignment's updated_at), not when syncd saw it
        assert sorted(row.occurred_at for row in events) == [
            at(date(2027, 1, 11), hour=9),
            at(date(2027, 1, 25), hour=9),
        ]


async def test_an_archived_project_invoices_its_milestone_and_a_restored_task_no_second(
    tmp_path: Path, db_url: str
) -> None:
    """A project-archived milestone invoices when the project is archived; restoring and archiving a task again bills nothing more."""
    clock = Clock(at(date(2027, 1, 4)))
    harvest = HarvestEmulator(rate_limits=False, clock=clock)
    mapping = milestone_mapping(tmp_path)
    async with stack(tmp_path, db_url, clock=clock, mapping=mapping, harvest=harvest, daemon_extra=BILLING_START) as s:
        client = harvest.add_client("Northwind")
        design = harvest.add_task("Design")
        project = harvest.add_project(client, "Website", bill_by="Tasks")
        design_assignment = harvest.assign_task(project, design)
        deal = milestone_deal(
            s.hub,
            project,
            [
                {"name": "Design phase", "quantity": "1", "price": "1500.00", "harvest_task_id": str(design)},
                {"name": "Handover", "quantity": "1", "price": "2500.00", "harvest_done_when": "project_archived"},
            ],
        )
        await win(s, clock, deal, at(date(2027, 1, 4)))

        clock.now = at(date(2027, 1, 8), hour=9)
        harvest.set_task_assignment_active(design_assignment, False)
        await tick(s, clock, at(date(2027, 1, 8), hour=10))
        harvest.set_task_assignment_active(design_assignment, True)
        await tick(s, clock, at(date(2027, 1, 8), hour=11))
        harvest.set_task_assignment_active(design_assignment, False)
        await tick(s, clock, at(date(2027, 1, 8), hour=12))
        assert descriptions(s) == ["Design phase"]

        clock.now = at(date(2027, 2, 1), hour=9)
        harvest.set_project_active(project, False)
        await tick(s, clock, at(date(2027, 2, 1), hour=10))
        await tick(s, clock, at(date(2027, 2, 1), hour=11))
        assert subtotals(s) == [Decimal("1500.00"), Decimal("2500.00")]
        assert descriptions(s) == ["Design phase", "Handover"]
        events = await s.daemon.runtime.store.select(BillingEventRow)
        assert max(row.occurred_at for row in events) == at(date(2027, 2, 1), hour=9)  # the project's updated_at
