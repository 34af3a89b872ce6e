"""A generated month of mixed deals: every trigger ends as exactly one invoice, dead letter or recorded outcome.

The three shipped mappings run together (``tests/test_shipped_mappings.py::all_three``).
A seeded generator makes a month of deals of every kind; the test keeps its own tally of
what each deal must produce, worked out from the rules as the README states them, and
compares it one for one with what syncd recorded and what the Xero emulator holds.
CI runs one seed; ``SYNCD_SCENARIO_SEED=N`` runs another.
"""

from __future__ import annotations

import functools
import os
import random
from collections import Counter
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import pytest

from syncd.engine import recurring
from syncd.engine.scheduler import tick_recurring
from syncd.store.db import BillingEventRow, DeadLetterRow, InvoiceRow, OutcomeRow
from syncd.store.outcomes import list_outcomes
from tests.harness import Stack
from tests.test_shipped_mappings import Clock, all_three, at

KINDS = ("fixed_items", "fixed_amount", "retainer", "won_before_start", "outside_pilot", "unwon_after", "never_won")


@dataclass
class Planned:
    """One generated deal and what it must end as."""

    kind: str
    won_on: date
    deal_id: str = ""
    company: str = ""
    invoices: int = 0
    attention: int = 0
    skips: int = 0
    simulated: int = 0


def expected(kind: str) -> dict[str, int]:
    """The independent tally: what a deal of each kind must produce in the month."""
    return {
        "fixed_items": {"invoices": 1},
        "fixed_amount": {"invoices": 1},
        "retainer": {"invoices": 1},  # its first period, starting on the day it is won (January)
        "won_before_start": {"skips": 1},
        "outside_pilot": {"simulated": 1},
        "unwon_after": {"invoices": 1, "attention": 1},
        "never_won": {},
    }[kind]


def add_deal(s: Stack, plan: Planned, n: int) -> str:
    company_id = s.hub.add_company(
        {
            "name": f"Client {n}",
            "legal_name": f"Client {n} LLC",
            "default_po_number": f"PO-{n}",
            "payment_terms_days": "14",
        }
    )
    contact = s.hub.add_contact(
        {"firstname": "Ap", "lastname": f"Clerk {n}", "email": f"ap{n}@example.com"}, company_id=company_id
    )
    plan.company = f"hubspot:company:{company_id}"
    common = {"pipeline": "default", "dealstage": "contractsent", "deal_currency_code": "USD", "dealname": f"Deal {n}"}
    if plan.kind == "retainer":
        props = {"billing_type": "retainer", "amount": "1000.00", "service_start_date": plan.won_on.isoformat()}
        return s.hub.add_deal({**common, **props}, company_id=company_id, contact_ids=[contact])
    if plan.kind in ("fixed_amount", "outside_pilot"):
        props = {"billing_type": "fixed_fee", "amount": f"{1000 + n}.00"}
        return s.hub.add_deal({**common, **props}, company_id=company_id, contact_ids=[contact])
    items = [{"name": f"Work {n}", "quantity": "2", "price": "750.00"}]
    return s.hub.add_deal(common, company_id=company_id, contact_ids=[contact], line_items=items)


@pytest.mark.parametrize("seed", [int(os.environ.get("SYNCD_SCENARIO_SEED", "7"))])
async def test_a_generated_month_accounts_for_every_trigger(tmp_path: Path, db_url: str, seed: int) -> None:
    """syncd's invoices, skips, simulated events and attention outcomes match the tally, deal by deal."""
    rng = random.Random(seed)
    plans = [Planned(kind=kind, won_on=date(2027, 1, rng.randint(2, 28))) for kind in KINDS]
    plans += [Planned(kind=rng.choice(KINDS), won_on=date(2027, 1, rng.randint(2, 28))) for _ in range(4)]
    rng.shuffle(plans)
    clock = Clock(at(date(2026, 11, 10)))
    async with all_three(tmp_path, db_url, clock) as s:
        for n, plan in enumerate(plans):
            plan.deal_id = add_deal(s, plan, n)
        for plan in plans:
            if plan.kind == "won_before_start":  # won in November, before billing_start (Dec 1)
                await s.hub.set_deal_properties(plan.deal_id, {"dealstage": "closedwon"})
                await s.drain()
        text = s.config.path.read_text(encoding="utf-8")
        pilot = sorted(p.company for p in plans if p.kind != "outside_pilot")
        s.config.path.write_text(text + f"\n[pilot]\nclients = {pilot!r}\n".replace("'", '"'), encoding="utf-8")
        assert s.daemon.poll_mappings() == []

        day = date(2027, 1, 1)
        while day <= date(2027, 1, 31):
            clock.now = at(day, 9)
            for plan in plans:
                if plan.won_on == day and plan.kind not in ("never_won", "won_before_start"):
                    await s.hub.set_deal_properties(plan.deal_id, {"dealstage": "closedwon"})
                if plan.kind == "won_before_start" and plan.won_on == day:  # edited after go-live
                    await s.hub.set_deal_properties(plan.deal_id, {"dealname": "renamed"})
                if plan.kind == "unwon_after" and plan.won_on + timedelta(days=2) == day:
                    await s.hub.set_deal_properties(plan.deal_id, {"dealstage": "closedlost"})
            await s.drain()
            clock.now = at(day, 14)
            await tick_recurring(s.daemon.runtime, functools.partial(recurring.run_due, s.daemon.engine))
            await s.drain()
            day += timedelta(days=1)

        store = s.daemon.runtime.store
        assert await store.select(DeadLetterRow) == []
        invoices = await store.select(InvoiceRow)
        outcomes = await list_outcomes(store, include_resolved=True)
        by_deal: dict[str, Counter[str]] = {plan.deal_id: Counter() for plan in plans}
        for invoice in invoices:
            by_deal[invoice.crm_object_id]["invoices"] += 1
        for outcome in outcomes:
            deal = outcome.object_id or str(outcome.engagement_key).rsplit(":", 1)[-1]
            by_deal[deal]["skips" if outcome.kind == "skip" else outcome.kind] += 1
        tally = {plan.deal_id: Counter(expected(plan.kind)) for plan in plans}
        assert by_deal == tally, [(p.kind, p.deal_id) for p in plans]

        # one to one: syncd's invoices and Xero's, and every billing event settled exactly once
        assert sorted(i.invoice_id for i in invoices) == sorted(str(x["InvoiceID"]) for x in s.xero.invoices())
        events = {row.key for row in await store.select(BillingEventRow)}
        settled = Counter([i.key for i in invoices] + [o.billing_event_key for o in outcomes if o.kind != "attention"])
        assert set(settled) - {None} == events
        assert all(count == 1 for key, count in settled.items() if key is not None)
        assert not [o for o in await store.select(OutcomeRow) if o.kind == "skip" and o.billing_event_key in events]
