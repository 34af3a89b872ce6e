"""`syncd simulate` runs the daemon's own decisions: for every shipped mapping, its drafts are the daemon's.

The daemon runs the three shipped mappings over two months of history (a fixed-fee
deal, a retainer with a mid-month start and an upgrade, hours from Harvest reaching a cap
step on the day a period ends); then ``simulate`` replays the same client over the same
range, and its drafts must equal the invoices the daemon queued, event by event.
"""

from __future__ import annotations

import functools
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from syncd.core.interfaces import InvoiceDraft
from syncd.engine import recurring
from syncd.engine.scheduler import poll_connection, tick_recurring
from syncd.store.db import DeadLetterRow, EffectRow, table_of
from tests.harness import seed_company
from tests.test_shipped_mappings import Clock, all_three, at


def essentials(draft: InvoiceDraft) -> tuple[Any, ...]:
    lines = tuple(
        (line.description, line.quantity, line.unit_price, line.account_code, line.tax_type) for line in draft.lines
    )
    return (draft.key, str(draft.kind), draft.issue_date, draft.due_date, draft.reference, draft.currency, lines)


async def test_simulate_drafts_equal_the_daemons_for_every_shipped_mapping(tmp_path: Path, sqlite_url: str) -> None:
    """Fixed fee, retainer and hourly engagements: simulate and the daemon make the same drafts for the same history."""
    clock = Clock(at(date(2027, 1, 3)))
    async with all_three(tmp_path, sqlite_url, clock) as s:
        assert s.harvest is not None
        company_id, contact = seed_company(s.hub)
        common = {"pipeline": "default", "dealstage": "contractsent", "deal_currency_code": "USD"}
        fixed = s.hub.add_deal(
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
                "service_start_date": "2027-01-15",
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
                "hours_cap": "14",
            },
            company_id=company_id,
            contact_ids=[contact],
        )
        await poll_connection(s.daemon.runtime, "harvest")
        for deal in (fixed, retainer, hourly):
            await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
        await s.drain()
        logged = {date(2027, 1, 12): "6", date(2027, 1, 25): "5", date(2027, 1, 31): "4", date(2027, 2, 9): "7"}
        day = date(2027, 1, 4)
        while day < date(2027, 3, 2):
            clock.now = at(day, 11)
            if day in logged:  # logged the same day, the poll brings it in at once
                s.harvest.log_time(
                    project_id=project, task_id=task, user_id=person, spent_date=day, hours=Decimal(logged[day])
                )
                await poll_connection(s.daemon.runtime, "harvest")
            if day == date(2027, 2, 10):
                await s.hub.set_deal_properties(retainer, {"amount": "1500.00"})
            await s.drain()
            clock.now = at(day, 5)  # the hourly tick just after local midnight
            await tick_recurring(s.daemon.runtime, functools.partial(recurring.run_due, s.daemon.engine))
            await s.drain()
            day += timedelta(days=1)

        assert await s.daemon.runtime.store.select(DeadLetterRow) == []
        effects = await s.daemon.runtime.store.select(
            EffectRow, table_of(EffectRow).c.kind == "create_invoice", order_by=table_of(EffectRow).c.id
        )
        daemon = sorted(essentials(InvoiceDraft.model_validate(e.payload["draft"])) for e in effects)
        assert len(daemon) >= 6  # fixed fee, retainer Jan + Feb + upgrade + Mar, hours
        found = await recurring.simulate(
            s.daemon.runtime, f"hubspot:company:{company_id}", date(2027, 1, 1), date(2027, 3, 2)
        )
        simulated = sorted(essentials(item.draft) for item in found if item.draft is not None)
        assert simulated == daemon
