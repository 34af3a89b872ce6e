"""Xero wire fidelity, checked against Xero's published OpenAPI description.

During a realistic scenario every request the connector sends to the Accounting API,
and every emulator answer whose status the spec describes, is validated with
openapi-core against ``specs/xero/xero_accounting.yaml`` (XeroAPI/Xero-OpenAPI).
The server URL carries a path, so requests are validated as host
``https://api.xero.com`` plus the full path ``/api.xro/2.0/...``
(``specs/README.md``). The token endpoint is not part of that file.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from urllib.parse import parse_qsl

import httpx
from openapi_core import OpenAPI
from openapi_core.datatypes import RequestParameters
from openapi_core.templating.responses.exceptions import ResponseNotFound
from werkzeug.datastructures import Headers, ImmutableMultiDict

from connectors.xero.connector import XeroConnector, XeroSettings
from connectors.xero.emulator import API, XeroEmulator
from connectors.xero.models import XeroRejected, dump_json
from syncd.core.interfaces import Address, Client, Contact, DraftKind, InvoiceDraft, InvoiceLine
from syncd.plumbing.http import VendorHttp
from syncd.plumbing.registry import ConnectorContext

HOST = "http://xero.test"
START = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)

Exchange = tuple[httpx.Request, httpx.Response]


class Recording(httpx.AsyncBaseTransport):
    """Wraps a transport and keeps every request with its (read) response."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.exchanges: list[Exchange] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        body = await response.aread()
        kept = httpx.Response(response.status_code, headers=response.headers, content=body, request=request)
        self.exchanges.append((request, kept))
        return httpx.Response(response.status_code, headers=response.headers, content=body, request=request)


class SpecRequest:
    """An httpx request as openapi-core sees one (``openapi_core.protocols.Request``).

    ``parameters`` is built once: openapi-core writes the resolved path parameters into it.
    """

    def __init__(self, request: httpx.Request) -> None:
        self.request = request
        query = parse_qsl(request.url.query.decode("ascii"), keep_blank_values=True)
        self.parameters = RequestParameters(
            query=ImmutableMultiDict(query),
            header=Headers(list(request.headers.items())),
            cookie=ImmutableMultiDict(),
        )

    @property
    def host_url(self) -> str:
        return "https://api.xero.com"

    @property
    def path(self) -> str:
        return self.request.url.path

    @property
    def method(self) -> str:
        return self.request.method.lower()

    @property
    def body(self) -> bytes | None:
        return self.request.content or None

    @property
    def content_type(self) -> str:
        return self.request.headers.get("content-type", "")


@dataclass
class SpecResponse:
    """An httpx response as openapi-core sees one (``openapi_core.protocols.Response``)."""

    response: httpx.Response

    @property
    def status_code(self) -> int:
        return self.response.status_code

    @property
    def content_type(self) -> str:
        return self.response.headers.get("content-type", "")

    @property
    def headers(self) -> Headers:
        return Headers(list(self.response.headers.items()))

    @property
    def data(self) -> bytes | None:
        return self.response.content or None


def problems(spec: OpenAPI, exchanges: list[Exchange]) -> tuple[list[str], int, int]:
    """Validation problems of every Accounting API exchange; and how many requests and responses were checked."""
    found: list[str] = []
    requests = responses = 0
    for request, response in exchanges:
        if not request.url.path.startswith(API):
            continue
        where = f"{request.method} {request.url.path}?{request.url.query.decode()} → {response.status_code}"
        wrapped = SpecRequest(request)
        requests += 1
        for error in spec.iter_request_errors(wrapped):
            found.append(f"request {where}: {error!r} {getattr(error, '__cause__', '')}")
        try:
            errors = list(spec.iter_response_errors(wrapped, SpecResponse(response)))
        except ResponseNotFound:
            continue
        if any(isinstance(error, ResponseNotFound) for error in errors):
            continue
        responses += 1
        found += [f"response {where}: {error!r} {getattr(error, '__cause__', '')}" for error in errors]
    return found, requests, responses


async def test_every_request_and_answer_of_a_billing_scenario_matches_the_spec(xero_spec: OpenAPI) -> None:
    """Create contact, invoice, credit note; find, get, pay, poll, check: every exchange validates."""
    now = [START]
    emulator = XeroEmulator(clock=lambda: now[0])
    recording = Recording(httpx.ASGITransport(app=emulator.app))
    async with httpx.AsyncClient(transport=recording) as client:
        settings = XeroSettings(
            connector="xero",
            base_url=HOST,
            token_url=f"{HOST}/connect/token",
            client_id=emulator.client_id,
            client_secret=emulator.client_secret,
            tenant_id=emulator.tenant_id,
            rate_limit_per_min=None,  # syncd's limiter waits on the real clock; the emulator's runs on now[0]
        )
        ctx = ConnectorContext(
            connection="xero",
            client=client,
            tokens=_Tokens(),
            clock=lambda: now[0],
            make_http=functools.partial(VendorHttp, client, connection="xero"),
        )
        connector = XeroConnector(settings, ctx)
        await _scenario(connector, emulator, client, now)

    found, requests, responses = problems(xero_spec, recording.exchanges)
    assert found == []
    operations = {op for op, count in emulator.calls.items() if count}
    assert {
        "createContacts",
        "updateContact",
        "createInvoices",
        "getInvoices",
        "getInvoice",
        "emailInvoice",
    } <= operations
    assert {"createCreditNotes", "getCreditNotes", "createPayments", "getOrganisations", "getContacts"} <= operations
    assert requests >= 20
    assert responses >= 18


async def _scenario(
    connector: XeroConnector, emulator: XeroEmulator, client: httpx.AsyncClient, now: list[datetime]
) -> None:
    start = await connector.poll_changes(None)
    emulator.seed_contact("Contoso Pty Ltd")
    adopted = await connector.upsert_customer(_client("hubspot:company:1", "Contoso Pty Ltd"))
    contact_id = await connector.upsert_customer(_client("hubspot:company:2", "Northwind Traders LLC"))
    assert adopted != contact_id
    now[0] += timedelta(seconds=30)
    invoice = await connector.create_invoice(_draft("a" * 32, DraftKind.INVOICE, send=True), contact_id)
    await connector.create_invoice(_draft("b" * 32, DraftKind.CREDIT_NOTE), contact_id)
    assert await connector.find_invoice("a" * 32, kind=DraftKind.INVOICE) is not None
    assert await connector.find_invoice("b" * 32, kind=DraftKind.CREDIT_NOTE) is not None
    assert (await connector.get_invoice(invoice.invoice_id)).invoice_id == invoice.invoice_id
    try:
        await connector.create_invoice(_draft("c" * 32, DraftKind.INVOICE, account="999"), contact_id)
    except XeroRejected:
        pass
    else:
        raise AssertionError("a draft with an unknown account code was accepted")
    await _pay(emulator, client, invoice.invoice_id)
    page = await connector.poll_changes(start.cursor)
    assert invoice.invoice_id in {hint.object_id for hint in page.hints}
    assert await connector.check() == []
    headers = await _headers(emulator, client)
    for path in ("/TaxRates", "/Currencies", "/Accounts", "/Payments", "/Contacts?page=1"):
        answer = await client.get(f"{HOST}{API}{path}", headers=headers)
        assert answer.status_code == 200


async def test_every_exchange_of_a_batch_scenario_matches_the_spec(xero_spec: OpenAPI) -> None:
    """upsert_customers, create_invoices (a mix, one element refused) and find_invoices: every exchange validates."""
    now = [START]
    emulator = XeroEmulator(clock=lambda: now[0])
    recording = Recording(httpx.ASGITransport(app=emulator.app))
    async with httpx.AsyncClient(transport=recording) as client:
        settings = XeroSettings(
            connector="xero",
            base_url=HOST,
            token_url=f"{HOST}/connect/token",
            client_id=emulator.client_id,
            client_secret=emulator.client_secret,
            tenant_id=emulator.tenant_id,
            rate_limit_per_min=None,
        )
        ctx = ConnectorContext(
            connection="xero",
            client=client,
            tokens=_Tokens(),
            clock=lambda: now[0],
            make_http=functools.partial(VendorHttp, client, connection="xero"),
        )
        connector = XeroConnector(settings, ctx)
        emulator.seed_contact("Contoso Pty Ltd")
        clients = [_client("hubspot:company:1", "Contoso Pty Ltd")]
        clients += [_client(f"hubspot:company:{n}", f"Client {n}") for n in range(2, 6)]
        ids = await connector.upsert_customers(clients)
        contact_id = str(ids["hubspot:company:2"])
        items = [(_draft(f"{n:032d}", DraftKind.INVOICE, send=n == 1), contact_id) for n in range(1, 6)]
        items += [(_draft(f"{n:032d}", DraftKind.CREDIT_NOTE), contact_id) for n in range(6, 8)]
        items.append((_draft("9" * 32, DraftKind.INVOICE, account="999"), contact_id))
        results = await connector.create_invoices(items)
        assert isinstance(results["9" * 32], XeroRejected)
        found = await connector.find_invoices([draft.key for draft, _ in items], kind=DraftKind.INVOICE)
        assert len(found) == 5
        details = await connector.customers_details([str(value) for value in ids.values()])
        assert len(details) == 5

    found_problems, requests, responses = problems(xero_spec, recording.exchanges)
    assert found_problems == []
    assert {"createContacts", "updateContact", "createInvoices", "createCreditNotes", "getInvoices"} <= {
        op for op, count in emulator.calls.items() if count
    }
    # GET /Contacts by number, PUT /Contacts (Contoso refused for its name), GET by name, adoption,
    # PUT x2, email, 2 GET
    assert (requests, responses) == (9, 9)


async def _headers(emulator: XeroEmulator, client: httpx.AsyncClient) -> dict[str, str]:
    token = await client.post(
        f"{HOST}/connect/token",
        data={"grant_type": "client_credentials"},
        auth=(emulator.client_id, emulator.client_secret),
    )
    return {
        "Authorization": f"Bearer {token.json()['access_token']}",
        "Accept": "application/json",
        "Xero-tenant-id": emulator.tenant_id,
    }


async def _pay(emulator: XeroEmulator, client: httpx.AsyncClient, invoice_id: str) -> None:
    """A payment through PUT /Payments, as a bank feed or a person would record it."""
    body = {
        "Payments": [
            {
                "Invoice": {"InvoiceID": invoice_id},
                "Account": {"Code": "090"},
                "Date": "2025-03-04",
                "Amount": Decimal("100.00"),
                "Reference": "EFT 1234",
            }
        ]
    }
    headers = {**await _headers(emulator, client), "Content-Type": "application/json", "Idempotency-Key": "pay-1"}
    answer = await client.put(f"{HOST}{API}/Payments", content=dump_json(body), headers=headers)
    assert answer.status_code == 200


class _Tokens:
    """A TokenStore that keeps one token set in memory."""

    def __init__(self) -> None:
        self.tokens: dict[str, object] | None = None

    async def load(self) -> dict[str, object] | None:
        return self.tokens

    async def save(self, tokens: dict[str, object]) -> None:
        self.tokens = dict(tokens)

    def locked(self) -> _NoLock:
        return _NoLock()


class _NoLock:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *_exc: object) -> None:
        return None


def _client(key: str, name: str) -> Client:
    return Client(
        key=key,
        legal_name=name,
        billing_contact=Contact(first_name="Dana", last_name="Reyes", email="ap@example.com"),
        address=Address(line1="1 Harbour St", city="Sydney", postal_code="2000", country="Australia"),
        tax_id="51 824 753 556",
        currency="AUD",
    )


def _draft(key: str, kind: DraftKind, *, send: bool = False, account: str = "200") -> InvoiceDraft:
    return InvoiceDraft(
        key=key,
        kind=kind,
        client=_client("hubspot:company:2", "Northwind Traders LLC"),
        engagement_key="hubspot:deal:1",
        currency="AUD",
        issue_date=date(2025, 3, 3),
        due_date=date(2025, 3, 31),
        reference="PO-1",
        lines=(
            InvoiceLine(description="Work", quantity=Decimal(2), unit_price=Decimal("99.995"), account_code=account),
        ),
        send=send,
    )


def test_the_checker_catches_a_body_the_spec_refuses(xero_spec: OpenAPI) -> None:
    """A request with a non-numeric Quantity and an answer with an unknown Status are both reported."""
    url = f"{HOST}{API}/Invoices"
    headers = {"Content-Type": "application/json", "Xero-tenant-id": "t", "Accept": "application/json"}
    body = {"Invoices": [{"Type": "ACCREC", "LineItems": [{"Description": "x", "Quantity": "one"}]}]}
    request = httpx.Request("PUT", url, headers=headers, content=dump_json(body))
    answer = {"Invoices": [{"InvoiceID": "6f1c2e0a-0000-4000-8000-000000000000", "Status": "BOGUS"}]}
    response = httpx.Response(200, headers={"content-type": "application/json"}, content=dump_json(answer))
    found, requests, responses = problems(xero_spec, [(request, response)])
    assert (requests, responses) == (1, 1)
    assert len(found) == 2
    assert found[0].startswith("request PUT")
    assert "InvalidRequestBody" in found[0]
    assert found[1].startswith("response PUT")
    assert "InvalidData" in found[1]
