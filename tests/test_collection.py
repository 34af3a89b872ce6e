"""Collections end to end: a client's receivables on its HubSpot company, and follow-up tasks.

Each test runs on SQLite and on PostgreSQL against the HubSpot and Xero emulators
(``tests/harness.py``), with one clock the test moves; the hourly collections tick is
run by hand (:func:`syncd.scheduler.tick_collections`).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from connectors.emulation import Fault
from connectors.hubspot.emulator import HubSpotEmulator
from connectors.xero.emulator import API, XeroEmulator
from connectors.xero.models import dump_json, load_json
from syncd.engine.collection import describe_change
from syncd.engine.scheduler import poll_connection, tick_collections
from syncd.store.db import CompanyStandingRow, FollowUpTaskRow
from syncd.store.outcomes import list_outcomes
from tests.harness import MAPPING, Stack, stack
from tests.test_recurring import BILLING_START, RETAINER, retainer_deal, tick

COLLECT = """
[collections]
company_status = true
follow_up_tasks = true
follow_up_days = [7, 30]
at_risk_days_overdue = 30
task_owner_id = "{fallback}"
"""


START = 'billing_start = "2026-01-01T00:00:00+00:00"'


class Clock:
    """The one clock of the daemon and the emulators; tests move it."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def collecting(fallback: str = "", *, pipeline: str = "", extra: str = "") -> str:
    """The config text appended after [[pipelines]]: pipeline keys, then [collections]."""
    return pipeline + COLLECT.format(fallback=fallback) + extra


def company_with_deal(hub: HubSpotEmulator, *, deal_owner: str | None, company_owner: str | None) -> tuple[str, str]:
    """A company (with a billing contact) and an open deal of two lines; (company id, deal id)."""
    company_props = {"name": "Northwind", "legal_name": "Northwind Traders LLC", "payment_terms_days": "14"}
    if company_owner:
        company_props["hubspot_owner_id"] = company_owner
    company = hub.add_company(company_props)
    contact = hub.add_contact(
        {"firstname": "Dana", "lastname": "Reyes", "email": "ap@northwind.example"}, company_id=company
    )
    deal_props = {"dealname": "Website rebuild", "dealstage": "contractsent", "deal_currency_code": "USD"}
    if deal_owner:
        deal_props["hubspot_owner_id"] = deal_owner
    deal = hub.add_deal(
        deal_props,
        company_id=company,
        contact_ids=[contact],
        line_items=[
            {"name": "Discovery workshop", "quantity": "1", "price": "2500.00"},
            {"name": "Build sprint", "quantity": "4", "price": "2500.00"},
        ],
    )
    return company, deal


async def win(s: Stack, deal: str) -> dict[str, Any]:
    """Move the deal to closed-won; syncd invoices it. The Xero invoice."""
    await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
    await s.drain()
    (invoice,) = s.xero.invoices()
    return invoice


async def collections_tick(s: Stack, clock: Clock, when: datetime) -> None:
    """Move the clock, run the hourly collections tick, and process what it queued."""
    clock.now = when
    assert await tick_collections(s.daemon.runtime, s.daemon.engine.collections.run)
    await s.drain()


def figures(hub: HubSpotEmulator, company: str) -> dict[str, Any]:
    """The company's syncd properties."""
    return {k: v for k, v in hub.company(company)["properties"].items() if k.startswith("syncd_")}


def amount(value: Any) -> Decimal:
    return Decimal(str(value))


async def test_payments_reach_the_company_and_overdue_steps_make_one_task_each(tmp_path: Path, db_url: str) -> None:
    """Open → overdue (a task at 1 day, another at 7, never twice) → partly paid → paid: tasks completed."""
    clock = Clock(datetime(2026, 12, 2, 15, 0, tzinfo=UTC))
    hub = HubSpotEmulator(rate_limits=False, clock=clock)
    seller, manager = hub.add_owner("seller@example.com"), hub.add_owner("manager@example.com")
    async with stack(tmp_path, db_url, clock=clock, hub=hub, daemon_extra=START, extra=collecting()) as s:
        company, deal = company_with_deal(hub, deal_owner=seller, company_owner=manager)
        invoice = await win(s, deal)
        owed = amount(invoice["AmountDue"])
        shown = figures(hub, company)
        assert (amount(shown["syncd_outstanding_balance"]), amount(shown["syncd_aging_current"])) == (owed, owed)
        assert (amount(shown["syncd_overdue_balance"]), shown["syncd_at_risk"], shown["syncd_currency"]) == (
            0,
            "false",
            "USD",
        )
        assert shown["syncd_last_payment_date"] in ("", None)

        due = date.fromisoformat(invoice["DueDateString"][:10])
        await collections_tick(s, clock, datetime(due.year, due.month, due.day, 15, tzinfo=UTC) + timedelta(days=1))
        await collections_tick(s, clock, clock.now + timedelta(hours=1))
        (first,) = hub.tasks()
        assert first["properties"]["hubspot_owner_id"] == seller  # the deal's owner
        assert first["associations"] == {"deals": [deal], "companies": [company]}
        body = first["properties"]["hs_task_body"]
        assert invoice["InvoiceNumber"] in body
        assert f"Amount due: {owed:.2f} USD" in body
        assert "1 day overdue" in body
        assert f"InvoiceID={invoice['InvoiceID']}" in body
        shown = figures(hub, company)
        assert (amount(shown["syncd_aging_1_30"]), shown["syncd_oldest_overdue_days"]) == (owed, "1")

        await collections_tick(s, clock, clock.now + timedelta(days=6))
        await collections_tick(s, clock, clock.now + timedelta(hours=1))
        assert [task["properties"]["hs_task_subject"].endswith("(7+ days overdue)") for task in hub.tasks()] == [
            False,
            True,
        ]

        clock.now += timedelta(hours=2)
        await s.xero.pay_invoice(invoice["InvoiceID"], Decimal("5000.00"))
        await s.drain()
        shown = figures(hub, company)
        assert amount(shown["syncd_outstanding_balance"]) == owed - Decimal("5000.00")
        assert shown["syncd_last_payment_date"] == clock.now.date().isoformat()
        assert {task["properties"]["hs_task_status"] for task in hub.tasks()} == {"NOT_STARTED"}
        (standing,) = await s.daemon.runtime.store.select(CompanyStandingRow)
        assert standing.cause == f"{invoice['InvoiceNumber']}: payment or credit of 5000.00 (partially_paid)"

        clock.now += timedelta(days=1)
        await s.xero.pay_invoice(invoice["InvoiceID"], owed - Decimal("5000.00"))
        await s.drain()
        shown = figures(hub, company)
        assert (amount(shown["syncd_outstanding_balance"]), amount(shown["syncd_overdue_balance"])) == (0, 0)
        assert {task["properties"]["hs_task_status"] for task in hub.tasks()} == {"COMPLETED"}
        assert all("the invoice was paid" in task["properties"]["hs_task_body"] for task in hub.tasks())
        rows = await s.daemon.runtime.store.select(FollowUpTaskRow)
        assert sorted((row.step, row.status) for row in rows) == [(1, "completed"), (7, "completed")]


async def test_a_deleted_payment_and_a_void_move_the_company_as_the_ledger_says(tmp_path: Path, db_url: str) -> None:
    """Paid → payment deleted (owed again, overdue) → the deal lost and the invoice voided: nothing owed."""
    clock = Clock(datetime(2026, 12, 2, 15, 0, tzinfo=UTC))
    hub = HubSpotEmulator(rate_limits=False, clock=clock)
    owner = hub.add_owner("ops@example.com")
    config = collecting(owner, pipeline='on_unwon = "void"\n')
    async with stack(tmp_path, db_url, clock=clock, hub=hub, daemon_extra=START, extra=config) as s:
        company, deal = company_with_deal(hub, deal_owner=None, company_owner=None)
        invoice = await win(s, deal)
        owed = amount(invoice["AmountDue"])
        payment = await s.xero.pay_invoice(invoice["InvoiceID"], owed)
        await s.drain()
        assert amount(figures(hub, company)["syncd_outstanding_balance"]) == 0

        clock.now += timedelta(days=20)  # past the 14 days' terms
        await s.xero.delete_payment(payment["PaymentID"])
        await s.drain()
        await collections_tick(s, clock, clock.now)
        shown = figures(hub, company)
        assert amount(shown["syncd_outstanding_balance"]) == owed
        assert amount(shown["syncd_overdue_balance"]) == owed
        (task,) = hub.tasks()
        assert task["properties"]["hubspot_owner_id"] == owner  # neither deal nor company has one
        assert task["associations"]["deals"] == [deal]

        await hub.set_deal_properties(deal, {"dealstage": "closedlost"})
        await s.drain()
        assert [doc["Status"] for doc in s.xero.invoices()] == ["VOIDED"]
        shown = figures(hub, company)
        assert (amount(shown["syncd_outstanding_balance"]), amount(shown["syncd_overdue_balance"])) == (0, 0)
        (task,) = hub.tasks()
        assert task["properties"]["hs_task_status"] == "COMPLETED"
        assert "voided at the ledger" in task["properties"]["hs_task_body"]
        (standing,) = await s.daemon.runtime.store.select(CompanyStandingRow)
        assert standing.cause == f"{invoice['InvoiceNumber']} voided at the ledger"


async def test_an_unallocated_credit_note_shows_on_the_company(tmp_path: Path, db_url: str) -> None:
    """A retainer paid for November, then cancelled: its credit note has nothing to apply to, and shows as credit."""
    clock = Clock(datetime(2027, 10, 20, 15, tzinfo=UTC))
    hub = HubSpotEmulator(rate_limits=False, clock=clock)
    async with stack(
        tmp_path, db_url, clock=clock, hub=hub, mapping=RETAINER, daemon_extra=BILLING_START, extra=collecting()
    ) as s:
        company, contact = hub.add_company({"name": "Northwind", "payment_terms_days": "14"}), None
        contact = hub.add_contact({"firstname": "Dana", "email": "ap@northwind.example"}, company_id=company)
        deal = retainer_deal(hub, (company, contact), start="2027-11-01", amount="1200")
        await hub.set_deal_properties(deal, {"dealstage": "closedwon"})
        await s.drain()
        await tick(s, clock, datetime(2027, 11, 1, 15, tzinfo=UTC))
        (november,) = s.xero.invoices()
        await s.xero.pay_invoice(november["InvoiceID"], amount(november["AmountDue"]))
        await s.drain()
        clock.now = datetime(2027, 11, 5, 15, tzinfo=UTC)
        await hub.set_deal_properties(deal, {"cancellation_date": "2027-11-20"})
        await s.drain()
        await tick(s, clock, datetime(2027, 11, 6, 15, tzinfo=UTC))
        (credit,) = s.xero.credit_notes()
        assert amount(credit["RemainingCredit"]) == amount(credit["Total"]) > 0
        shown = figures(hub, company)
        assert amount(shown["syncd_outstanding_balance"]) == 0
        assert amount(shown["syncd_unallocated_credit"]) == amount(credit["Total"])
        assert shown["syncd_last_payment_date"] == "2027-11-01"
        (remainder,) = await list_outcomes(s.daemon.runtime.store, kind="attention")
        assert remainder.reason == "credit_remainder"


async def test_a_company_turns_overdue_at_midnight_in_its_own_zone(tmp_path: Path, db_url: str) -> None:
    """Due on a day in Auckland: still current at 23:30 there, overdue at 00:30, both the same UTC day."""
    mapping = tmp_path / "auckland.toml"
    text = MAPPING.read_text(encoding="utf-8")
    mapping.write_text(
        text.replace("# timezone is left out: the daemon's [daemon].timezone applies.", 'timezone = "Pacific/Auckland"')
    )
    clock = Clock(datetime(2026, 12, 2, 1, 0, tzinfo=UTC))  # 14:00 on the 2nd in Auckland
    hub = HubSpotEmulator(rate_limits=False, clock=clock)
    async with stack(
        tmp_path, db_url, clock=clock, hub=hub, mapping=mapping, daemon_extra=START, extra=collecting()
    ) as s:
        company, deal = company_with_deal(hub, deal_owner=None, company_owner=None)
        invoice = await win(s, deal)
        due = date.fromisoformat(invoice["DueDateString"][:10])
        assert due == date(2026, 12, 16)  # issued on the 2nd, Auckland's day, with 14 days' terms
        owed = amount(invoice["AmountDue"])

        await collections_tick(s, clock, datetime(2026, 12, 16, 10, 30, tzinfo=UTC))  # 23:30 on the 16th there
        shown = figures(hub, company)
        assert (amount(shown["syncd_aging_current"]), amount(shown["syncd_overdue_balance"])) == (owed, 0)
        assert hub.tasks() == []

        await collections_tick(s, clock, datetime(2026, 12, 16, 11, 30, tzinfo=UTC))  # 00:30 on the 17th there
        shown = figures(hub, company)
        assert (amount(shown["syncd_aging_1_30"]), shown["syncd_oldest_overdue_days"]) == (owed, "1")
        assert amount(shown["syncd_aging_current"]) == 0
        assert len(hub.tasks()) == 1


async def test_a_task_whose_answer_was_lost_is_found_not_created_twice(tmp_path: Path, db_url: str) -> None:
    """HubSpot creates the task and the answer is lost: the retry finds it by subject and stamp."""
    clock = Clock(datetime(2026, 12, 2, 15, 0, tzinfo=UTC))
    hub = HubSpotEmulator(rate_limits=False, clock=clock)
    async with stack(tmp_path, db_url, clock=clock, hub=hub, daemon_extra=START, extra=collecting()) as s:
        _company, deal = company_with_deal(hub, deal_owner=None, company_owner=None)
        await win(s, deal)
        hub.faults.add(Fault(kind="drop_response", method="POST", path_contains="/crm/v3/objects/tasks"))
        await collections_tick(s, clock, datetime(2026, 12, 20, 15, tzinfo=UTC))
        assert len(hub.tasks()) == 1
        assert await s.daemon.runtime.store.select(FollowUpTaskRow) == []  # waiting for its retry
        clock.now += timedelta(minutes=1)
        await s.drain()
        (task,) = hub.tasks()
        (row,) = await s.daemon.runtime.store.select(FollowUpTaskRow)
        assert row.task_id == task["id"]


async def xero_api(xero: XeroEmulator, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """Call the Xero emulator's API as another app of the organisation would."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=xero.app), base_url="http://xero.test") as client:
        token = await client.post(
            "/connect/token", data={"grant_type": "client_credentials"}, auth=(xero.client_id, xero.client_secret)
        )
        headers = {
            "Authorization": f"Bearer {token.json()['access_token']}",
            "Accept": "application/json",
            "Content-Type": "application/json",
        }
        answer = await client.request(method, f"{API}{path}", headers=headers, content=dump_json(body))
        assert answer.status_code == 200, answer.text
        result: dict[str, Any] = load_json(answer.content)
        return result


def hand_made(contact_id: str) -> dict[str, Any]:
    """An approved invoice as a person would make it at Xero: no syncd stamp in its Reference."""
    line = {"Description": "Extra support", "Quantity": 1, "UnitAmount": Decimal("300.00"), "AccountCode": "200"}
    invoice = {
        "Type": "ACCREC",
        "Contact": {"ContactID": contact_id},
        "Date": "2026-12-02",
        "DueDate": "2026-12-09",
        "Reference": "phone order",
        "CurrencyCode": "USD",
        "Status": "AUTHORISED",
        "LineItems": [line],
    }
    return {"Invoices": [invoice]}


async def test_an_invoice_made_by_hand_at_the_ledger_counts_for_its_known_client(tmp_path: Path, db_url: str) -> None:
    """track_ledger_documents: a hand-made invoice for the client's contact, found by the poll, joins the figures."""
    clock = Clock(datetime(2026, 12, 2, 15, 0, tzinfo=UTC))
    hub = HubSpotEmulator(rate_limits=False, clock=clock)
    manager = hub.add_owner("manager@example.com")
    config = collecting(extra="track_ledger_documents = true\n")
    async with stack(tmp_path, db_url, clock=clock, hub=hub, daemon_extra=START, extra=config) as s:
        company, deal = company_with_deal(hub, deal_owner=None, company_owner=manager)
        invoice = await win(s, deal)
        await poll_connection(s.daemon.runtime, "xero")  # the poll starts its cursor now
        clock.now += timedelta(minutes=5)
        made = await xero_api(s.xero, "PUT", "/Invoices", hand_made(invoice["Contact"]["ContactID"]))
        other = s.xero.seed_contact("Someone Else Ltd")["ContactID"]
        await xero_api(s.xero, "PUT", "/Invoices", hand_made(other))
        clock.now += timedelta(minutes=5)
        assert await poll_connection(s.daemon.runtime, "xero") >= 2
        await s.drain()
        hand = amount(made["Invoices"][0]["AmountDue"])
        shown = figures(hub, company)
        assert amount(shown["syncd_outstanding_balance"]) == amount(invoice["AmountDue"]) + hand

        await collections_tick(s, clock, datetime(2026, 12, 11, 15, tzinfo=UTC))  # the hand-made one is overdue
        shown = figures(hub, company)
        assert amount(shown["syncd_overdue_balance"]) == hand
        (task,) = hub.tasks()
        assert task["properties"]["hubspot_owner_id"] == manager  # no deal: the company's owner
        assert task["associations"] == {"deals": [], "companies": [company]}
        assert made["Invoices"][0]["InvoiceNumber"] in task["properties"]["hs_task_subject"]


def test_the_cause_of_a_change_says_what_the_ledger_did() -> None:
    """Created, paid in part, owed again, voided: each cause in words."""
    assert describe_change("INV-7", None, ("authorised", "100.00")) == "INV-7 recorded (authorised, amount due 100.00)"
    assert describe_change("INV-7", ("authorised", "100.00"), ("partially_paid", "40.00")) == (
        "INV-7: payment or credit of 60.00 (partially_paid)"
    )
    assert describe_change("INV-7", ("paid", "0"), ("authorised", "100.00")).startswith(
        "INV-7: amount due up by 100.00"
    )
    assert describe_change("INV-7", ("authorised", "100.00"), ("voided", "0")) == "INV-7 voided at the ledger"
