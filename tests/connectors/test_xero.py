"""The Xero connector against its emulator, over an ASGI transport.

Time is a fake clock shared by the connector and the emulator; the retry sleep advances
it instead of sleeping, so rate-limit windows and token expiry pass instantly.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import io
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from cryptography.fernet import Fernet
from pydantic import ValidationError
from rich.console import Console
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from connectors.emulation import Fault
from connectors.xero.auth import consent_url, exchange_code, list_connections, request_token
from connectors.xero.connector import SPEC, XeroConnector, XeroSettings
from connectors.xero.emulator import XeroEmulator, compile_where
from connectors.xero.models import XeroRejected, contact_number, dump_json, load_json, stamped_key
from connectors.xero.webhooks import XeroWebhookVerifier
from syncd.cli.oauth import authorize
from syncd.core.errors import AuthError, ConfigError, FatalError, NotFound, RecordError, RetriableError
from syncd.core.interfaces import (
    Address,
    AllocatesCredit,
    ChangeHint,
    Client,
    Contact,
    DraftKind,
    HasLockDates,
    InvoiceDraft,
    InvoiceLine,
    InvoiceState,
    Invoicing,
    InvoicingCodes,
    ReadsCreditNotes,
    TrackingOption,
    WebhookRequest,
)
from syncd.plumbing.http import Rejected, VendorHttp
from syncd.plumbing.registry import ConnectorContext, load
from syncd.plumbing.serving import free_port, serve
from syncd.plumbing.settings import load_config
from syncd.store.db import DbTokenStore, DeadLetterRow, EffectRow, Store
from tests.harness import seed_deal, stack

HOST = "http://xero.test"
API = "/api.xro/2.0"
START = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
KEY = "0123456789abcdef0123456789abcdef"


class FakeClock:
    """A settable clock; ``advance`` moves it."""

    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class MemoryTokenStore:
    """An in-memory TokenStore that logs every save into a shared event list."""

    def __init__(self, events: list[tuple[str, str]]) -> None:
        self.tokens: dict[str, Any] | None = None
        self.events = events
        self.saves: list[dict[str, Any]] = []
        self._lock = _Lock()

    async def load(self) -> dict[str, Any] | None:
        return dict(self.tokens) if self.tokens else None

    async def save(self, tokens: Any) -> None:
        self.tokens = dict(tokens)
        self.saves.append(dict(tokens))
        self.events.append(("save", str(tokens["access_token"])))

    def locked(self) -> Any:
        return self._lock.hold()


class _Lock:
    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.entered = 0

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        async with self.lock:
            self.entered += 1
            yield


@dataclass
class Rig:
    """One connector wired to one emulator."""

    emulator: XeroEmulator
    connector: XeroConnector
    client: httpx.AsyncClient
    store: MemoryTokenStore
    clock: FakeClock
    sleeps: list[float]
    events: list[tuple[str, str]]
    exchanges: list[tuple[httpx.Request, httpx.Response]] = field(default_factory=list)

    def connect(self, **overrides: Any) -> XeroConnector:
        """Another connector on the same client, store and clock."""
        return XeroConnector(settings(self.emulator, **overrides), self.connector.ctx)


def settings(emulator: XeroEmulator, **overrides: Any) -> XeroSettings:
    values: dict[str, Any] = {
        "connector": "xero",
        "base_url": HOST,
        "token_url": f"{HOST}/connect/token",
        "authorize_url": f"{HOST}/identity/connect/authorize",
        "connections_url": f"{HOST}/connections",
        "client_id": emulator.client_id,
        "client_secret": emulator.client_secret,
        "tenant_id": emulator.tenant_id,
        "webhook_key": emulator.webhook_key,
    }
    return XeroSettings(**{**values, **overrides})


@contextlib.asynccontextmanager
async def rig(emulator_options: dict[str, Any] | None = None, **overrides: Any) -> AsyncIterator[Rig]:
    clock = FakeClock()
    emulator = XeroEmulator(clock=clock, **(emulator_options or {}))
    events: list[tuple[str, str]] = []
    sleeps: list[float] = []
    exchanges: list[tuple[httpx.Request, httpx.Response]] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.advance(seconds)

    async def on_request(request: httpx.Request) -> None:
        events.append(("request", request.headers.get("authorization", "").removeprefix("Bearer ")))

    async def on_response(response: httpx.Response) -> None:
        await response.aread()
        exchanges.append((response.request, response))

    transport = httpx.ASGITransport(app=emulator.app)
    hooks = {"request": [on_request], "response": [on_response]}
    async with httpx.AsyncClient(transport=transport, event_hooks=hooks) as client:
        store = MemoryTokenStore(events)
        ctx = ConnectorContext(
            connection="xero",
            client=client,
            tokens=store,
            clock=clock,
            make_http=functools.partial(VendorHttp, client, connection="xero", sleep=sleep),
        )
        # syncd's per-minute limiter waits on the event loop's real clock, not on this fake one;
        # the emulator still enforces Xero's limits on the fake clock (429s advance it).
        connector = XeroConnector(settings(emulator, **{"rate_limit_per_min": None, **overrides}), ctx)
        yield Rig(emulator, connector, client, store, clock, sleeps, events, exchanges)


def client_record(key: str = "hubspot:company:42", name: str = "Northwind Traders LLC") -> Client:
    return Client(
        key=key,
        legal_name=name,
        billing_contact=Contact(name="Dana Reyes", first_name="Dana", last_name="Reyes", email="ap@northwind.example"),
        address=Address(line1="1 Harbour St", city="Sydney", region="NSW", postal_code="2000", country="Australia"),
        tax_id="51 824 753 556",
        currency="AUD",
        payment_terms_days=14,
    )


def draft(key: str = KEY, **overrides: Any) -> InvoiceDraft:
    values: dict[str, Any] = {
        "key": key,
        "client": client_record(),
        "engagement_key": "hubspot:deal:8812",
        "currency": "AUD",
        "issue_date": date(2025, 3, 3),
        "due_date": date(2025, 3, 17),
        "reference": "PO-4411",
        "lines": (
            InvoiceLine(
                description="Discovery workshop",
                quantity=Decimal(1),
                unit_price=Decimal("2500.00"),
                account_code="200",
                tax_type="OUTPUT",
            ),
            InvoiceLine(
                description="Build sprint",
                quantity=Decimal("1.5"),
                unit_price=Decimal("333.333"),
                account_code="200",
                tax_type="OUTPUT",
                item_code="SPRINT",
            ),
        ),
    }
    return InvoiceDraft(**{**values, **overrides})


# ---------------------------------------------------------------------------
# Registration and settings
# ---------------------------------------------------------------------------


async def test_connector_plays_invoicing_and_is_registered() -> None:
    """The connector is an Invoicing and the entry point `xero` loads its spec."""
    async with rig() as r:
        assert isinstance(r.connector, Invoicing)
        assert load("xero") is SPEC
        assert SPEC.settings_model is XeroSettings
        assert set(SPEC.secret_fields) == {"client_secret", "webhook_key", "refresh_token"}


async def test_unitdp_is_four_or_unset() -> None:
    """Settings refuse a unitdp other than 4 (the code flow's tenant_id is optional: see the discovery tests)."""
    emulator = XeroEmulator()
    with pytest.raises(ValidationError, match="unitdp"):
        settings(emulator, unitdp=3)
    assert settings(emulator, unitdp=None).unitdp is None


# ---------------------------------------------------------------------------
# Customers
# ---------------------------------------------------------------------------


async def test_a_customer_is_created_once_and_found_again_by_contact_number() -> None:
    """upsert_customer creates the contact with its details once, then finds it by ContactNumber."""
    async with rig() as r:
        first = await r.connector.upsert_customer(client_record())
        again = await r.connector.upsert_customer(client_record())
        assert first == again
        (contact,) = r.emulator.contacts()
        assert contact["ContactNumber"] == "hubspot:company:42"
        assert contact["EmailAddress"] == "ap@northwind.example"
        assert (contact["FirstName"], contact["LastName"]) == ("Dana", "Reyes")
        assert contact["TaxNumber"] == "51 824 753 556"
        assert contact["PaymentTerms"] == {"Sales": {"Day": 14, "Type": "DAYSAFTERBILLDATE"}}
        postal = next(a for a in contact["Addresses"] if a["AddressType"] == "POBOX")
        assert (postal["AddressLine1"], postal["City"], postal["AttentionTo"]) == (
            "1 Harbour St",
            "Sydney",
            "Dana Reyes",
        )
        assert r.emulator.calls["createContacts"] == 1


async def test_a_long_client_key_is_stamped_in_a_stable_short_form() -> None:
    """A client key over 50 characters becomes `syncd-` plus a hash, the same every time."""
    long_key = "salesforce:account:" + "x" * 60
    assert contact_number(long_key) == contact_number(long_key)
    assert contact_number(long_key).startswith("syncd-")
    assert len(contact_number(long_key)) == 50
    async with rig() as r:
        first = await r.connector.upsert_customer(client_record(key=long_key))
        assert await r.connector.upsert_customer(client_record(key=long_key)) == first
        (contact,) = r.emulator.contacts()
        assert contact["ContactNumber"] == contact_number(long_key)


async def test_a_same_name_contact_without_a_number_is_adopted() -> None:
    """A contact with the exact legal name and no ContactNumber is stamped and reused, and the adoption is logged.

    The PUT creating the client's contact is refused for the name (no duplicate is made); the name is
    then looked up and the contact stamped: GET by number, PUT refused, GET by name, POST.
    """
    async with rig() as r:
        seeded = r.emulator.seed_contact("Northwind Traders LLC")
        with structlog.testing.capture_logs() as logs:
            found = await r.connector.upsert_customer(client_record())
        assert found == seeded["ContactID"]
        (contact,) = r.emulator.contacts()
        assert contact["ContactNumber"] == "hubspot:company:42"
        assert (r.emulator.calls["getContacts"], r.emulator.calls["createContacts"]) == (2, 1)
        assert r.emulator.calls["updateContact"] == 1
        assert any(entry["event"] == "xero_contact_adopted" for entry in logs)


async def test_a_same_name_contact_of_another_client_is_not_touched() -> None:
    """A same-name contact stamped for another client stays as it is; the name clash is reported clearly."""
    async with rig() as r:
        other = r.emulator.seed_contact("Northwind Traders LLC", contact_number="hubspot:company:7")
        with pytest.raises(FatalError, match=r"Xero contact names must be\s+unique") as caught:
            await r.connector.upsert_customer(client_record())
        assert other["ContactID"] in str(caught.value)
        (contact,) = r.emulator.contacts()
        assert contact["ContactNumber"] == "hubspot:company:7"


async def test_quotes_in_a_legal_name_are_escaped_in_the_where_filter() -> None:
    """A legal name with quotes and a backslash is found again through the where filter."""
    name = 'The "Best" Widgets \\ Co'
    async with rig() as r:
        seeded = r.emulator.seed_contact(name)
        assert await r.connector.upsert_customer(client_record(name=name)) == seeded["ContactID"]
    assert compile_where('Name=="The \\"Best\\" Widgets \\\\ Co"')({"Name": name})


# ---------------------------------------------------------------------------
# Invoices
# ---------------------------------------------------------------------------


async def test_an_invoice_is_created_with_every_field() -> None:
    """The invoice carries contact, dates, line amount types, currency, status, lines and the stamped reference."""
    async with rig() as r:
        contact_id = await r.connector.upsert_customer(client_record())
        status = await r.connector.create_invoice(draft(), contact_id)
        (invoice,) = r.emulator.invoices()
        assert invoice["Type"] == "ACCREC"
        assert invoice["Contact"]["ContactID"] == contact_id
        assert (invoice["DateString"], invoice["DueDateString"]) == ("2025-03-03T00:00:00", "2025-03-17T00:00:00")
        assert invoice["Date"] == "/Date(1740960000000+0000)/"
        assert (invoice["LineAmountTypes"], invoice["CurrencyCode"], invoice["Status"]) == (
            "Exclusive",
            "AUD",
            "AUTHORISED",
        )
        assert invoice["Reference"] == f"PO-4411 · syncd:{KEY}"
        second = invoice["LineItems"][1]
        assert (second["AccountCode"], second["TaxType"], second["ItemCode"]) == ("200", "OUTPUT", "SPRINT")
        assert second["UnitAmount"] == Decimal("333.3330")
        assert status.invoice_id == invoice["InvoiceID"]
        assert status.number == invoice["InvoiceNumber"] == "INV-0001"
        assert status.state is InvoiceState.AUTHORISED
        assert status.reference == invoice["Reference"]
        assert status.due_date == date(2025, 3, 17)
        assert status.updated_at == START

        request = next(req for req, _ in r.exchanges if req.method == "PUT" and req.url.path.endswith("/Invoices"))
        assert request.headers["idempotency-key"] == KEY
        assert request.headers["accept"] == "application/json"
        assert request.headers["xero-tenant-id"] == r.emulator.tenant_id
        assert request.url.params["unitdp"] == "4"
        assert b'"UnitAmount":333.3330' in request.content
        assert b'"Quantity":1.5' in request.content


async def test_totals_match_the_draft() -> None:
    """Subtotal equals the draft's; tax is 10 % per line, rounded half-up; total and amount due follow."""
    async with rig() as r:
        contact_id = await r.connector.upsert_customer(client_record())
        the_draft = draft()
        status = await r.connector.create_invoice(the_draft, contact_id)
        assert status.subtotal == the_draft.subtotal() == Decimal("3000.00")
        # 2500.00 → 250.00 tax; 1.5 × 333.333 = 500.00 (rounded) → 50.00 tax
        assert status.total == Decimal("3300.00")
        assert status.amount_due == Decimal("3300.00")
        assert status.amount_paid == 0


async def test_inclusive_and_no_tax_lines_are_totalled_as_xero_does() -> None:
    """Inclusive prices carry their tax inside; NoTax invoices carry none."""
    async with rig() as r:
        contact_id = await r.connector.upsert_customer(client_record())
        line = InvoiceLine(
            description="Retainer", quantity=Decimal(1), unit_price=Decimal("110.00"), account_code="200"
        )
        inclusive = await r.connector.create_invoice(
            draft(key="a" * 32, lines=(line,), line_amount_types="Inclusive"), contact_id
        )
        assert (inclusive.subtotal, inclusive.total) == (Decimal("100.00"), Decimal("110.00"))
        untaxed = await r.connector.create_invoice(
            draft(key="b" * 32, lines=(line,), line_amount_types="NoTax"), contact_id
        )
        assert (untaxed.subtotal, untaxed.total) == (Decimal("110.00"), Decimal("110.00"))


async def test_the_same_key_twice_makes_one_invoice() -> None:
    """Creating the same draft twice returns the first invoice (Idempotency-Key) and stores one."""
    async with rig() as r:
        contact_id = await r.connector.upsert_customer(client_record())
        first = await r.connector.create_invoice(draft(), contact_id)
        second = await r.connector.create_invoice(draft(), contact_id)
        assert first.invoice_id == second.invoice_id
        assert len(r.emulator.invoices()) == 1


async def test_a_reused_key_with_a_different_body_is_refused() -> None:
    """The same Idempotency-Key with another request is answered 400 and creates nothing."""
    async with rig() as r:
        contact_id = await r.connector.upsert_customer(client_record())
        await r.connector.create_invoice(draft(), contact_id)
        with pytest.raises(FatalError, match="used with a different request"):
            await r.connector.create_invoice(draft(reference="PO-9999"), contact_id)
        assert len(r.emulator.invoices()) == 1


async def test_the_emulator_replays_a_key_only_within_its_window_from_the_first_call() -> None:
    """A key is replayed for idempotency_ttl_s after its first call (Xero: 360 s); later it creates anew."""
    assert XeroEmulator().idempotency_ttl_s == 360
    with pytest.raises(ValueError, match="idempotency_ttl_s"):
        XeroEmulator(idempotency_ttl_s=-1)
    async with rig({"idempotency_ttl_s": 60}) as r:
        contact_id = await r.connector.upsert_customer(client_record())
        first = await r.connector.create_invoice(draft(), contact_id)
        r.clock.advance(59)
        assert (await r.connector.create_invoice(draft(), contact_id)).invoice_id == first.invoice_id
        r.clock.advance(1)  # 60 s after the first call: the replay above did not extend the window
        later = await r.connector.create_invoice(draft(), contact_id)
        assert later.invoice_id != first.invoice_id
        assert len(r.emulator.invoices()) == 2


async def test_a_dropped_answer_is_retried_with_the_same_key() -> None:
    """A response lost after Xero committed is retried; the key replays it and no second invoice appears."""
    async with rig() as r:
        contact_id = await r.connector.upsert_customer(client_record())
        r.emulator.faults.add(Fault(kind="drop_response", method="PUT", path_contains="/Invoices"))
        status = await r.connector.create_invoice(draft(), contact_id)
        (invoice,) = r.emulator.invoices()
        assert status.invoice_id == invoice["InvoiceID"]
        assert r.emulator.calls["createInvoices"] == 2


async def test_after_every_answer_is_lost_find_invoice_finds_it() -> None:
    """When every attempt's answer is lost, find_invoice(key) finds the one invoice Xero stored."""
    async with rig() as r:
        contact_id = await r.connector.upsert_customer(client_record())
        r.emulator.faults.add(Fault(kind="drop_response", method="PUT", path_contains="/Invoices", times=None))
        with pytest.raises(RetriableError):
            await r.connector.create_invoice(draft(), contact_id)
        r.emulator.faults.clear()
        found = await r.connector.find_invoice(KEY, kind=DraftKind.INVOICE)
        (invoice,) = r.emulator.invoices()
        assert found is not None
        assert found.invoice_id == invoice["InvoiceID"]
        assert await r.connector.find_invoice("f" * 32, kind=DraftKind.INVOICE) is None


async def test_find_invoice_reads_only_the_list_of_the_drafts_kind() -> None:
    """An invoice draft's key is looked up among invoices only, a credit note's among credit notes only."""
    async with rig() as r:
        contact_id = await r.connector.upsert_customer(client_record())
        invoice = await r.connector.create_invoice(draft(), contact_id)
        note = await r.connector.create_invoice(draft(key="c" * 32, kind=DraftKind.CREDIT_NOTE), contact_id)
        before = len(r.exchanges)
        assert await r.connector.find_invoice(KEY, kind=DraftKind.INVOICE) == invoice
        assert await r.connector.find_invoice("c" * 32, kind=DraftKind.CREDIT_NOTE) == note
        assert await r.connector.find_invoice(KEY, kind=DraftKind.CREDIT_NOTE) is None
        assert await r.connector.find_invoice("c" * 32, kind=DraftKind.INVOICE) is None
        paths = [request.url.path.removeprefix(API) for request, _ in r.exchanges[before:]]
        assert paths == ["/Invoices", "/CreditNotes", "/CreditNotes", "/Invoices"]


async def test_a_long_po_is_trimmed_and_the_stamp_kept() -> None:
    """A PO number too long for Reference's 255 characters is trimmed; the stamp stays whole."""
    async with rig() as r:
        contact_id = await r.connector.upsert_customer(client_record())
        status = await r.connector.create_invoice(draft(reference="P" * 400), contact_id)
        assert status.reference is not None
        assert len(status.reference) == 255
        assert status.reference.endswith(f" · syncd:{KEY}")
        assert await r.connector.find_invoice(KEY, kind=DraftKind.INVOICE) == status


async def test_a_rejected_draft_lists_xeros_validation_messages() -> None:
    """A 400 ValidationException becomes a FatalError quoting each of Xero's messages."""
    async with rig() as r:
        contact_id = await r.connector.upsert_customer(client_record())
        bad = InvoiceLine(
            description="x", quantity=Decimal(1), unit_price=Decimal(1), account_code="999", tax_type="BOGUS"
        )
        with pytest.raises(XeroRejected) as caught:
            await r.connector.create_invoice(draft(lines=(bad,), currency="JPY"), contact_id)
        assert isinstance(caught.value, FatalError)
        assert "Account code '999' is not a valid code for this document." in caught.value.messages
        assert "Organisation is not subscribed to currency JPY" in caught.value.messages
        assert any("BOGUS" in message for message in caught.value.messages)
        assert r.emulator.invoices() == []


async def test_a_credit_note_is_created_found_and_reread() -> None:
    """A credit-note draft becomes an ACCRECCREDIT credit note that find_invoice and get_invoice see."""
    async with rig() as r:
        contact_id = await r.connector.upsert_customer(client_record())
        status = await r.connector.create_invoice(draft(kind=DraftKind.CREDIT_NOTE, send=True), contact_id)
        (note,) = r.emulator.credit_notes()
        assert note["Type"] == "ACCRECCREDIT"
        assert note["CreditNoteNumber"] == "CN-0001"
        assert note["Reference"] == f"PO-4411 · syncd:{KEY}"
        assert r.emulator.invoices() == []
        assert r.emulator.emails == []
        assert status.invoice_id == note["CreditNoteID"]
        assert status.total == Decimal("3300.00")
        assert status.amount_due == Decimal("3300.00")
        assert await r.connector.find_invoice(KEY, kind=DraftKind.CREDIT_NOTE) == status
        assert (await r.connector.get_invoice(status.invoice_id)).invoice_id == status.invoice_id


async def test_an_approved_invoice_is_emailed_when_asked() -> None:
    """send=True emails an AUTHORISED invoice (204) and reports it sent; a draft is never emailed."""
    async with rig() as r:
        contact_id = await r.connector.upsert_customer(client_record())
        sent = await r.connector.create_invoice(draft(send=True), contact_id)
        assert r.emulator.emails == [sent.invoice_id]
        assert sent.state is InvoiceState.SENT
        assert (await r.connector.get_invoice(sent.invoice_id)).state is InvoiceState.SENT
        kept = await r.connector.create_invoice(draft(key="c" * 32, send=True, status="draft"), contact_id)
        assert kept.state is InvoiceState.DRAFT
        assert r.emulator.emails == [sent.invoice_id]


async def test_get_invoice_of_an_unknown_id_raises_not_found() -> None:
    """get_invoice raises NotFound when neither an invoice nor a credit note has the id."""
    async with rig() as r:
        with pytest.raises(NotFound):
            await r.connector.get_invoice("6f1c2e0a-0000-4000-8000-000000000000")


async def test_payments_move_the_invoice_to_partially_paid_then_paid() -> None:
    """pay_invoice updates AmountPaid/AmountDue/Status; the connector maps them."""
    async with rig() as r:
        contact_id = await r.connector.upsert_customer(client_record())
        status = await r.connector.create_invoice(draft(), contact_id)
        await r.emulator.pay_invoice(status.invoice_id, Decimal("1000.00"))
        part = await r.connector.get_invoice(status.invoice_id)
        assert part.state is InvoiceState.PARTIALLY_PAID
        assert (part.amount_paid, part.amount_due) == (Decimal("1000.00"), Decimal("2300.00"))
        await r.emulator.pay_invoice(status.invoice_id, Decimal("2300.00"))
        paid = await r.connector.get_invoice(status.invoice_id)
        assert paid.state is InvoiceState.PAID
        assert paid.amount_due == 0
        with pytest.raises(ValueError, match="status PAID"):
            await r.emulator.pay_invoice(status.invoice_id, Decimal("1.00"))


# ---------------------------------------------------------------------------
# Polling
# ---------------------------------------------------------------------------


async def test_poll_changes_reads_invoices_changed_since_the_cursor() -> None:
    """poll_changes starts now, then reports changed invoices with If-Modified-Since and a stable event id."""
    async with rig() as r:
        contact_id = await r.connector.upsert_customer(client_record())
        start = await r.connector.poll_changes(None)
        assert start.hints == ()
        assert not start.more
        r.clock.advance(60)
        created = await r.connector.create_invoice(draft(), contact_id)
        page = await r.connector.poll_changes(start.cursor)
        assert [hint.object_id for hint in page.hints] == [created.invoice_id]
        (hint,) = page.hints
        assert hint.object_type == "invoice"
        assert hint.connection == "xero"
        assert hint.event_id == f"poll:{created.invoice_id}:{(START + timedelta(seconds=60)).isoformat()}"
        poll = [req for req, _ in r.exchanges if req.method == "GET" and "page" in req.url.params][-1]
        assert poll.headers["if-modified-since"] == (START).isoformat()

        r.clock.advance(60)
        await r.emulator.pay_invoice(created.invoice_id, Decimal("100.00"))
        later = await r.connector.poll_changes(page.cursor)
        assert [h.event_id for h in later.hints] == [
            f"poll:{created.invoice_id}:{(START + timedelta(seconds=120)).isoformat()}"
        ]


async def test_poll_changes_pages_until_the_last_page() -> None:
    """With more changes than a page holds, poll_changes says `more` and continues on the next page."""
    async with rig() as r:
        contact_id = await r.connector.upsert_customer(client_record())
        start = await r.connector.poll_changes(None)
        for n in range(3):
            r.clock.advance(1)
            await r.connector.create_invoice(draft(key=f"{n:032x}"), contact_id)
        r.connector.page_size = 2
        first = await r.connector.poll_changes(start.cursor)
        second = await r.connector.poll_changes(first.cursor)
        assert (len(first.hints), first.more, len(second.hints), second.more) == (2, True, 1, False)
        seen = {h.object_id for h in (*first.hints, *second.hints)}
        assert seen == {invoice["InvoiceID"] for invoice in r.emulator.invoices()}


async def poll_to_the_end(connector: XeroConnector, cursor: str) -> tuple[list[ChangeHint], str]:
    """Every page of one poll round: its hints, and the cursor it ends on."""
    hints: list[ChangeHint] = []
    for _ in range(50):
        page = await connector.poll_changes(cursor)
        hints += page.hints
        cursor = page.cursor
        if not page.more:
            return hints, cursor
    raise AssertionError("the poll round did not end within 50 pages")


async def test_an_invoice_changed_between_pages_does_not_hide_another() -> None:
    """An invoice that moves to the end of the order while the poll is between pages skips no other invoice."""
    async with rig() as r:
        contact_id = await r.connector.upsert_customer(client_record())
        start = await r.connector.poll_changes(None)
        created = []
        for n in range(4):
            r.clock.advance(1)
            created.append(await r.connector.create_invoice(draft(key=f"{n:032x}"), contact_id))
        r.connector.page_size = 2
        first = await r.connector.poll_changes(start.cursor)
        assert [h.object_id for h in first.hints] == [created[0].invoice_id, created[1].invoice_id]
        assert first.more
        r.clock.advance(1)
        await r.emulator.pay_invoice(created[0].invoice_id, Decimal("100.00"))  # now last in UpdatedDateUTC order
        rest, _ = await poll_to_the_end(r.connector, first.cursor)
        assert [h.object_id for h in rest] == [c.invoice_id for c in (*created[2:], created[0])]
        paid_at = START + timedelta(seconds=5)
        assert rest[-1].event_id == f"poll:{created[0].invoice_id}:{paid_at.isoformat()}"
        every = [h.event_id for h in (*first.hints, *rest)]
        assert len(every) == len(set(every)) == 5  # the boundary invoices read again are not hinted again
        polls = [req for req, _ in r.exchanges if req.url.path == f"{API}/Invoices" and "page" in req.url.params]
        assert {req.url.params["page"] for req in polls} == {"1"}  # always page 1, from the last change seen


async def test_more_changes_in_one_instant_than_a_page_holds_are_each_hinted_once() -> None:
    """Documents sharing one UpdatedDateUTC beyond a page are read page by page, each hinted once, and the round ends."""
    async with rig() as r:
        contact_id = await r.connector.upsert_customer(client_record())
        start = await r.connector.poll_changes(None)
        r.clock.advance(1)
        created = [await r.connector.create_invoice(draft(key=f"{n:032x}"), contact_id) for n in range(5)]
        r.connector.page_size = 2
        hints, cursor = await poll_to_the_end(r.connector, start.cursor)
        assert sorted(h.object_id for h in hints) == sorted(c.invoice_id for c in created)
        again = await r.connector.poll_changes(cursor)
        assert again.hints == ()  # the same instant, read again, hints nothing new
        hints, _ = await poll_to_the_end(r.connector, cursor)
        assert hints == []


async def test_a_list_that_is_caught_up_is_not_read_again_while_the_other_pages_on() -> None:
    """While invoices have pages left, later pages of the round do not read credit notes again."""
    async with rig() as r:
        start = await r.connector.poll_changes(None)
        r.clock.advance(1)
        await invoice_and_credit(r)
        contact_id = await r.connector.upsert_customer(client_record())
        for n in range(3):
            r.clock.advance(1)
            await r.connector.create_invoice(draft(key=f"{n:032x}"), contact_id)
        r.connector.page_size = 2
        before = len(r.exchanges)
        hints, _ = await poll_to_the_end(r.connector, start.cursor)
        assert sorted(h.object_type for h in hints) == ["credit_note", *["invoice"] * 4]
        paths = [req.url.path.removeprefix(API) for req, _ in r.exchanges[before:]]
        assert paths.count("/CreditNotes") == 1
        assert paths.count("/Invoices") >= 3


async def test_a_cursor_of_the_earlier_form_resumes_from_its_since() -> None:
    """A cursor saved by the page-numbered poll ({since, page, high}) resumes both lists from its since."""
    async with rig() as r:
        r.clock.advance(60)
        invoice_id, note_id = await invoice_and_credit(r)
        old = json.dumps({"since": START.isoformat(), "page": 3, "high": START.isoformat()})
        hints, _ = await poll_to_the_end(r.connector, old)
        assert {(h.object_type, h.object_id) for h in hints} == {("invoice", invoice_id), ("credit_note", note_id)}


async def test_an_unreadable_cursor_is_a_fatal_error() -> None:
    """A cursor that is not the connector's JSON raises FatalError naming the fix."""
    async with rig() as r:
        for cursor in ("yesterday", "[]", '{"invoice": {"since": "2025-03-03T09:00:00"}}'):
            with pytest.raises(FatalError, match="reset the connection's cursor"):
                await r.connector.poll_changes(cursor)


# ---------------------------------------------------------------------------
# Auth
# ---------------------------------------------------------------------------


async def test_client_credentials_token_is_fetched_once_and_cached_until_expiry() -> None:
    """A custom connection fetches a token with basic auth, reuses it, and fetches again after 30 minutes.

    (API calls go through ``connector.http``; ``check()`` always asks for a fresh token, below.)
    """
    async with rig(tenant_id=None) as r:
        await r.connector.http.request("GET", "/Organisation")
        await r.connector.http.request("GET", "/Organisation")
        assert r.emulator.calls["token"] == 1
        assert r.store.tokens is not None
        assert r.store.tokens["grant"] == "client_credentials"
        token_request = next(req for req, _ in r.exchanges if req.url.path == "/connect/token")
        assert token_request.headers["authorization"].startswith("Basic ")
        assert b"grant_type=client_credentials" in token_request.content
        api = next(req for req, _ in r.exchanges if req.url.path.endswith("/Organisation"))
        assert "xero-tenant-id" not in api.headers
        r.clock.advance(1800)
        assert (await r.connector.http.request("GET", "/Organisation")).status_code == 200
        assert r.emulator.calls["token"] == 2
        # check() proves the configured secret: a token request of its own, though one is cached.
        assert await r.connector.check() == []
        assert r.emulator.calls["token"] == 3


async def test_wrong_client_credentials_are_reported_without_the_secret() -> None:
    """check() names the refused grant and never prints the secret."""
    async with rig(client_secret="not-the-secret") as r:
        (problem,) = await r.connector.check()
        assert "invalid_client" in problem
        assert "client_credentials" in problem
        assert "not-the-secret" not in problem


async def test_code_flow_check_reports_a_wrong_client_secret_without_spending_the_refresh_token() -> None:
    """With the code flow and a valid stored token, check() still finds a wrong secret; the stored token is untouched."""
    async with rig() as r:
        good = await code_flow(r)
        stored = await r.store.load()
        assert await good.check() == []
        wrong = r.connect(grant="authorization_code", client_secret="not-the-secret")
        (problem,) = await wrong.check()
        assert "invalid_client" in problem
        assert "not-the-secret" not in problem
        assert await r.store.load() == stored
        assert await good.check() == []  # the refresh token was not spent


async def code_flow(r: Rig) -> XeroConnector:
    """Run the consent + code exchange (what `syncd auth xero` does) and store the tokens."""
    conf = settings(r.emulator, grant="authorization_code")
    url = consent_url(conf, state="st4te")
    answer = await r.client.get(url)
    assert answer.status_code == 302
    redirect = httpx.URL(answer.headers["location"])
    assert redirect.params["state"] == "st4te"
    assert str(redirect).startswith(conf.redirect_uri)
    tokens = await exchange_code(conf, r.client, redirect.params["code"], now=lambda: r.clock().timestamp())
    await r.store.save(tokens)
    return r.connect(grant="authorization_code")


async def test_syncd_auth_code_flow_connects_and_lists_tenants() -> None:
    """The spec's code flow: consent URL, redirect URI, code exchange with a refresh token, tenant lines."""
    async with rig() as r:
        flow = SPEC.code_flow
        assert flow is not None
        conf = settings(r.emulator, grant="authorization_code", tenant_id=None)
        assert flow.redirect_uri(conf) == "http://localhost:8765/callback"
        answer = await r.client.get(flow.consent_url(conf, "s1"))
        code = httpx.URL(answer.headers["location"]).params["code"]
        tokens = await flow.exchange_code(conf, r.client, code)
        assert set(tokens) >= {"access_token", "refresh_token", "expires_at"}
        lines = await flow.describe(conf, r.client, tokens)
        assert lines[0].startswith(f'tenant_id = "{r.emulator.tenant_id}"')
        assert "set one of these tenant_id lines" in lines[-1]
        with pytest.raises(AuthError, match="authorization_code"):
            await flow.exchange_code(conf, r.client, code)


async def test_the_consent_url_carries_the_documented_parameters() -> None:
    """consent_url asks for a code with client id, redirect URI, space-separated scopes and state."""
    conf = settings(XeroEmulator(), grant="authorization_code")
    url = httpx.URL(consent_url(conf, state="abc"))
    assert url.params["response_type"] == "code"
    assert url.params["client_id"] == conf.client_id
    assert url.params["redirect_uri"] == "http://localhost:8765/callback"
    assert url.params["state"] == "abc"
    assert url.params["scope"].split() == list(conf.scopes)
    assert "offline_access" in conf.scopes
    assert "%20" in str(url)


async def test_code_flow_refresh_rotates_saves_before_use_and_spends_the_old_token() -> None:
    """An expired access token is refreshed under the lock; the new set is saved before use; the old refresh token is dead."""
    async with rig() as r:
        connector = await code_flow(r)
        first = dict(r.store.tokens or {})
        connections = await list_connections(connector.settings, r.client, first["access_token"])
        assert [c["tenantId"] for c in connections] == [r.emulator.tenant_id]
        assert await connector.check() == []
        r.clock.advance(1800)
        await connector.find_invoice(KEY, kind=DraftKind.INVOICE)
        fresh = dict(r.store.tokens or {})
        assert fresh["refresh_token"] != first["refresh_token"]
        assert fresh["access_token"] != first["access_token"]
        assert r.store._lock.entered == 1
        saved = r.events.index(("save", fresh["access_token"]))
        used = r.events.index(("request", fresh["access_token"]))
        assert saved < used
        replay = await r.client.post(
            f"{HOST}/connect/token",
            data={"grant_type": "refresh_token", "refresh_token": first["refresh_token"]},
            auth=(r.emulator.client_id, r.emulator.client_secret),
        )
        assert replay.status_code == 400
        assert replay.json() == {"error": "invalid_grant"}


async def test_a_replica_reuses_tokens_another_replica_refreshed() -> None:
    """Inside the lock, tokens already refreshed by another replica are used; the spent refresh token is not sent."""
    async with rig() as r:
        one = await code_flow(r)
        two = r.connect(grant="authorization_code")
        await one.find_invoice(KEY, kind=DraftKind.INVOICE)
        await two.find_invoice(KEY, kind=DraftKind.INVOICE)
        r.clock.advance(1800)
        await one.find_invoice(KEY, kind=DraftKind.INVOICE)
        await two.find_invoice(KEY, kind=DraftKind.INVOICE)
        assert r.emulator.calls["token"] == 2  # the code exchange and one refresh
        assert r.store._lock.entered == 2  # the second replica took the lock, found fresh tokens


async def test_a_401_refreshes_once_and_retries() -> None:
    """A token revoked at Xero is answered 401; the flow refreshes and the call succeeds."""
    async with rig() as r:
        connector = await code_flow(r)
        assert await connector.find_invoice(KEY, kind=DraftKind.INVOICE) is None
        r.emulator.revoke_access_tokens()
        assert await connector.find_invoice(KEY, kind=DraftKind.INVOICE) is None
        assert r.emulator.calls["token"] == 2
        assert [resp.status_code for req, resp in r.exchanges if req.url.path.endswith("/Invoices")] == [200, 401, 200]


async def test_check_never_rotates_the_refresh_token() -> None:
    """check() uses a valid stored token as it is, and reports an expired one without refreshing."""
    async with rig() as r:
        connector = await code_flow(r)
        before = dict(r.store.tokens or {})
        assert await connector.check() == []
        assert r.emulator.calls["getOrganisations"] == 1
        r.clock.advance(1800)
        (problem,) = await connector.check()
        assert "expired" in problem
        assert "daemon" in problem
        # the code exchange, then one credential probe per check (a refresh token that cannot exist)
        assert r.emulator.calls["token"] == 3
        assert r.emulator.calls["getOrganisations"] == 1
        assert r.store.tokens == before
        # the stored refresh token was never spent: it still refreshes
        conf = settings(r.emulator, grant="authorization_code")
        form = {"grant_type": "refresh_token", "refresh_token": str(before["refresh_token"])}
        assert "access_token" in await request_token(conf, r.client, form)


async def test_check_without_stored_tokens_says_how_to_connect() -> None:
    """With the code flow and no stored tokens, check() points at `syncd auth xero`."""
    async with rig(grant="authorization_code") as r:
        (problem,) = await r.connector.check()
        assert "syncd auth xero" in problem


# ---------------------------------------------------------------------------
# Rate limits
# ---------------------------------------------------------------------------


async def test_a_429_is_retried_after_retry_after() -> None:
    """Past 2 calls a minute the emulator answers 429 with Retry-After; the retry waits exactly that."""
    async with rig({"rate_limit_per_min": 2}, rate_limit_per_min=None, max_concurrent=None) as r:
        assert await r.connector.check() == []
        assert await r.connector.check() == []
        assert await r.connector.check() == []
        assert r.sleeps == [60.0]
        limited = [resp for _, resp in r.exchanges if resp.status_code == 429]
        assert [resp.headers["x-rate-limit-problem"] for resp in limited] == ["minute"]
        assert limited[0].headers["retry-after"] == "60"
        ok = [resp for req, resp in r.exchanges if resp.status_code == 200 and req.url.path.endswith("/Organisation")]
        assert ok[0].headers["x-minlimit-remaining"] == "1"
        assert ok[0].headers["x-daylimit-remaining"] == "4999"


async def test_a_sixth_concurrent_call_is_refused_and_limits_can_be_switched_off() -> None:
    """With five calls in flight the next is a 429 naming the concurrent limit; rate_limits=False sends no limit headers."""
    async with rig(rate_limit_per_min=None, max_concurrent=None) as r:
        r.emulator._inflight[r.emulator.tenant_id] = 5  # five calls held open at Xero
        r.connector.http.max_attempts = 1
        (problem,) = await r.connector.check()
        assert "429" in problem
        (limited,) = [resp for _, resp in r.exchanges if resp.status_code == 429]
        assert limited.headers["x-rate-limit-problem"] == "concurrent"
        assert "retry-after" not in limited.headers
    async with rig({"rate_limits": False}) as r:
        assert await r.connector.check() == []
        (ok,) = [resp for req, resp in r.exchanges if req.url.path.endswith("/Organisation")]
        assert "x-minlimit-remaining" not in ok.headers


async def test_an_injected_429_and_503_are_retried() -> None:
    """Faults: a 429 with Retry-After 7 and a 503 are both retried to success."""
    async with rig() as r:
        r.emulator.faults.add(Fault(kind="status", status=429, retry_after_s=7, path_contains="/Organisation"))
        r.emulator.faults.add(Fault(kind="status", status=503, path_contains="/Organisation"))
        assert await r.connector.check() == []
        assert r.sleeps[0] == 7.0
        assert len(r.sleeps) == 2


async def test_the_emulator_wants_accept_json_and_a_bearer_token() -> None:
    """Without Accept: application/json the emulator answers 406; without a token 401; a wrong tenant 403."""
    async with rig() as r:
        answer = await r.client.get(f"{HOST}/api.xro/2.0/Organisation")
        assert answer.status_code == 406
        answer = await r.client.get(f"{HOST}/api.xro/2.0/Organisation", headers={"Accept": "application/json"})
        assert answer.status_code == 401
        token = (
            await r.client.post(
                f"{HOST}/connect/token",
                data={"grant_type": "client_credentials"},
                auth=(r.emulator.client_id, r.emulator.client_secret),
            )
        ).json()["access_token"]
        headers = {"Accept": "application/json", "Authorization": f"Bearer {token}", "Xero-tenant-id": "nope"}
        answer = await r.client.get(f"{HOST}/api.xro/2.0/Organisation", headers=headers)
        assert answer.status_code == 403


# ---------------------------------------------------------------------------
# Webhooks
# ---------------------------------------------------------------------------


def delivery(body: bytes, signature: str | None) -> WebhookRequest:
    headers = {"content-type": "application/json"}
    if signature is not None:
        headers["x-xero-signature"] = signature
    return WebhookRequest(
        method="POST", url="https://syncd.example/webhooks/xero", headers=headers, body=body, received_at=START
    )


def event_body(**changes: Any) -> bytes:
    event = {
        "resourceUrl": "https://api.xero.com/api.xro/2.0/Invoices/717f2bfc-c6d4-41fd-b238-3f2f0c0cf777",
        "resourceId": "717f2bfc-c6d4-41fd-b238-3f2f0c0cf777",
        "eventDateUtc": "2025-03-03T09:15:39.902",
        "eventType": "UPDATE",
        "eventCategory": "INVOICE",
        "tenantId": "3f7c2a6e-9b1d-4e58-a2c4-6d0e8f1b7a39",
        "tenantType": "ORGANISATION",
        **changes,
    }
    return dump_json(
        {"events": [event], "firstEventSequence": 3, "lastEventSequence": 3, "entropy": "FXNGWLCCGVANWHKILRUB"}
    )


def test_the_verifier_accepts_a_good_signature_and_rejects_a_bad_one() -> None:
    """A correctly signed delivery yields hints; a wrong, missing or unkeyed signature raises AuthError."""
    emulator = XeroEmulator()
    verifier = SPEC.verifier(settings(emulator), FakeClock()) if SPEC.verifier else None
    assert isinstance(verifier, XeroWebhookVerifier)
    body = event_body()
    (hint,) = verifier.verify(delivery(body, emulator.signature(body)))
    assert hint == ChangeHint(
        connection="xero",
        object_type="invoice",
        object_id="717f2bfc-c6d4-41fd-b238-3f2f0c0cf777",
        event_id="717f2bfc-c6d4-41fd-b238-3f2f0c0cf777:UPDATE:2025-03-03T09:15:39.902",
        occurred_at=datetime(2025, 3, 3, 9, 15, 39, 902000, tzinfo=UTC),
        kind="INVOICE.UPDATE",
    )
    with pytest.raises(AuthError, match="does not match"):
        verifier.verify(delivery(body, emulator.signature(body + b" ")))
    with pytest.raises(AuthError, match="missing"):
        verifier.verify(delivery(body, None))
    with pytest.raises(AuthError, match="webhook_key"):
        XeroWebhookVerifier(key=None, connection="xero").verify(delivery(body, emulator.signature(body)))


def test_contact_events_become_contact_hints_and_other_tenants_are_skipped() -> None:
    """CONTACT events are `contact` hints; events of another organisation are not this connection's."""
    emulator = XeroEmulator()
    verifier = XeroWebhookVerifier(key=emulator.webhook_key, connection="xero", tenant_id=emulator.tenant_id)
    body = event_body(eventCategory="CONTACT", eventType="CREATE")
    (hint,) = verifier.verify(delivery(body, emulator.signature(body)))
    assert (hint.object_type, hint.kind) == ("contact", "CONTACT.CREATE")
    elsewhere = event_body(tenantId="00000000-0000-0000-0000-000000000001")
    assert verifier.verify(delivery(elsewhere, emulator.signature(elsewhere))) == []


def test_the_intent_to_receive_handshake() -> None:
    """An empty, correctly signed ITR delivery verifies to no hints; a wrongly signed one is refused."""
    emulator = XeroEmulator()
    verifier = XeroWebhookVerifier(key=emulator.webhook_key, connection="xero")
    body = b'{"events": [], "lastEventSequence": 0, "firstEventSequence": 0, "entropy": "S0m3r4Nd0mt3xt"}'
    assert verifier.verify(delivery(body, emulator.signature(body))) == []
    with pytest.raises(AuthError):
        verifier.verify(delivery(body, emulator.signature(b"{}")))


def test_a_signed_but_malformed_delivery_names_the_field() -> None:
    """Correctly signed but malformed bodies raise RecordError naming the field."""
    emulator = XeroEmulator()
    verifier = XeroWebhookVerifier(key=emulator.webhook_key, connection="xero")
    missing = json.loads(event_body())
    del missing["events"][0]["eventDateUtc"]
    body = json.dumps(missing).encode()
    with pytest.raises(RecordError, match=r"events\.0\.eventDateUtc") as caught:
        verifier.verify(delivery(body, emulator.signature(body)))
    assert caught.value.place == "events.0.eventDateUtc"
    bad_date = event_body(eventDateUtc="last tuesday")
    with pytest.raises(RecordError, match="eventDateUtc"):
        verifier.verify(delivery(bad_date, emulator.signature(bad_date)))
    with pytest.raises(RecordError, match="not JSON"):
        verifier.verify(delivery(b"<xml/>", emulator.signature(b"<xml/>")))


def receiver(verifier: XeroWebhookVerifier, received: list[ChangeHint]) -> Starlette:
    """A stand-in for syncd's webhook endpoint: 200 when verified, 401 when not."""

    async def hook(request: Request) -> Response:
        body = await request.body()
        headers = {key.lower(): value for key, value in request.headers.items()}
        try:
            received.extend(
                verifier.verify(
                    WebhookRequest(method="POST", url=str(request.url), headers=headers, body=body, received_at=START)
                )
            )
        except AuthError:
            return Response(status_code=401)
        return Response(status_code=200)

    return Starlette(routes=[Route("/webhooks/xero", hook, methods=["POST"])])


async def test_pay_invoice_delivers_a_signed_invoice_update_and_itr_passes() -> None:
    """The emulator's ITR gets (200, 401) from a verifying endpoint, and a payment arrives as INVOICE.UPDATE."""
    async with rig() as r:
        received: list[ChangeHint] = []
        verifier = XeroWebhookVerifier(key=r.emulator.webhook_key, connection="xero", tenant_id=r.emulator.tenant_id)
        app = receiver(verifier, received)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as syncd:
            r.emulator.subscribe("http://syncd.test/webhooks/xero", syncd)
            assert await r.emulator.intent_to_receive() == (200, 401)
            contact_id = await r.connector.upsert_customer(client_record())
            status = await r.connector.create_invoice(draft(), contact_id)
            await r.emulator.pay_invoice(status.invoice_id, Decimal("3300.00"))
        (hint,) = received
        assert (hint.object_id, hint.kind, hint.occurred_at) == (status.invoice_id, "INVOICE.UPDATE", START)
        delivery_sent = r.emulator.webhooks.deliveries[-1]
        assert delivery_sent.status == 200
        assert load_json(delivery_sent.body)["lastEventSequence"] == 1


async def test_an_invoice_read_says_its_contact_its_stamp_and_its_latest_payment() -> None:
    """get_invoice reports the ContactID, the syncd key in Reference and the newest payment's date; a
    hand-made invoice carries no key; a deleted payment no longer counts."""
    async with rig() as r:
        contact_id = await r.connector.upsert_customer(client_record())
        status = await r.connector.create_invoice(draft(), contact_id)
        assert (status.customer_id, status.stamped_key, status.last_payment_date) == (contact_id, KEY, None)
        await r.emulator.pay_invoice(status.invoice_id, Decimal("100.00"), on=date(2025, 3, 10))
        second = await r.emulator.pay_invoice(status.invoice_id, Decimal("200.00"), on=date(2025, 3, 12))
        assert (await r.connector.get_invoice(status.invoice_id)).last_payment_date == date(2025, 3, 12)
        await r.emulator.delete_payment(second["PaymentID"])
        read = await r.connector.get_invoice(status.invoice_id)
        assert (read.last_payment_date, read.kind) == (date(2025, 3, 10), "invoice")
        note = await r.connector.create_invoice(draft("n" * 32, kind=DraftKind.CREDIT_NOTE), contact_id)
        assert (note.kind, note.stamped_key, note.customer_id) == ("credit_note", "n" * 32, contact_id)
    assert stamped_key("PO-4411 · syncd:abc123") == "abc123"
    assert stamped_key("PO-4411") is None


# ---------------------------------------------------------------------------
# Codes (drift guard)
# ---------------------------------------------------------------------------


async def test_codes_list_the_accounts_tax_types_and_currencies_in_use() -> None:
    """codes() lists account codes, tax types and currencies; an archived account is left out; no item codes."""
    async with rig() as r:
        assert isinstance(r.connector, InvoicingCodes)
        first = await r.connector.codes()
        r.emulator.archive_account("260")
        second = await r.connector.codes()
    assert first == {
        "account_code": frozenset({"200", "260", "400", "090"}),
        "tax_type": frozenset({"OUTPUT", "INPUT", "EXEMPTOUTPUT", "NONE"}),
        "currency": frozenset({"AUD", "USD", "NZD", "GBP", "EUR"}),
        "tracking": frozenset({"Region/North", "Region/South"}),
    }
    assert second["account_code"] == frozenset({"200", "400", "090"})
    assert r.emulator.calls["getAccounts"] == 2
    assert r.emulator.calls["getTaxRates"] == r.emulator.calls["getCurrencies"] == 2


# ---------------------------------------------------------------------------
# Vendor errors: read, mapped to the status table's action
# ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def bare_connector(emulator: XeroEmulator, **overrides: Any) -> AsyncIterator[XeroConnector]:
    """A connector on a plain client: no event hook reads response bodies (as in `syncd run`)."""
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=emulator.app)) as client:
        ctx = ConnectorContext(
            connection="books",
            client=client,
            tokens=MemoryTokenStore([]),
            clock=FakeClock(),
            make_http=functools.partial(VendorHttp, client, connection="books", sleep=sleep),
        )
        yield XeroConnector(settings(emulator, **overrides), ctx)


async def test_a_validation_exception_is_read_once_with_every_message() -> None:
    """A 400 ValidationException raises, on the first attempt, a record error holding each of Xero's messages."""
    emulator = XeroEmulator(clock=FakeClock())
    async with bare_connector(emulator) as connector:
        contact_id = await connector.upsert_customer(client_record())
        bad = InvoiceLine(
            description="x", quantity=Decimal(1), unit_price=Decimal(1), account_code="999", tax_type="BOGUS"
        )
        with pytest.raises(Rejected) as caught:
            await connector.create_invoice(draft(lines=(bad,), currency="JPY"), contact_id)
        assert isinstance(caught.value, RecordError)
        assert caught.value.status == 400
        assert "Account code '999' is not a valid code for this document." in caught.value.messages
        assert "Organisation is not subscribed to currency JPY" in caught.value.messages
        assert len(caught.value.messages) >= 3
        for message in caught.value.messages:
            assert message in str(caught.value)
        assert emulator.calls["createInvoices"] == 1


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504])
async def test_transient_statuses_are_retried_honouring_retry_after(status: int) -> None:
    """408, 409, 429 and 5xx are retried; a Retry-After is waited exactly."""
    async with rig() as r:
        r.emulator.faults.add(Fault(kind="status", status=status, retry_after_s=4, path_contains="/Invoices"))
        assert await r.connector.find_invoice(KEY, kind=DraftKind.INVOICE) is None
        assert r.sleeps == [4.0]


async def test_a_422_is_a_record_error_and_never_retried() -> None:
    """A 422 fails the record at once (Rejected), with the body's message."""
    async with rig() as r:
        r.emulator.faults.add(Fault(kind="status", status=422, path_contains="/Invoices", times=None))
        contact_id = await r.connector.upsert_customer(client_record())
        with pytest.raises(Rejected, match="injected fault") as caught:
            await r.connector.create_invoice(draft(), contact_id)
        assert caught.value.status == 422
        assert r.sleeps == []


async def test_a_404_on_the_look_up_means_not_found() -> None:
    """find_invoice answers None when Xero's look-up answers 404, for either kind; it is never an error."""
    async with rig() as r:
        r.emulator.faults.add(Fault(kind="status", status=404, path_contains="/Invoices"))
        r.emulator.faults.add(Fault(kind="status", status=404, path_contains="/CreditNotes"))
        assert await r.connector.find_invoice(KEY, kind=DraftKind.INVOICE) is None
        assert await r.connector.find_invoice(KEY, kind=DraftKind.CREDIT_NOTE) is None
        assert r.emulator.faults.faults == []  # both look-ups were answered 404
        assert r.sleeps == []


async def test_a_disconnected_tenant_is_an_auth_error_saying_how_to_reconnect() -> None:
    """A 401 that survives a renewed token raises AuthError naming the connection and `syncd auth xero`."""
    async with rig() as r:
        connector = await code_flow(r)
        r.emulator.faults.add(Fault(kind="status", status=401, path_contains="/Invoices", times=2))
        with pytest.raises(AuthError) as caught:
            await connector.find_invoice(KEY, kind=DraftKind.INVOICE)
        message = str(caught.value)
        assert message.startswith("xero: GET /api.xro/2.0/Invoices answered 401")
        assert "syncd auth xero --connection xero" in message
        assert r.emulator.calls["token"] == 2  # the code exchange, then one renewal after the first 401
        assert r.sleeps == []


async def test_a_403_names_the_tenant_and_the_scopes() -> None:
    """A 403 (an organisation not connected, or a scope missing) raises AuthError naming both and the fix."""
    async with rig() as r:
        connector = await code_flow(r)
        other = r.connect(grant="authorization_code", tenant_id="00000000-0000-4000-8000-000000000000")
        with pytest.raises(AuthError) as caught:
            await other.find_invoice(KEY, kind=DraftKind.INVOICE)
        message = str(caught.value)
        assert "403" in message
        assert "AuthorizationUnsuccessful" in message
        assert "00000000-0000-4000-8000-000000000000" in message
        assert "accounting.invoices" in message
        assert "syncd auth xero" in message
        assert await connector.find_invoice(KEY, kind=DraftKind.INVOICE) is None


async def test_a_refused_draft_is_dead_lettered_on_the_first_attempt(tmp_path: Path, db_url: str) -> None:
    """Through the engine, a draft Xero refuses becomes one dead letter on attempt 1 holding Xero's messages."""
    async with stack(tmp_path, db_url) as s:
        deal = seed_deal(s.hub)
        await s.hub.set_deal_properties(deal, {"deal_currency_code": "JPY", "dealstage": "closedwon"})
        await s.drain()
        store = s.daemon.runtime.store
        (letter,) = await store.select(DeadLetterRow)
        assert "Organisation is not subscribed to currency JPY" in letter.reason
        assert letter.connection == "xero"
        (effect,) = [row for row in await store.select(EffectRow) if row.status == "dead"]
        assert effect.attempts == 1
        assert s.xero.invoices() == []
        assert s.xero.calls["createInvoices"] == 1


# ---------------------------------------------------------------------------
# Bringing in an existing connection (refresh_token setting)
# ---------------------------------------------------------------------------


async def consented_refresh_token(r: Rig) -> str:
    """A refresh token from a consent made elsewhere (not stored by syncd)."""
    conf = settings(r.emulator, grant="authorization_code")
    answer = await r.client.get(consent_url(conf, state="elsewhere"))
    code = httpx.URL(answer.headers["location"]).params["code"]
    tokens = await exchange_code(conf, r.client, code, now=lambda: r.clock().timestamp())
    return str(tokens["refresh_token"])


def sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


async def test_a_configured_refresh_token_is_imported_once_and_rotates_in_the_store() -> None:
    """First use imports the configured token (logged without it), spends it, and stores the rotated set with its digest."""
    async with rig() as r:
        configured = await consented_refresh_token(r)
        connector = r.connect(grant="authorization_code", refresh_token=configured)
        with structlog.testing.capture_logs() as logs:
            assert await connector.find_invoice(KEY, kind=DraftKind.INVOICE) is None
        stored = dict(r.store.tokens or {})
        assert stored["refresh_token"] != configured
        assert stored["imported_sha256"] == sha256(configured)
        assert stored["access_token"]
        (imported,) = [entry for entry in logs if entry["event"] == "token_imported"]
        assert imported == {"event": "token_imported", "log_level": "info", "connection": "xero", "replaced": False}
        assert configured not in json.dumps(logs, default=str)
        assert stored["refresh_token"] not in json.dumps(logs, default=str)


async def test_a_restart_with_the_same_value_keeps_the_rotated_tokens() -> None:
    """The same configured value after rotation never overwrites the store (its token is spent at Xero)."""
    async with rig() as r:
        configured = await consented_refresh_token(r)
        await r.connect(grant="authorization_code", refresh_token=configured).find_invoice(KEY, kind=DraftKind.INVOICE)
        rotated = dict(r.store.tokens or {})
        r.clock.advance(1800)  # the access token expires: the restarted connector must refresh
        with structlog.testing.capture_logs() as logs:
            restarted = r.connect(grant="authorization_code", refresh_token=configured)
            assert await restarted.find_invoice(KEY, kind=DraftKind.INVOICE) is None
        fresh = dict(r.store.tokens or {})
        assert fresh["refresh_token"] not in (configured, rotated["refresh_token"])
        assert fresh["imported_sha256"] == sha256(configured)
        assert [entry["event"] for entry in logs if entry["event"].startswith("token_")] == ["token_refreshed"]
        refreshes = [
            req for req, _ in r.exchanges if req.url.path == "/connect/token" and b"refresh_token=" in req.content
        ]
        assert configured.encode() in refreshes[0].content
        assert rotated["refresh_token"].encode() in refreshes[1].content


async def test_a_new_configured_value_replaces_the_stored_tokens() -> None:
    """A changed configured refresh token replaces the stored set (token_imported, replaced=True)."""
    async with rig() as r:
        first = await consented_refresh_token(r)
        await r.connect(grant="authorization_code", refresh_token=first).find_invoice(KEY, kind=DraftKind.INVOICE)
        before = dict(r.store.tokens or {})
        second = await consented_refresh_token(r)
        with structlog.testing.capture_logs() as logs:
            assert (
                await r.connect(grant="authorization_code", refresh_token=second).find_invoice(
                    KEY, kind=DraftKind.INVOICE
                )
                is None
            )
        after = dict(r.store.tokens or {})
        assert after["imported_sha256"] == sha256(second)
        assert after["access_token"] != before["access_token"]
        assert [entry.get("replaced") for entry in logs if entry["event"] == "token_imported"] == [True]
        assert second not in json.dumps(logs, default=str)


async def test_the_refresh_token_setting_reads_env_and_needs_the_code_flow(tmp_path: Path) -> None:
    """refresh_token takes "env:NAME" as a secret, and is refused beside client credentials."""
    emulator = XeroEmulator()
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[connections.xero]
connector = "xero"
base_url = "https://api.xero.com/api.xro/2.0/"
client_id = "{emulator.client_id}"
client_secret = "{emulator.client_secret}"
grant = "authorization_code"
refresh_token = "env:XERO_REFRESH"
""",
        encoding="utf-8",
    )
    conn = load_config(config, environ={"XERO_REFRESH": "r3fresh-value"}).connections["xero"]
    assert isinstance(conn.settings, XeroSettings)
    assert conn.settings.refresh_token is not None
    assert conn.settings.refresh_token.get_secret_value() == "r3fresh-value"
    assert "r3fresh-value" not in repr(conn.settings)
    assert conn.settings.base_url == "https://api.xero.com"
    with pytest.raises(ValidationError, match="refresh_token is only used with grant = 'authorization_code'"):
        settings(emulator, refresh_token="x")


# ---------------------------------------------------------------------------
# Tenant discovery and base_url
# ---------------------------------------------------------------------------


async def test_the_code_flow_discovers_its_only_tenant() -> None:
    """Without tenant_id the code flow reads GET /connections once and sends that tenant on every call."""
    async with rig() as r:
        await code_flow(r)
        connector = r.connect(grant="authorization_code", tenant_id=None)
        assert await connector.find_invoice(KEY, kind=DraftKind.INVOICE) is None
        assert await connector.find_invoice("f" * 32, kind=DraftKind.INVOICE) is None
        assert r.emulator.calls["connections"] == 1
        api = [req for req, _ in r.exchanges if req.url.path.startswith(API)]
        assert {req.headers["xero-tenant-id"] for req in api} == {r.emulator.tenant_id}


async def test_several_tenants_ask_for_tenant_id_and_list_them() -> None:
    """With two connected organisations, the first call raises ConfigError listing both (name and id)."""
    connections = [
        {"tenantId": "11111111-1111-4111-8111-111111111111", "tenantName": "Acme AU", "tenantType": "ORGANISATION"},
        {"tenantId": "22222222-2222-4222-8222-222222222222", "tenantName": "Acme NZ", "tenantType": "ORGANISATION"},
    ]
    emulator = XeroEmulator(clock=FakeClock())
    mounts = {
        HOST: httpx.ASGITransport(app=emulator.app),
        "http://identity.test": httpx.MockTransport(lambda _req: httpx.Response(200, json=connections)),
    }
    conf = settings(
        emulator, grant="authorization_code", tenant_id=None, connections_url="http://identity.test/connections"
    )
    async with httpx.AsyncClient(mounts=mounts) as client:
        code = httpx.URL((await client.get(consent_url(conf, state="s"))).headers["location"]).params["code"]
        store = MemoryTokenStore([])
        await store.save(await exchange_code(conf, client, code, now=lambda: START.timestamp()))
        ctx = ConnectorContext(
            connection="books",
            client=client,
            tokens=store,
            clock=FakeClock(),
            make_http=functools.partial(VendorHttp, client, connection="books"),
        )
        with pytest.raises(ConfigError) as caught:
            await XeroConnector(conf, ctx).find_invoice(KEY, kind=DraftKind.INVOICE)
        message = str(caught.value)
        assert message.startswith("[connections.books].tenant_id: ")
        assert "'Acme AU' (11111111-1111-4111-8111-111111111111)" in message
        assert "'Acme NZ' (22222222-2222-4222-8222-222222222222)" in message
        assert "set tenant_id" in message
        assert emulator.calls["getInvoices"] == 0


@pytest.mark.parametrize(
    "given", ["http://xero.test", "http://xero.test/", "http://xero.test/api.xro/2.0", "http://xero.test/api.xro/2.0/"]
)
async def test_base_url_is_the_host_or_the_full_api_url(given: str) -> None:
    """base_url takes the host or the spec's server URL; calls go to {host}/api.xro/2.0 either way."""
    async with rig(base_url=given) as r:
        assert r.connector.settings.base_url == HOST
        assert await r.connector.find_invoice(KEY, kind=DraftKind.INVOICE) is None
        assert r.exchanges[-1][0].url.path == f"{API}/Invoices"


async def test_reconnecting_with_syncd_auth_keeps_the_new_tokens_over_a_configured_one(tmp_path: Path) -> None:
    """After `syncd auth xero`, a refresh_token still in the config is not imported over the fresh tokens (real SQLite store)."""
    xero = XeroEmulator(rate_limits=False)
    port, callback = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    key = Fernet.generate_key().decode()
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[daemon]
database_url = "sqlite:///{tmp_path / "s.db"}"
encryption_key = "{key}"

[connections.xero]
connector = "xero"
base_url = "{base}"
token_url = "{base}/connect/token"
authorize_url = "{base}/identity/connect/authorize"
connections_url = "{base}/connections"
client_id = "{xero.client_id}"
client_secret = "{xero.client_secret}"
grant = "authorization_code"
refresh_token = "env:XERO_OLD_REFRESH"
redirect_uri = "http://localhost:{callback}/callback"
""",
        encoding="utf-8",
    )
    config = load_config(path, environ={"XERO_OLD_REFRESH": "spent-long-ago"})
    out = io.StringIO()
    async with serve(xero.app, port):
        flow = asyncio.create_task(authorize(config, "xero", Console(file=out, width=400)))
        for _ in range(500):
            if "http://" in out.getvalue() or flow.done():
                break
            await asyncio.sleep(0.01)
        consent = re.search(r"(http://\S+/identity/connect/authorize\S+)", out.getvalue())
        assert consent, out.getvalue()
        async with httpx.AsyncClient(follow_redirects=True) as browser:
            assert (await browser.get(consent.group(1))).status_code == 200
        await asyncio.wait_for(flow, 30)
        assert "leave tenant_id unset" in out.getvalue()
        store = Store.open(config.daemon.database_url)
        try:
            tokens = DbTokenStore(store, "xero", key)
            stored = await tokens.load()
            assert stored is not None
            assert stored["imported_sha256"] == sha256("spent-long-ago")
            async with httpx.AsyncClient() as client:
                ctx = ConnectorContext(
                    connection="xero",
                    client=client,
                    tokens=tokens,
                    clock=lambda: datetime.now(UTC),
                    make_http=functools.partial(VendorHttp, client, connection="xero"),
                )
                connector = XeroConnector(config.connections["xero"].settings, ctx)  # type: ignore[arg-type]
                assert await connector.find_invoice(KEY, kind=DraftKind.INVOICE) is None
            assert xero.calls["token"] == 1  # the code exchange only: nothing imported, nothing refreshed
            assert xero.calls["connections"] == 2  # `syncd auth` listed them; the connector discovered its tenant
        finally:
            await store.close()


# Ledger rules: account codes, lock dates, tracking
# ---------------------------------------------------------------------------


def uncoded(**overrides: Any) -> InvoiceDraft:
    """A draft whose one line has no account code."""
    line = InvoiceLine(description="Retainer, March", quantity=Decimal(1), unit_price=Decimal("100.00"), kind="period")
    return draft(lines=(line,), **overrides)


async def test_an_approved_invoice_or_credit_note_line_without_an_account_code_is_refused() -> None:
    """Xero's ValidationException "Account code must be specified" for AUTHORISED documents; a DRAFT is taken."""
    async with rig() as r:
        contact_id = await r.connector.upsert_customer(client_record())
        for kind in (DraftKind.INVOICE, DraftKind.CREDIT_NOTE):
            with pytest.raises(XeroRejected) as caught:
                await r.connector.create_invoice(uncoded(key=f"{kind}-1", kind=kind), contact_id)
            assert caught.value.messages == ("Account code must be specified",)
        (refused,) = [response for _, response in r.exchanges if response.status_code == 400][:1]
        body = load_json(refused.content)
        assert body["Type"] == "ValidationException"
        assert body["Elements"][0]["ValidationErrors"] == [{"Message": "Account code must be specified"}]
        created = await r.connector.create_invoice(uncoded(key="draft-1", status="draft"), contact_id)
        assert created.state is InvoiceState.DRAFT
        assert r.emulator.invoices()[0]["LineItems"][0].get("AccountCode") is None


async def test_an_approving_update_of_a_draft_without_account_codes_is_refused() -> None:
    """A DRAFT saved without codes cannot be approved later without them."""
    async with rig() as r:
        contact_id = await r.connector.upsert_customer(client_record())
        created = await r.connector.create_invoice(uncoded(status="draft"), contact_id)
        approve = {"Invoices": [{"Status": "AUTHORISED"}]}
        with pytest.raises(XeroRejected, match="Account code must be specified"):
            await r.connector._write("POST", f"/Invoices/{created.invoice_id}", approve, key="approve-1")
        assert r.emulator.invoices()[0]["Status"] == "DRAFT"


async def test_lock_dates_are_read_and_documents_dated_on_or_before_them_are_refused() -> None:
    """PeriodLockDate/EndOfYearLockDate come from GET /Organisation; an approved invoice on the lock date is refused."""
    async with rig() as r:
        assert (await r.connector.lock_dates()).closed_until() is None
        r.emulator.set_lock_dates(period=date(2025, 2, 28), end_of_year=date(2024, 6, 30))
        locks = await r.connector.lock_dates()
        assert (locks.period_lock, locks.end_of_year_lock) == (date(2025, 2, 28), date(2024, 6, 30))
        assert locks.closed_until() == date(2025, 2, 28)
        contact_id = await r.connector.upsert_customer(client_record())
        with pytest.raises(XeroRejected) as caught:
            await r.connector.create_invoice(draft(key="locked-1", issue_date=date(2025, 2, 28)), contact_id)
        assert caught.value.messages == (
            "The document date cannot be before the period lock date, currently set at 28-Feb-2025",
        )
        opened = await r.connector.create_invoice(draft(key="open-1", issue_date=date(2025, 3, 1)), contact_id)
        assert opened.state is InvoiceState.AUTHORISED
        kept = await r.connector.create_invoice(
            draft(key="draft-2", issue_date=date(2025, 2, 1), status="draft"), contact_id
        )
        assert kept.state is InvoiceState.DRAFT


async def test_tracking_options_must_exist_at_xero() -> None:
    """A line's Tracking {Name, Option} is sent and kept; an unknown option is refused."""
    async with rig() as r:
        contact_id = await r.connector.upsert_customer(client_record())
        line = InvoiceLine(
            description="Work",
            quantity=Decimal(1),
            unit_price=Decimal(10),
            account_code="200",
            tracking=(TrackingOption(name="Region", option="North"),),
        )
        await r.connector.create_invoice(draft(key="tracked-1", lines=(line,)), contact_id)
        assert r.emulator.invoices()[0]["LineItems"][0]["Tracking"] == [{"Name": "Region", "Option": "North"}]
        wrong = line.model_copy(update={"tracking": (TrackingOption(name="Region", option="East"),)})
        with pytest.raises(XeroRejected, match="Tracking option 'East' does not exist in category 'Region'"):
            await r.connector.create_invoice(draft(key="tracked-2", lines=(wrong,)), contact_id)


# ---------------------------------------------------------------------------
# Credit notes: reading, polling and allocation
# ---------------------------------------------------------------------------


async def invoice_and_credit(r: Rig, credit: str = "50.00") -> tuple[str, str]:
    """An approved invoice of 100.00 AUD (+ GST) and an approved credit note for ``credit`` (+ GST)."""
    contact_id = await r.connector.upsert_customer(client_record())
    line = InvoiceLine(description="Work", quantity=Decimal(1), unit_price=Decimal("100.00"), account_code="200")
    invoice = await r.connector.create_invoice(draft(key="inv-1", lines=(line,)), contact_id)
    credit_line = line.model_copy(update={"unit_price": Decimal(credit), "kind": "credit"})
    note = await r.connector.create_invoice(
        draft(key="cn-1", kind=DraftKind.CREDIT_NOTE, lines=(credit_line,)), contact_id
    )
    return invoice.invoice_id, note.invoice_id


async def test_a_credit_note_is_allocated_to_an_invoice_once_per_key() -> None:
    """PUT /CreditNotes/{id}/Allocations lowers RemainingCredit and AmountDue; the same key applies it once."""
    async with rig() as r:
        assert isinstance(r.connector, AllocatesCredit)
        assert isinstance(r.connector, ReadsCreditNotes)
        assert isinstance(r.connector, HasLockDates)
        invoice_id, note_id = await invoice_and_credit(r)
        before = await r.connector.get_credit_note(note_id)
        assert (before.total, before.remaining_credit, before.state) == (
            Decimal("55.00"),
            Decimal("55.00"),
            InvoiceState.AUTHORISED,
        )
        done = await r.connector.allocate_credit_note(note_id, invoice_id, Decimal("30.00"), "alloc-1")
        assert (done.remaining_credit, done.invoice_amount_due) == (Decimal("25.00"), Decimal("80.00"))
        again = await r.connector.allocate_credit_note(note_id, invoice_id, Decimal("30.00"), "alloc-1")
        assert (again.remaining_credit, again.invoice_amount_due) == (Decimal("25.00"), Decimal("80.00"))
        assert r.emulator.calls["createCreditNoteAllocation"] == 2
        assert len(r.emulator.credit_notes()[0]["Allocations"]) == 1
        rest = await r.connector.allocate_credit_note(note_id, invoice_id, Decimal("25.00"), "alloc-2")
        assert rest.remaining_credit == 0
        assert (await r.connector.get_credit_note(note_id)).state is InvoiceState.PAID
        assert (await r.connector.get_invoice(invoice_id)).amount_due == Decimal("55.00")


async def test_an_allocation_beyond_the_credit_or_the_amount_due_or_across_contacts_is_refused() -> None:
    """More than the credit left, more than the invoice's amount due, or another contact: Xero's 400."""
    async with rig() as r:
        invoice_id, note_id = await invoice_and_credit(r, credit="200.00")
        with pytest.raises(XeroRejected) as caught:
            await r.connector.allocate_credit_note(note_id, invoice_id, Decimal("111.00"), "too-much")
        assert caught.value.messages == (
            "Credit Note cannot be allocated as amount is greater than amount outstanding",
        )
        other = await r.connector.upsert_customer(client_record(key="hubspot:company:43", name="Other Co"))
        line = InvoiceLine(description="Other", quantity=Decimal(1), unit_price=Decimal(10), account_code="200")
        foreign = await r.connector.create_invoice(draft(key="inv-other", lines=(line,)), other)
        with pytest.raises(XeroRejected, match="same contact"):
            await r.connector.allocate_credit_note(note_id, foreign.invoice_id, Decimal("1.00"), "other")
        assert (await r.connector.get_credit_note(note_id)).remaining_credit == Decimal("220.00")


async def test_an_allocation_at_the_emulator_sends_creditnote_and_invoice_webhooks() -> None:
    """The emulator's allocate() delivers signed CREDITNOTE and INVOICE UPDATE events, which the verifier reads."""
    async with rig() as r:
        invoice_id, note_id = await invoice_and_credit(r)
        seen: list[httpx.Request] = []

        async def receive(request: Request) -> Response:
            seen.append(httpx.Request("POST", str(request.url), headers=request.headers, content=await request.body()))
            return Response(status_code=200)

        app = Starlette(routes=[Route("/hook", receive, methods=["POST"])])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as hooks:
            r.emulator.subscribe("http://syncd.test/hook", hooks)
            await r.emulator.allocate(note_id, invoice_id, Decimal("10.00"))
        verifier = XeroWebhookVerifier(key=r.emulator.webhook_key, connection="xero", tenant_id=None, clock=r.clock)
        hints = [
            hint
            for request in seen
            for hint in verifier.verify(
                WebhookRequest(
                    method="POST",
                    url=str(request.url),
                    headers={k.lower(): v for k, v in request.headers.items()},
                    body=request.content,
                    received_at=r.clock(),
                )
            )
        ]
        assert [(hint.object_type, hint.object_id) for hint in hints] == [
            ("credit_note", note_id),
            ("invoice", invoice_id),
        ]


async def test_poll_changes_reports_credit_notes_too() -> None:
    """A credit note changed since the cursor is a hint with object_type credit_note."""
    async with rig() as r:
        start = await r.connector.poll_changes(None)
        r.clock.advance(60)
        invoice_id, note_id = await invoice_and_credit(r)
        page = await r.connector.poll_changes(start.cursor)
        assert {(hint.object_type, hint.object_id) for hint in page.hints} == {
            ("invoice", invoice_id),
            ("credit_note", note_id),
        }
