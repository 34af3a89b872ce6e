"""Each connector's whole call set against its strict emulator, and proof the emulators are strict.

A connector that pleases only its own emulator is the risk: the vendors cannot be reached
from here. So each emulator is given its vendor's published contract (HubSpot: the request
models of the official ``hubspot-api-client``; Xero: ``specs/xero/xero_accounting.yaml``;
Harvest: the community ``specs/harvest/harvest-openapi.yaml``, patched in memory as
``tests/connectors/test_harvest_spec.py`` does), every public method of each connector that
makes HTTP calls runs against it, and no request may be refused. Then the meta-test takes
real requests the connectors sent, breaks them (a required field removed, an enum or a
type made bogus) and replays them: each is refused with that vendor's error body.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from openapi_core import OpenAPI
from openapi_core.configurations import Config

from connectors.emulation import OpenApiContract
from connectors.harvest.connector import SPEC as HARVEST
from connectors.harvest.connector import HarvestSettings
from connectors.harvest.emulator import HarvestEmulator
from connectors.hubspot.connector import HubSpotSettings
from connectors.hubspot.connector import create as create_hubspot
from connectors.hubspot.emulator import HubSpotEmulator, SdkContract
from connectors.xero.connector import XeroConnector, XeroSettings
from connectors.xero.emulator import API, XeroEmulator
from connectors.xero.models import dump_json, load_json
from syncd.core.interfaces import (
    Address,
    Client,
    CompanyBillingStatus,
    Contact,
    DealBillingStatus,
    DraftKind,
    FollowUpTask,
    InvoiceDraft,
    InvoiceLine,
)
from syncd.plumbing.http import VendorHttp
from syncd.plumbing.registry import ConnectorContext
from tests.connectors.test_harvest_spec import patch_spec

REPO = Path(__file__).resolve().parents[2]
HARVEST_SPEC_FILE = REPO / "specs" / "harvest" / "harvest-openapi.yaml"
START = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
VENDORS = ("hubspot", "xero", "harvest")

Exchange = tuple[httpx.Request, httpx.Response]
Emulator = HubSpotEmulator | XeroEmulator | HarvestEmulator


class Recording(httpx.AsyncBaseTransport):
    """Passes requests to an emulator and keeps each with its (read) answer."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.exchanges: list[Exchange] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        answer = await self.inner.handle_async_request(request)
        content = await answer.aread()
        self.exchanges.append((request, httpx.Response(answer.status_code, headers=answer.headers, content=content)))
        return httpx.Response(answer.status_code, headers=answer.headers, content=content, request=request)


class Tokens:
    """A token store that keeps one token set in memory."""

    def __init__(self) -> None:
        self.tokens: dict[str, Any] | None = None
        self._lock = asyncio.Lock()

    async def load(self) -> dict[str, Any] | None:
        return self.tokens

    async def save(self, tokens: dict[str, Any]) -> None:
        self.tokens = dict(tokens)

    def locked(self) -> asyncio.Lock:
        return self._lock


@dataclass(frozen=True, kw_only=True)
class Run:
    """One vendor's call set: the emulator as it was left, and every exchange in order."""

    emulator: Emulator
    exchanges: list[Exchange]


def context(client: httpx.AsyncClient, clock: list[datetime], connection: str) -> ConnectorContext:
    async def sleep(seconds: float) -> None:
        clock[0] += timedelta(seconds=seconds)

    return ConnectorContext(
        connection=connection,
        client=client,
        tokens=Tokens(),
        clock=lambda: clock[0],
        make_http=functools.partial(VendorHttp, client, connection=connection, sleep=sleep),
    )


# ---------------------------------------------------------------------------- the call sets


async def hubspot_calls() -> Run:
    """fetch_deal, fetch_deals, iter_deals, poll_changes, write_billing_status, write_billing_statuses,
    ensure_properties, properties, check, ensure_company_properties, write_company_status, record_owner,
    create_task, find_task, close_task."""
    clock = [START]
    emulator = HubSpotEmulator(rate_limits=False, clock=lambda: clock[0], contract=SdkContract())
    owner = emulator.add_owner("ann@seller.test")
    acme = emulator.add_company({"name": "Acme Ltd", "city": "Leeds", "hubspot_owner_id": owner})
    ann = emulator.add_contact({"firstname": "Ann", "email": "ann@acme.test"}, company_id=acme)
    deal = emulator.add_deal(
        {"dealname": "Website", "amount": "1500", "deal_currency_code": "GBP", "po_number": "PO-7"},
        company_id=acme,
        contact_ids=[ann],
        line_items=[{"name": "Design", "quantity": "2", "price": "500"}],
    )
    emulator.label_contact(deal, ann, "Billing contact")
    recording = Recording(httpx.ASGITransport(app=emulator.app))
    async with httpx.AsyncClient(transport=recording) as client:
        settings = HubSpotSettings.model_validate(
            {
                "connector": "hubspot",
                "base_url": "http://hubspot.test",
                "token": emulator.token,
                "webhook_secret": "emulator-secret",
                "rate_limit_per_10s": None,
                "search_rate_per_s": None,
                "poll_lag_s": 0,
            }
        )
        connector = create_hubspot(settings, context(client, clock, "hubspot"))
        await connector.ensure_properties()
        await connector.ensure_properties()
        clock[0] += timedelta(minutes=1)
        first = await connector.poll_changes(None, since=START - timedelta(hours=1))
        assert {hint.object_id for hint in first.hints} == {deal}
        record = await connector.fetch_deal(deal, {"deal": ["po_number"], "company": ["city"]})
        assert record.data["company"]["id"] == acme
        batch = await connector.fetch_deals([deal], {"deal": ["po_number"], "company": ["city"]})
        assert batch == {deal: record}
        assert [item.object_id async for item in connector.iter_deals()] == [deal]
        status = DealBillingStatus(
            invoice_number="INV-0001",
            state="authorised",
            amount_due=Decimal("1650.00"),
            currency="GBP",
            due_date=date(2025, 3, 31),
        )
        await connector.write_billing_status(deal, status)
        assert await connector.write_billing_statuses({deal: status}) == {deal: None}
        clock[0] += timedelta(minutes=1)
        await connector.poll_changes(first.cursor)
        assert "syncd_invoice_status" in await connector.properties("deal")
        assert await connector.check() == []
        await connector.ensure_company_properties()
        await connector.ensure_company_properties()
        receivables = CompanyBillingStatus(
            currency="GBP",
            outstanding_balance=Decimal("1650.00"),
            overdue_balance=Decimal("1650.00"),
            oldest_overdue_days=3,
            aging_1_30=Decimal("1650.00"),
            last_payment_date=date(2025, 2, 28),
            at_risk=True,
            at_risk_reason="GBP: overdue 1650.00, above 1000",
            other_currencies="EUR outstanding 10.00",
        )
        await connector.write_company_status(acme, receivables)
        assert await connector.record_owner("company", acme) == owner
        assert await connector.record_owner("deal", deal) is None
        task = FollowUpTask(
            key="task:k:1",
            subject="Collect INV-0001 (Acme Ltd): 3 days overdue",
            body="INV-0001: 1650.00 GBP due",
            due_at=START,
            owner_id=owner,
            deal_id=deal,
            company_id=acme,
        )
        task_id = await connector.create_task(task)
        assert await connector.find_task(task) == task_id
        await connector.close_task(task_id, "paid", complete=True)
    return Run(emulator=emulator, exchanges=recording.exchanges)


async def xero_calls(spec: OpenAPI) -> Run:
    """upsert_customer (adopt, create), customer_details, update_customer, create_invoice (invoice,
    credit note), send_invoice, find_invoice, get_invoice, get_credit_note, allocate_credit_note,
    void_invoice, lock_dates, codes, poll_changes, check."""
    clock = [START]
    contract = OpenApiContract(spec, host_url="https://api.xero.com")
    emulator = XeroEmulator(clock=lambda: clock[0], rate_limits=False, contract=contract)
    recording = Recording(httpx.ASGITransport(app=emulator.app))
    async with httpx.AsyncClient(transport=recording) as client:
        settings = XeroSettings(
            connector="xero",
            base_url="http://xero.test",
            token_url="http://xero.test/connect/token",
            client_id=emulator.client_id,
            client_secret=emulator.client_secret,
            tenant_id=emulator.tenant_id,
            rate_limit_per_min=None,
            max_concurrent=None,
        )
        connector = XeroConnector(settings, context(client, clock, "xero"))
        start = await connector.poll_changes(None)
        emulator.seed_contact("Contoso Pty Ltd")
        adopted = await connector.upsert_customer(xero_client("hubspot:company:1", "Contoso Pty Ltd"))
        northwind = xero_client("hubspot:company:2", "Northwind Traders LLC")
        contact_id = await connector.upsert_customer(northwind)
        assert adopted != contact_id
        assert (await connector.customer_details(contact_id))["legal_name"] == "Northwind Traders LLC"
        await connector.update_customer(contact_id, northwind, "update-1")
        clock[0] += timedelta(seconds=30)
        invoice = await connector.create_invoice(xero_draft("a" * 32, DraftKind.INVOICE, send=True), contact_id)
        note = await connector.create_invoice(xero_draft("b" * 32, DraftKind.CREDIT_NOTE), contact_id)
        other = await connector.create_invoice(xero_draft("c" * 32, DraftKind.INVOICE), contact_id)
        assert emulator.emails == [invoice.invoice_id]
        assert await connector.find_invoice("a" * 32, kind=DraftKind.INVOICE) is not None
        assert await connector.find_invoice("b" * 32, kind=DraftKind.CREDIT_NOTE) is not None
        assert (await connector.get_invoice(invoice.invoice_id)).invoice_id == invoice.invoice_id
        assert (await connector.get_invoice(note.invoice_id)).invoice_id == note.invoice_id
        assert (await connector.get_credit_note(note.invoice_id)).remaining_credit > 0
        allocation = await connector.allocate_credit_note(note.invoice_id, invoice.invoice_id, Decimal("10.00"), "k1")
        assert allocation.amount == Decimal("10.00")
        assert (await connector.void_invoice(other.invoice_id, "c" * 32)).invoice_id == other.invoice_id
        await connector.lock_dates()
        assert "200" in (await connector.codes())["account_code"]
        clock[0] += timedelta(seconds=30)
        page = await connector.poll_changes(start.cursor)
        assert invoice.invoice_id in {hint.object_id for hint in page.hints}
        assert await connector.check() == []
    return Run(emulator=emulator, exchanges=recording.exchanges)


async def harvest_calls(spec: OpenAPI) -> Run:
    """check, time_entries, time_entry, poll_changes, projects, task and user assignments (the rate
    cards), clients, users, tasks; two per page, so every list pages."""
    clock = [START]
    contract = OpenApiContract(spec, host_url="https://api.harvestapp.com")
    emulator = HarvestEmulator(clock=lambda: clock[0], rate_limits=False, contract=contract)
    acme = emulator.add_client("Acme Ltd", currency="EUR")
    dana = emulator.add_user("Dana", "Smith", default_hourly_rate=Decimal("95.00"))
    design = emulator.add_task("Design", default_hourly_rate=Decimal("120.00"))
    meetings = emulator.add_task("Meetings", billable_by_default=False)
    for name, bill_by in (("Website", "Project"), ("Audit", "Tasks"), ("Retainer", "People")):
        project = emulator.add_project(acme, name, hourly_rate=Decimal("112.35"), bill_by=bill_by)
        emulator.assign_task(project, design)
        emulator.assign_task(project, meetings, billable=False)
        emulator.assign_user(project, dana)
        for day in (1, 2):
            emulator.log_time(
                project_id=project, task_id=design, user_id=dana, spent_date=date(2025, 3, day), hours=Decimal("1.5")
            )
    recording = Recording(httpx.ASGITransport(app=emulator.app))
    async with httpx.AsyncClient(transport=recording) as client:
        values = {
            "connector": "harvest",
            "base_url": "https://api.harvestapp.com/v2",
            "token": emulator.token,
            "account_id": emulator.account_id,
            "user_agent": "syncd strict tests (ops@example.com)",
            "per_page": 2,
        }
        connector = HARVEST.factory(HarvestSettings.model_validate(values), context(client, clock, "harvest"))
        assert await connector.check() == []
        entries = [entry async for entry in connector.time_entries(None)]
        assert len(entries) == 6
        await connector.time_entry(str(entries[0].id))
        cursor = (await connector.poll_changes(None)).cursor
        projects = [project async for project in connector.projects(is_active=True)]
        assert len(projects) == 3
        assert len([project async for project in connector.projects()]) == 3
        for project in projects:
            assert len([a async for a in connector.task_assignments(str(project.id))]) == 2
            assert len([a async for a in connector.user_assignments(str(project.id))]) == 1
        assert len([c async for c in connector.clients()]) == 1
        assert len([u async for u in connector.users()]) == 2
        assert len([t async for t in connector.tasks()]) == 2
        clock[0] += timedelta(minutes=10)
        emulator.update_time_entry(int(entries[0].id), hours=Decimal("2.25"))
        assert len((await connector.poll_changes(cursor)).hints) == 1
        assert len([e async for e in connector.time_entries(START + timedelta(minutes=5))]) == 1
    return Run(emulator=emulator, exchanges=recording.exchanges)


def xero_client(key: str, name: str) -> Client:
    return Client(
        key=key,
        legal_name=name,
        billing_contact=Contact(first_name="Dana", last_name="Reyes", email="ap@example.com"),
        address=Address(line1="1 Harbour St", city="Sydney", postal_code="2000", country="Australia"),
        tax_id="51 824 753 556",
        currency="AUD",
    )


def xero_draft(key: str, kind: DraftKind, *, send: bool = False) -> InvoiceDraft:
    return InvoiceDraft(
        key=key,
        kind=kind,
        client=xero_client("hubspot:company:2", "Northwind Traders LLC"),
        engagement_key="hubspot:deal:1",
        currency="AUD",
        issue_date=date(2025, 3, 3),
        due_date=date(2025, 3, 31),
        reference="PO-1",
        lines=(InvoiceLine(description="Work", quantity=Decimal(2), unit_price=Decimal("99.995"), account_code="200"),),
        send=send,
    )


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def harvest_spec() -> OpenAPI:
    """``specs/harvest/harvest-openapi.yaml``, patched as ``test_harvest_spec.py`` patches it."""
    if not HARVEST_SPEC_FILE.exists():
        pytest.fail(f"the Harvest OpenAPI file is not at {HARVEST_SPEC_FILE}; it is tracked in the repository")
    with HARVEST_SPEC_FILE.open("rb") as handle:
        raw = yaml.load(handle, Loader=yaml.CSafeLoader)
    return OpenAPI.from_dict(patch_spec(raw), config=Config(spec_validator_cls=None))


@pytest.fixture(scope="module")
def runs(xero_spec: OpenAPI, harvest_spec: OpenAPI) -> dict[str, Run]:
    """Each vendor's call set, run once for the module."""
    return {
        "hubspot": asyncio.run(hubspot_calls()),
        "xero": asyncio.run(xero_calls(xero_spec)),
        "harvest": asyncio.run(harvest_calls(harvest_spec)),
    }


# The refusals a call set gets by design: ensure_(company_)properties reads the syncd group before
# creating it, and get_invoice tries a credit note's id at /Invoices first.
EXPECTED_REFUSALS: dict[str, list[tuple[str, str, int]]] = {
    "hubspot": [
        ("GET", "/crm/v3/properties/deals/groups/syncd", 404),
        ("GET", "/crm/v3/properties/companies/groups/syncd", 404),
    ],
    "xero": [("GET", f"{API}/Invoices/{{id}}", 404)],
    "harvest": [],
}
# The operations each call set must reach (so a connector method that stops calling is noticed).
OPERATIONS: dict[str, set[tuple[str, str]]] = {
    "hubspot": {
        ("GET", "/crm/v3/objects/deals/{id}"),
        ("GET", "/crm/v3/objects/deals"),
        ("GET", "/crm/v3/objects/companies/{id}"),
        ("GET", "/crm/v4/objects/deals/{id}/associations/companies"),
        ("GET", "/crm/v4/objects/deals/{id}/associations/contacts"),
        ("POST", "/crm/v3/objects/contacts/batch/read"),
        ("POST", "/crm/v3/objects/line_items/batch/read"),
        ("POST", "/crm/v3/objects/deals/batch/read"),
        ("POST", "/crm/v3/objects/companies/batch/read"),
        ("POST", "/crm/v4/associations/deals/companies/batch/read"),
        ("POST", "/crm/v4/associations/deals/contacts/batch/read"),
        ("POST", "/crm/v4/associations/deals/line_items/batch/read"),
        ("POST", "/crm/v3/objects/deals/batch/update"),
        ("POST", "/crm/v3/objects/deals/search"),
        ("PATCH", "/crm/v3/objects/deals/{id}"),
        ("GET", "/crm/v3/properties/deals/groups/syncd"),
        ("POST", "/crm/v3/properties/deals/groups"),
        ("GET", "/crm/v3/properties/deals"),
        ("POST", "/crm/v3/properties/deals"),
        ("GET", "/crm/v3/properties/companies/groups/syncd"),
        ("POST", "/crm/v3/properties/companies/groups"),
        ("GET", "/crm/v3/properties/companies"),
        ("POST", "/crm/v3/properties/companies"),
        ("PATCH", "/crm/v3/objects/companies/{id}"),
        ("POST", "/crm/v3/objects/tasks"),
        ("POST", "/crm/v3/objects/tasks/search"),
        ("PATCH", "/crm/v3/objects/tasks/{id}"),
    },
    "xero": {
        ("GET", f"{API}/Contacts"),
        ("PUT", f"{API}/Contacts"),
        ("GET", f"{API}/Contacts/{{id}}"),
        ("POST", f"{API}/Contacts/{{id}}"),
        ("PUT", f"{API}/Invoices"),
        ("PUT", f"{API}/CreditNotes"),
        ("POST", f"{API}/Invoices/{{id}}/Email"),
        ("POST", f"{API}/Invoices/{{id}}"),
        ("GET", f"{API}/Invoices"),
        ("GET", f"{API}/Invoices/{{id}}"),
        ("GET", f"{API}/CreditNotes"),
        ("GET", f"{API}/CreditNotes/{{id}}"),
        ("PUT", f"{API}/CreditNotes/{{id}}/Allocations"),
        ("GET", f"{API}/Organisation"),
        ("GET", f"{API}/Accounts"),
        ("GET", f"{API}/TaxRates"),
        ("GET", f"{API}/Currencies"),
        ("GET", f"{API}/TrackingCategories"),
    },
    "harvest": {
        ("GET", "/v2/users/me"),
        ("GET", "/v2/time_entries"),
        ("GET", "/v2/time_entries/{id}"),
        ("GET", "/v2/projects"),
        ("GET", "/v2/projects/{id}/task_assignments"),
        ("GET", "/v2/projects/{id}/user_assignments"),
        ("GET", "/v2/clients"),
        ("GET", "/v2/users"),
        ("GET", "/v2/tasks"),
    },
}


def template(path: str) -> str:
    """A path with its ids (numbers, GUIDs) as ``{id}``."""
    return "/".join("{id}" if part.isdigit() or _is_guid(part) else part for part in path.split("/"))


def _is_guid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def api_exchanges(run: Run) -> list[Exchange]:
    """The exchanges with the vendor's API (not its token endpoint)."""
    return [(request, answer) for request, answer in run.exchanges if "/connect/token" not in request.url.path]


# ---------------------------------------------------------------------------- the call sets keep the contract


@pytest.mark.parametrize("vendor", VENDORS)
def test_every_connector_call_keeps_the_vendors_contract(vendor: str, runs: dict[str, Run]) -> None:
    """Every request of the connector's whole call set is checked against the contract and none is refused."""
    run = runs[vendor]
    exchanges = api_exchanges(run)

    refused = [
        (request.method, template(request.url.path), answer.status_code)
        for request, answer in exchanges
        if answer.status_code >= 400
    ]

    assert run.emulator.contract.breaches == []
    assert refused == EXPECTED_REFUSALS[vendor]
    assert run.emulator.contract.checked == len(exchanges)
    assert OPERATIONS[vendor] <= {(request.method, template(request.url.path)) for request, _ in exchanges}


def test_every_xero_request_asks_for_json(runs: dict[str, Run]) -> None:
    """The Xero connector sends Accept: application/json on every call; without it the emulator answers 406."""
    exchanges = api_exchanges(runs["xero"])
    assert all(request.headers.get("accept") == "application/json" for request, _ in exchanges)
    request, _ = next((req, res) for req, res in exchanges if req.url.path == f"{API}/Organisation")
    headers = {name: value for name, value in request.headers.items() if name.lower() != "accept"}

    answer = asyncio.run(replay(runs["xero"].emulator, httpx.Request("GET", request.url, headers=headers)))

    assert answer.status_code == 406
    assert answer.json()["Type"] == "NotAcceptable"


# ---------------------------------------------------------------------------- the meta-test


@dataclass(frozen=True, kw_only=True)
class Breakage:
    """One way to break a real request: which one, how, and the field the refusal must name."""

    vendor: str
    what: str
    picks: Callable[[httpx.Request], bool]
    breaks: Callable[[httpx.Request], httpx.Request]
    names: str


def _with_body(request: httpx.Request, change: Callable[[Any], None]) -> httpx.Request:
    body = load_json(request.content)
    change(body)
    headers = {name: value for name, value in request.headers.items() if name.lower() != "content-length"}
    return httpx.Request(request.method, request.url, headers=headers, content=dump_json(body))


def _with_query(request: httpx.Request, **params: str) -> httpx.Request:
    return httpx.Request(request.method, request.url.copy_merge_params(params), headers=request.headers)


def _is(method: str, ending: str) -> Callable[[httpx.Request], bool]:
    return lambda request: request.method == method and template(request.url.path).endswith(ending)


def _set(path: list[str | int], value: Any) -> Callable[[Any], None]:
    def change(body: Any) -> None:
        for part in path[:-1]:
            body = body[part]
        body[path[-1]] = value

    return change


def _drop(path: list[str | int]) -> Callable[[Any], None]:
    def change(body: Any) -> None:
        for part in path[:-1]:
            body = body[part]
        del body[path[-1]]

    return change


BREAKAGES = (
    Breakage(
        vendor="hubspot",
        what="a batch read without its required inputs",
        picks=_is("POST", "/line_items/batch/read"),
        breaks=lambda r: _with_body(r, _drop(["inputs"])),
        names="inputs",
    ),
    Breakage(
        vendor="hubspot",
        what="a search whose filter operator is not one of HubSpot's",
        picks=_is("POST", "/deals/search"),
        breaks=lambda r: _with_body(r, _set(["filterGroups", 0, "filters", 0, "operator"], "AFTER")),
        names="operator",
    ),
    Breakage(
        vendor="hubspot",
        what="a property whose fieldType is not one of HubSpot's",
        picks=_is("POST", "/crm/v3/properties/deals"),
        breaks=lambda r: _with_body(r, _set(["fieldType"], "dropdown")),
        names="field_type",
    ),
    Breakage(
        vendor="hubspot",
        what="a billing-status write with a number where HubSpot takes strings",
        picks=_is("PATCH", "/deals/{id}"),
        breaks=lambda r: _with_body(r, _set(["properties", "syncd_days_overdue"], 3)),
        names="syncd_days_overdue",
    ),
    Breakage(
        vendor="hubspot",
        what="a company's receivables with a number where HubSpot takes strings",
        picks=_is("PATCH", "/companies/{id}"),
        breaks=lambda r: _with_body(r, _set(["properties", "syncd_overdue_balance"], 1650)),
        names="syncd_overdue_balance",
    ),
    Breakage(
        vendor="hubspot",
        what="a task whose association type id is text",
        picks=_is("POST", "/crm/v3/objects/tasks"),
        breaks=lambda r: _with_body(r, _set(["associations", 0, "types", 0, "associationTypeId"], "216")),
        names="associationTypeId",
    ),
    Breakage(
        vendor="hubspot",
        what="a task association without its required target",
        picks=_is("POST", "/crm/v3/objects/tasks"),
        breaks=lambda r: _with_body(r, _drop(["associations", 0, "to"])),
        names="to",
    ),
    Breakage(
        vendor="xero",
        what="an allocation without its required Amount",
        picks=_is("PUT", "/Allocations"),
        breaks=lambda r: _with_body(r, _drop(["Allocations", 0, "Amount"])),
        names="Amount",
    ),
    Breakage(
        vendor="xero",
        what="an invoice whose Status is not one of Xero's",
        picks=_is("PUT", f"{API}/Invoices"),
        breaks=lambda r: _with_body(r, _set(["Invoices", 0, "Status"], "APPROVED")),
        names="APPROVED",
    ),
    Breakage(
        vendor="xero",
        what="a credit note whose LineAmountTypes is not one of Xero's",
        picks=_is("PUT", f"{API}/CreditNotes"),
        breaks=lambda r: _with_body(r, _set(["CreditNotes", 0, "LineAmountTypes"], "GrossOfTax")),
        names="GrossOfTax",
    ),
    Breakage(
        vendor="harvest",
        what="a project list whose is_active is not a boolean",
        picks=lambda r: r.method == "GET" and r.url.path == "/v2/projects" and "is_active" in r.url.params,
        breaks=lambda r: _with_query(r, is_active="sometimes"),
        names="is_active",
    ),
    Breakage(
        vendor="harvest",
        what="a time entry list whose per_page is not an integer",
        picks=lambda r: r.method == "GET" and r.url.path == "/v2/time_entries",
        breaks=lambda r: _with_query(r, per_page="all"),
        names="per_page",
    ),
)


async def replay(emulator: Emulator, request: httpx.Request) -> httpx.Response:
    """Send ``request`` to the emulator again (auth headers as the connector sent them)."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=emulator.app)) as client:
        return await client.send(request)


def assert_vendor_error_body(vendor: str, answer: httpx.Response) -> str:
    """The answer is the vendor's validation error; returns its text, where the problem is named."""
    body = answer.json()
    if vendor == "hubspot":
        assert answer.status_code == 400
        assert body["status"] == "error"
        assert body["category"] == "VALIDATION_ERROR"
        uuid.UUID(body["correlationId"])
        return str(body["message"])
    if vendor == "xero":
        assert answer.status_code == 400
        assert (body["ErrorNumber"], body["Type"]) == (10, "ValidationException")
        assert body["Message"] == "A validation exception occurred"
        return " ".join(error["Message"] for element in body["Elements"] for error in element["ValidationErrors"])
    assert answer.status_code == 422
    assert set(body) == {"code", "message"}
    assert body["code"] == 422
    return str(body["message"])


@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda b: f"{b.vendor}: {b.what}")
def test_a_broken_real_request_is_refused_with_the_vendors_error_body(breakage: Breakage, runs: dict[str, Run]) -> None:
    """A request the connector really sent, broken one way, is refused with the vendor's error body."""
    run = runs[breakage.vendor]
    original, answered = next((req, res) for req, res in run.exchanges if breakage.picks(req))
    assert answered.status_code < 400
    before = len(run.emulator.contract.breaches)

    answer = asyncio.run(replay(run.emulator, breakage.breaks(original)))

    message = assert_vendor_error_body(breakage.vendor, answer)
    assert breakage.names in message
    assert len(run.emulator.contract.breaches) == before + 1
    assert breakage.names in " ".join(run.emulator.contract.breaches[-1].problems)
    del run.emulator.contract.breaches[-1]  # the module's runs stay free of breaches for the other tests


def test_every_vendor_has_a_breakage() -> None:
    """The meta-test covers all three vendors."""
    assert {breakage.vendor for breakage in BREAKAGES} == set(VENDORS)


@pytest.mark.parametrize(
    ("name", "error"),
    [("syncd_invoice_statuss", "PROPERTY_DOESNT_EXIST"), ("hs_lastmodifieddate", "READ_ONLY_VALUE")],
)
def test_a_real_write_naming_an_unknown_or_read_only_property_is_refused(
    name: str, error: str, runs: dict[str, Run]
) -> None:
    """HubSpot's property checks on writes: the connector's PATCH with one more property is refused 400."""
    run = runs["hubspot"]
    original = next(req for req, _ in run.exchanges if _is("PATCH", "/deals/{id}")(req))
    broken = _with_body(original, _set(["properties", name], "x"))

    answer = asyncio.run(replay(run.emulator, broken))

    message = assert_vendor_error_body("hubspot", answer)
    assert f'"error": "{error}"' in message
    assert f'"name": "{name}"' in message


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (_set(["properties", "hs_task_status"], "DONE"), "INVALID_OPTION"),
        (_set(["properties", "hubspot_owner_id"], "424242"), "INVALID_OPTION"),
        (_drop(["properties", "hs_timestamp"]), "Missing required properties: hs_timestamp"),
    ],
    ids=["unknown status", "unknown owner", "no hs_timestamp"],
)
def test_a_real_task_with_a_value_hubspot_refuses_is_refused(
    change: Callable[[Any], None], error: str, runs: dict[str, Run]
) -> None:
    """The connector's task create with a bogus status or owner, or without its due time, is refused 400."""
    run = runs["hubspot"]
    original = next(req for req, _ in run.exchanges if _is("POST", "/crm/v3/objects/tasks")(req))
    tasks_before = len(run.emulator.tasks())

    answer = asyncio.run(replay(run.emulator, _with_body(original, change)))

    assert error in assert_vendor_error_body("hubspot", answer)
    assert len(run.emulator.tasks()) == tasks_before


def test_a_task_is_stored_with_its_owner_associations_and_completed_status(runs: dict[str, Run]) -> None:
    """The emulator keeps what the connector sent: associated with the deal and company, then completed."""
    run = runs["hubspot"]
    assert isinstance(run.emulator, HubSpotEmulator)
    (task,) = run.emulator.tasks()
    assert task["properties"]["hs_task_status"] == "COMPLETED"
    assert task["properties"]["hs_task_body"] == "paid"
    assert task["properties"]["hubspot_owner_id"]
    assert len(task["associations"]["deals"]) == 1
    assert len(task["associations"]["companies"]) == 1


# ---------------------------------------------------------------------------- Xero batches


async def xero_batch(
    emulator: XeroEmulator, collection: str, elements: list[dict[str, Any]], **params: str
) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=emulator.app)) as client:
        token = await client.post(
            "http://xero.test/connect/token",
            data={"grant_type": "client_credentials"},
            auth=(emulator.client_id, emulator.client_secret),
        )
        headers = {
            "Authorization": f"Bearer {token.json()['access_token']}",
            "Accept": "application/json",
            "Content-Type": "application/json",
        }
        return await client.put(
            f"http://xero.test{API}/{collection}",
            params=params,
            headers=headers,
            content=dump_json({collection: elements}),
        )


def invoice_element(contact_id: str, reference: str, **fields: Any) -> dict[str, Any]:
    line = {"Description": "Work", "Quantity": 1, "UnitAmount": 100, "AccountCode": "200"}
    return {
        "Type": "ACCREC",
        "Contact": {"ContactID": contact_id},
        "Date": "2025-03-03",
        "DueDate": "2025-03-31",
        "Reference": reference,
        "Status": "AUTHORISED",
        "LineItems": [line],
        **fields,
    }


async def test_a_batch_with_one_bad_invoice_is_400_but_its_good_invoices_are_created(xero_spec: OpenAPI) -> None:
    """summarizeErrors (default): 400 naming only the bad element; the good ones exist all the same."""
    emulator = XeroEmulator(rate_limits=False, contract=OpenApiContract(xero_spec, host_url="https://api.xero.com"))
    contact = emulator.seed_contact("Acme Pty Ltd")["ContactID"]
    bad = invoice_element(contact, "two", LineItems=[{"Description": "Work", "Quantity": 1, "UnitAmount": 5}])

    answer = await xero_batch(
        emulator, "Invoices", [invoice_element(contact, "one"), bad, invoice_element(contact, "three")]
    )

    assert answer.status_code == 400
    body = answer.json()
    assert body["Type"] == "ValidationException"
    assert [element["Reference"] for element in body["Elements"]] == ["two"]
    assert body["Elements"][0]["ValidationErrors"] == [{"Message": "Account code must be specified"}]
    assert sorted(invoice["Reference"] for invoice in emulator.invoices()) == ["one", "three"]
    assert emulator.contract.breaches == []


async def test_a_batch_without_summarized_errors_answers_every_element(xero_spec: OpenAPI) -> None:
    """summarizeErrors=false: 200, each element in order, OK with its id or ERROR with its ValidationErrors."""
    emulator = XeroEmulator(rate_limits=False, contract=OpenApiContract(xero_spec, host_url="https://api.xero.com"))
    contact = emulator.seed_contact("Acme Pty Ltd")["ContactID"]
    bad = invoice_element(contact, "two", CurrencyCode="JPY")

    answer = await xero_batch(emulator, "Invoices", [invoice_element(contact, "one"), bad], summarizeErrors="false")

    assert answer.status_code == 200
    first, second = answer.json()["Invoices"]
    assert (first["StatusAttributeString"], first["Reference"]) == ("OK", "one")
    assert first["InvoiceNumber"] == "INV-0001"
    assert (second["StatusAttributeString"], second["HasErrors"]) == ("ERROR", True)
    assert second["ValidationErrors"] == [{"Message": "Organisation is not subscribed to currency JPY"}]
    assert [invoice["InvoiceID"] for invoice in emulator.invoices()] == [first["InvoiceID"]]


async def test_a_contact_batch_keeps_its_good_contacts(xero_spec: OpenAPI) -> None:
    """A PUT /Contacts with a duplicate name: 400 for it, the new contact is created."""
    emulator = XeroEmulator(rate_limits=False, contract=OpenApiContract(xero_spec, host_url="https://api.xero.com"))
    emulator.seed_contact("Acme Pty Ltd")

    answer = await xero_batch(emulator, "Contacts", [{"Name": "Acme Pty Ltd"}, {"Name": "Globex Pty Ltd"}])

    assert answer.status_code == 400
    (element,) = answer.json()["Elements"]
    assert element["Name"] == "Acme Pty Ltd"
    assert "already assigned to another contact" in element["ValidationErrors"][0]["Message"]
    assert sorted(contact["Name"] for contact in emulator.contacts()) == ["Acme Pty Ltd", "Globex Pty Ltd"]
