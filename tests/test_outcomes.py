"""Every trigger ends as an invoice, a dead letter or a recorded outcome; the deal shows the truth.

Each test runs on SQLite and on PostgreSQL against the HubSpot and Xero emulators
(``tests/harness.py``), with a clock the test moves.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx

from connectors.hubspot.emulator import HubSpotEmulator
from syncd.cli.preview import preview_deal
from syncd.engine import scheduler
from syncd.store.db import DeadLetterRow, InvoiceRow
from syncd.store.outcomes import list_outcomes
from tests.harness import MAPPING, seed_company, seed_deal, stack
from tests.servers import invoke


class Clock:
    """A clock the test moves by hand, shared by the emulators and syncd."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


GO_LIVE = datetime(2026, 12, 1, 13, 0, tzinfo=UTC)  # 08:00 in New York, the daemon's zone
START = f'billing_start = "{GO_LIVE.isoformat()}"'


async def test_a_deal_won_on_go_live_morning_is_invoiced_though_its_close_date_is_midnight(
    tmp_path: Path, db_url: str
) -> None:
    """billing_start is compared with when HubSpot recorded the move into won, not the close date."""
    clock = Clock(GO_LIVE + timedelta(hours=1))
    async with stack(tmp_path, db_url, clock=clock, daemon_extra=START) as s:
        deal = seed_deal(s.hub)
        # a date-only close date, as HubSpot stores it: midnight, hours before go-live
        await s.hub.set_deal_properties(deal, {"closedate": "2026-12-01T05:00:00.000Z"})
        await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
        await s.drain()
        assert len(s.xero.invoices()) == 1
        assert await list_outcomes(s.daemon.runtime.store) == []


async def test_a_deal_won_before_billing_start_and_edited_later_is_a_recorded_skip(tmp_path: Path, db_url: str) -> None:
    """A deal won before go-live and edited after it is never invoiced, and the skip says why."""
    clock = Clock(GO_LIVE - timedelta(days=30))
    async with stack(tmp_path, db_url, clock=clock, daemon_extra=START) as s:
        deal = seed_deal(s.hub)
        await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
        clock.at = GO_LIVE + timedelta(days=5)
        await s.hub.set_deal_properties(deal, {"dealname": "Website rebuild (phase 1)"})
        await s.drain()
        await s.hub.set_deal_properties(deal, {"dealname": "Website rebuild (phase 1b)"})
        await s.drain()
        assert s.xero.invoices() == []
        (skip,) = await list_outcomes(s.daemon.runtime.store)
        assert (skip.kind, skip.reason, skip.object_id) == ("skip", "before_billing_start", deal)
        assert skip.trigger_at == GO_LIVE - timedelta(days=30)


async def test_the_first_poll_reads_from_billing_start(tmp_path: Path, db_url: str) -> None:
    """A deal won after go-live but before the first poll, with no webhook, is found and invoiced."""
    clock = Clock(GO_LIVE + timedelta(minutes=5))
    async with stack(tmp_path, db_url, clock=clock, daemon_extra=START) as s:
        s.hub.webhooks.url = None  # the webhook never arrives
        company = seed_company(s.hub)
        deal = s.hub.add_deal(
            {"dealname": "Audit", "dealstage": "closedwon", "pipeline": "default", "deal_currency_code": "USD"},
            company_id=company[0],
            contact_ids=[company[1]],
            line_items=[{"name": "Audit", "quantity": "1", "price": "900.00"}],
        )
        clock.at = GO_LIVE + timedelta(minutes=30)
        assert await scheduler.poll_connection(s.daemon.runtime, "hubspot") >= 1
        await s.drain()
        (invoice,) = s.xero.invoices()
        assert s.hub.deal(deal)["properties"]["syncd_invoice_number"] == invoice["InvoiceNumber"]


async def test_a_won_deal_outside_every_pipeline_is_a_recorded_skip(tmp_path: Path, db_url: str) -> None:
    """A won deal no pipeline takes is recorded as skipped (no_pipeline), listed by `syncd skipped`."""
    euro_only = tmp_path / "euro-only.toml"
    text = MAPPING.read_text(encoding="utf-8")
    when = '{ path = "deal.properties.pipeline", equals = "default" }'
    assert when in text
    euro_only.write_text(
        text.replace(when, '{ path = "deal.properties.deal_currency_code", equals = "EUR" }'), encoding="utf-8"
    )
    async with stack(tmp_path, db_url, mapping=euro_only) as s:
        deal = seed_deal(s.hub)
        await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
        await s.drain()
        assert s.xero.invoices() == []
        (skip,) = await list_outcomes(s.daemon.runtime.store, kind="skip")
        assert skip.reason == "no_pipeline"
        assert "euro-only.toml:" in (skip.place or "")
        result = await asyncio.to_thread(invoke, "skipped", "--json", "--config", str(s.config.path))
        assert result.exit_code == 0, result.output
        assert [item["reason"] for item in json.loads(result.stdout)] == ["no_pipeline"]


async def test_a_deal_two_pipelines_take_is_dead_lettered_naming_both(tmp_path: Path, db_url: str) -> None:
    """A deal matching two pipelines creates no invoice; the dead letter names both filters."""
    second = f'\n[[pipelines]]\ncrm = "hubspot"\ninvoicing = "xero"\nmapping = "{MAPPING}"\n'
    async with stack(tmp_path, db_url, extra=second) as s:
        deal = seed_deal(s.hub)
        await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
        await s.drain()
        assert s.xero.invoices() == []
        (letter,) = await s.daemon.runtime.store.select(DeadLetterRow)
        assert "is taken by 2 pipelines" in letter.reason
        assert letter.reason.count("hubspot-xero.toml:") == 2


async def test_a_client_outside_the_pilot_is_recorded_as_simulated(tmp_path: Path, db_url: str) -> None:
    """In pilot mode a client not listed gets no invoice and a `simulated` outcome; status counts it."""
    async with stack(tmp_path, db_url, extra='[pilot]\nclients = ["hubspot:company:somebody-else"]') as s:
        deal = seed_deal(s.hub)
        await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
        await s.drain()
        assert s.xero.invoices() == []
        (simulated,) = await list_outcomes(s.daemon.runtime.store)
        assert (simulated.kind, simulated.reason) == ("simulated", "not_in_pilot")
        result = await asyncio.to_thread(invoke, "status", "--config", str(s.config.path))
        assert result.exit_code == 0, result.output
        assert "simulated: 1 (not_in_pilot 1)" in result.stdout


async def test_a_deleted_payment_moves_the_deal_back_to_awaiting_payment(tmp_path: Path, db_url: str) -> None:
    """Paid, then the payment deleted at Xero: the deal goes back to awaiting payment (a reversal is written)."""
    async with stack(tmp_path, db_url) as s:
        deal = seed_deal(s.hub)
        await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
        await s.drain()
        (invoice,) = s.xero.invoices()
        payment = await s.xero.pay_invoice(invoice["InvoiceID"], Decimal(str(invoice["AmountDue"])))
        await s.drain()
        assert s.hub.deal(deal)["properties"]["syncd_invoice_status"] == "paid"
        await s.xero.delete_payment(payment["PaymentID"])
        await s.drain()
        props = s.hub.deal(deal)["properties"]
        assert props["syncd_invoice_status"] == "authorised"
        assert Decimal(props["syncd_amount_due"]) == Decimal(str(invoice["Total"]))


async def test_the_deal_shows_the_standing_across_all_its_invoices(tmp_path: Path, db_url: str) -> None:
    """Two invoices on one deal: one paid, one open past due -> overdue, amount due of the open one only."""
    clock = Clock(datetime(2026, 12, 2, 15, 0, tzinfo=UTC))
    async with stack(tmp_path, db_url, clock=clock, daemon_extra=START) as s:
        deal = seed_deal(s.hub)
        await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
        await s.drain()
        (first,) = s.xero.invoices()
        # a second document of the same deal (as a period or milestone invoice would be)
        rows = await s.daemon.runtime.store.select(InvoiceRow)
        second = rows[0].model_copy(update={"key": "second-doc", "invoice_id": "other", "number": "INV-X"})
        second = second.model_copy(update={"amount_due": "300.00", "total": "300.00", "state": "authorised"})
        second = second.model_copy(update={"due_date": clock.at.date() - timedelta(days=3)})
        await s.daemon.runtime.store.upsert(InvoiceRow, second.model_dump())
        await s.xero.pay_invoice(first["InvoiceID"], Decimal(str(first["AmountDue"])))
        await s.drain()
        props = s.hub.deal(deal)["properties"]
        assert props["syncd_invoice_status"] == "overdue"
        assert Decimal(props["syncd_amount_due"]) == Decimal("300.00")
        assert props["syncd_days_overdue"] == "3"
        assert Decimal(props["syncd_total_invoiced"]) == Decimal(str(first["Total"])) + Decimal("300.00")
        assert props["syncd_invoice_number"] == f"{first['InvoiceNumber']}, INV-X"


async def test_every_scheduled_job_runs_at_start(tmp_path: Path, db_url: str) -> None:
    """Recurring billing, aging, retention, collections, the audit and drift run when the daemon starts, not one interval later."""
    async with stack(tmp_path, db_url) as s:

        async def nothing() -> int:
            return 0

        jobs = scheduler.build_scheduler(
            s.daemon.runtime, aging=nothing, recurring=nothing, collections=nothing
        ).get_jobs()
        at_start = [job for job in jobs if not job.id.startswith("poll:")]
        assert {job.id for job in at_start} == {"aging", "recurring", "retention", "collections", "drift", "audit"}
        now = datetime.now(UTC)
        assert all(job.next_run_time <= now for job in at_start)


async def test_a_deal_unwon_within_the_invoice_delay_is_skipped_and_invoiced_when_won_again(
    tmp_path: Path, db_url: str
) -> None:
    """invoice_delay_s: won then lost within the delay -> no invoice, a not_won skip; won again -> one invoice."""
    clock = Clock(GO_LIVE + timedelta(hours=2))
    async with stack(tmp_path, db_url, clock=clock, daemon_extra=START, extra="invoice_delay_s = 600") as s:
        deal = seed_deal(s.hub)
        await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
        await s.drain()
        assert s.xero.invoices() == []  # waits for the delay
        clock.at += timedelta(seconds=120)
        await s.hub.set_deal_properties(deal, {"dealstage": "closedlost"})
        clock.at += timedelta(seconds=600)
        await s.drain()
        assert s.xero.invoices() == []
        (skip,) = await list_outcomes(s.daemon.runtime.store)
        assert (skip.kind, skip.reason) == ("skip", "not_won")
        await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
        await s.drain()
        assert s.xero.invoices() == []
        clock.at += timedelta(seconds=601)
        await s.drain()
        assert len(s.xero.invoices()) == 1


async def test_an_invoiced_deal_that_leaves_won_needs_attention(tmp_path: Path, db_url: str) -> None:
    """By default an invoiced deal that leaves won records an outcome that needs attention; nothing is voided."""
    async with stack(tmp_path, db_url) as s:
        deal = seed_deal(s.hub)
        await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
        await s.drain()
        await s.hub.set_deal_properties(deal, {"dealstage": "closedlost"})
        await s.drain()
        await s.hub.set_deal_properties(deal, {"dealname": "Website rebuild (lost)"})
        await s.drain()
        (attention,) = await list_outcomes(s.daemon.runtime.store, kind="attention")
        assert attention.reason == "unwon_after_invoice"
        assert [invoice["Status"] for invoice in s.xero.invoices()] == ["AUTHORISED"]


async def test_with_on_unwon_void_the_invoice_is_voided(tmp_path: Path, db_url: str) -> None:
    """on_unwon = "void": the unpaid invoice of a deal that leaves won is voided at Xero, and the deal says so."""
    async with stack(tmp_path, db_url, extra='on_unwon = "void"') as s:
        deal = seed_deal(s.hub)
        await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
        await s.drain()
        await s.hub.set_deal_properties(deal, {"dealstage": "closedlost"})
        await s.drain()
        assert [invoice["Status"] for invoice in s.xero.invoices()] == ["VOIDED"]
        assert s.hub.deal(deal)["properties"]["syncd_invoice_status"] == "voided"
        assert await list_outcomes(s.daemon.runtime.store) == []


async def _edit_company(hub: HubSpotEmulator, company_id: str, properties: dict[str, str]) -> None:
    """Edit a company as a HubSpot user would, over the emulator's CRM API."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=hub.app), base_url="http://hubspot.test") as api:
        response = await api.patch(
            f"/crm/v3/objects/companies/{company_id}",
            json={"properties": properties},
            headers={"Authorization": f"Bearer {hub.token}"},
        )
        response.raise_for_status()


async def test_a_renamed_client_is_updated_at_the_ledger_before_its_next_invoice(tmp_path: Path, db_url: str) -> None:
    """A legal name changed in the CRM reaches the Xero contact once, before the next invoice; a ledger edit is kept.

    The edit at the ledger (the billing contact's email, which the CRM owns) is a conflict
    on that field only: the CRM's next rename still reaches the contact, the email stays.
    """
    async with stack(tmp_path, db_url) as s:
        company = seed_company(s.hub)
        first = seed_deal(s.hub, company=company)
        await s.hub.set_deal_properties(first, {"dealstage": "closedwon"})
        await s.drain()
        (contact,) = s.xero.contacts()
        assert contact["Name"] == "Northwind Traders LLC"

        await _edit_company(s.hub, company[0], {"legal_name": "Northwind Holdings Inc"})
        second = seed_deal(s.hub, company=company)
        await s.hub.set_deal_properties(second, {"dealstage": "closedwon"})
        await s.drain()
        (contact,) = s.xero.contacts()
        assert contact["Name"] == "Northwind Holdings Inc"
        assert [i["Contact"]["ContactID"] for i in s.xero.invoices()] == [contact["ContactID"]] * 2
        assert await list_outcomes(s.daemon.runtime.store) == []

        # someone fixes the email at Xero; then the CRM renames the client again
        s.xero.edit_contact(contact["ContactID"], {"EmailAddress": "billing@northwind.example"})
        await _edit_company(s.hub, company[0], {"legal_name": "Northwind Group"})
        third = seed_deal(s.hub, company=company)
        await s.hub.set_deal_properties(third, {"dealstage": "closedwon"})
        await s.drain()
        (contact,) = s.xero.contacts()
        assert (contact["Name"], contact["EmailAddress"]) == ("Northwind Group", "billing@northwind.example")
        assert len(s.xero.invoices()) == 3
        (attention,) = await list_outcomes(s.daemon.runtime.store, kind="attention")
        assert attention.reason == "client_conflict"
        assert "billing_contact was changed at xero" in attention.detail


async def test_the_pilot_list_reloads_without_a_restart(tmp_path: Path, db_url: str) -> None:
    """A client added to [pilot] clients in the config file gets real invoices after the watch sees the edit."""
    async with stack(tmp_path, db_url, extra='[pilot]\nclients = ["hubspot:company:somebody-else"]') as s:
        company = seed_company(s.hub)
        first = seed_deal(s.hub, company=company)
        await s.hub.set_deal_properties(first, {"dealstage": "closedwon"})
        await s.drain()
        assert s.xero.invoices() == []
        text = s.config.path.read_text(encoding="utf-8")
        s.config.path.write_text(text.replace("somebody-else", company[0]), encoding="utf-8")
        assert s.daemon.poll_mappings() == []
        second = seed_deal(s.hub, company=company)
        await s.hub.set_deal_properties(second, {"dealstage": "closedwon"})
        await s.drain()
        assert len(s.xero.invoices()) == 1  # the new deal only: the simulated one stays simulated
        kinds = sorted(o.kind for o in await list_outcomes(s.daemon.runtime.store))
        assert kinds == ["simulated"]


async def test_an_invoice_without_a_required_po_is_held_until_the_po_arrives(tmp_path: Path, db_url: str) -> None:
    """require_po: no PO, no invoice but an outcome that needs attention; the PO set on the deal releases it."""
    strict = tmp_path / "require-po.toml"
    strict.write_text(
        MAPPING.read_text(encoding="utf-8").replace("# require_po = true", "require_po = true"), encoding="utf-8"
    )
    async with stack(tmp_path, db_url, mapping=strict) as s:
        deal = seed_deal(s.hub, po="")
        await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
        await s.drain()
        await s.hub.set_deal_properties(deal, {"dealname": "Website rebuild, v2"})
        await s.drain()
        assert s.xero.invoices() == []
        (held,) = await list_outcomes(s.daemon.runtime.store, kind="attention")
        assert (held.reason, held.object_id) == ("missing_po", deal)
        await s.hub.set_deal_properties(deal, {"po_number": "PO-9001"})
        await s.drain()
        (invoice,) = s.xero.invoices()
        assert invoice["Reference"].startswith("PO-9001")
        assert await list_outcomes(s.daemon.runtime.store, kind="attention") == []


async def test_preview_shows_what_was_recorded_for_the_deal(tmp_path: Path, db_url: str) -> None:
    """`syncd preview deal ID` lists the deal's recorded skips, with reason and detail."""
    clock = Clock(GO_LIVE - timedelta(days=30))
    async with stack(tmp_path, db_url, clock=clock, daemon_extra=START) as s:
        deal = seed_deal(s.hub)
        await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
        clock.at = GO_LIVE + timedelta(days=1)
        await s.hub.set_deal_properties(deal, {"dealname": "edited"})
        await s.drain()
        (preview,) = await preview_deal(s.daemon.runtime, deal)
        (recorded,) = preview.outcomes
        assert recorded.startswith("skip before_billing_start (open): won at 2026-11-01")
        assert preview.as_json()["outcomes"] == [recorded]
