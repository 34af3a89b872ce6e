"""The HubSpot connector against its emulator (httpx.ASGITransport), and the webhook verifier."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import re
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from cryptography.fernet import Fernet
from pydantic import ValidationError

from connectors.emulation import Fault
from connectors.hubspot.connector import (
    SPEC,
    BillingProperty,
    CompanyProperty,
    HubSpotConnector,
    HubSpotSettings,
    create,
    create_verifier,
)
from connectors.hubspot.emulator import HubSpotEmulator
from connectors.hubspot.webhooks import sign_v3
from connectors.xero.emulator import XeroEmulator
from syncd.core.errors import AuthError, FatalError, NotFound, RecordError, RetriableError
from syncd.core.interfaces import Crm, CrmSchema, DealBillingStatus, WebhookRequest
from syncd.daemon import Daemon
from syncd.plumbing.http import Rejected, VendorHttp
from syncd.plumbing.registry import ConnectorContext, load
from syncd.plumbing.settings import load_config
from syncd.store.db import DbTokenStore, Store
from tests.harness import write_config
from tests.servers import invoke, serve_in_thread

BASE = "http://hubspot.test"
HOOK_URL = "https://syncd.example.com/webhooks/hubspot"


class Clock:
    """A settable clock; ``tick_ms`` advances it on every read (distinct modification times)."""

    def __init__(self, start: datetime, tick_ms: int = 0) -> None:
        self.now = start
        self.tick = timedelta(milliseconds=tick_ms)

    def __call__(self) -> datetime:
        current = self.now
        self.now += self.tick
        return current

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


class MemoryTokens:
    """An in-memory TokenStore that records each save (and what the emulator had seen then)."""

    def __init__(self, emulator: HubSpotEmulator, tokens: Mapping[str, Any] | None = None) -> None:
        self.emulator = emulator
        self.tokens = dict(tokens) if tokens else None
        self.saved: list[dict[str, Any]] = []
        self.calls_at_save: list[int] = []
        self._lock = asyncio.Lock()

    async def load(self) -> Mapping[str, Any] | None:
        return self.tokens

    async def save(self, tokens: Mapping[str, Any]) -> None:
        self.saved.append(dict(tokens))
        self.calls_at_save.append(sum(n for key, n in self.emulator.calls.items() if "/crm/" in key))
        self.tokens = dict(tokens)

    def locked(self) -> asyncio.Lock:
        return self._lock


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime(2024, 6, 3, 9, 0, tzinfo=UTC))


@pytest.fixture
def emulator(clock: Clock) -> HubSpotEmulator:
    return HubSpotEmulator(rate_limits=False, clock=clock)


@pytest.fixture
async def client(emulator: HubSpotEmulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=emulator.app)) as http:
        yield http


def settings(**overrides: Any) -> HubSpotSettings:
    values: dict[str, Any] = {
        "connector": "hubspot",
        "base_url": BASE,
        "token": "pat-emulator",
        "webhook_secret": "emulator-secret",
        "rate_limit_per_10s": None,
        "search_rate_per_s": None,
        "poll_lag_s": 0,
        **overrides,
    }
    return HubSpotSettings.model_validate(values)


def build(
    client: httpx.AsyncClient,
    clock: Clock,
    tokens: MemoryTokens,
    config: HubSpotSettings | None = None,
    sleeps: list[float] | None = None,
) -> HubSpotConnector:
    async def sleep(seconds: float) -> None:
        (sleeps if sleeps is not None else []).append(seconds)

    ctx = ConnectorContext(
        connection="hubspot",
        client=client,
        tokens=tokens,
        clock=clock,
        make_http=functools.partial(VendorHttp, client, connection="hubspot", sleep=sleep),
    )
    return create(config or settings(), ctx)


@pytest.fixture
def connector(client: httpx.AsyncClient, clock: Clock, emulator: HubSpotEmulator) -> HubSpotConnector:
    return build(client, clock, MemoryTokens(emulator))


def seed_deal(emulator: HubSpotEmulator) -> dict[str, str]:
    """A won-looking deal with a primary company, a second company, two contacts and two line items."""
    acme = emulator.add_company({"name": "Acme Ltd", "city": "Leeds", "country": "GB"})
    other = emulator.add_company({"name": "Other Co"})
    ann = emulator.add_contact({"firstname": "Ann", "email": "ann@acme.test"}, company_id=acme)
    bob = emulator.add_contact({"firstname": "Bob", "email": "bob@acme.test"}, company_id=acme)
    deal = emulator.add_deal(
        {"dealname": "Website", "amount": "1500", "deal_currency_code": "GBP", "po_number": "PO-7"},
        company_id=acme,
        contact_ids=[ann, bob],
        line_items=[
            {"name": "Design", "quantity": "2", "price": "500"},
            {"name": "Build", "quantity": "1", "price": "500"},
        ],
    )
    emulator.associate("deals", deal, "companies", other)
    emulator.label_contact(deal, ann, "Billing contact")
    emulator.label_contact(deal, bob, "Primary")
    return {"deal": deal, "acme": acme, "other": other, "ann": ann, "bob": bob}


# ---------------------------------------------------------------------------- registration and settings


def test_spec_is_registered_and_builds_a_crm(connector: HubSpotConnector) -> None:
    """The entry point loads the HubSpot spec and its factory builds a Crm."""
    assert load("hubspot") is SPEC
    assert isinstance(connector, Crm)
    assert set(SPEC.secret_fields) == {"token", "client_secret", "refresh_token", "webhook_secret"}


def test_settings_require_exactly_one_auth_method() -> None:
    """Settings with no credentials, or with both kinds, are rejected with a clear message."""
    with pytest.raises(ValidationError, match="missing: client_id, client_secret, refresh_token"):
        HubSpotSettings.model_validate({"connector": "hubspot"})
    with pytest.raises(ValidationError, match="not both"):
        HubSpotSettings.model_validate({"connector": "hubspot", "token": "t", "client_id": "c"})
    oauth = HubSpotSettings.model_validate(
        {"connector": "hubspot", "client_id": "c", "client_secret": "s", "refresh_token": "r"}
    )
    assert oauth.base_url == "https://api.hubapi.com"


# ---------------------------------------------------------------------------- reads


async def test_fetch_deal_reads_primary_company_contacts_and_line_items(
    connector: HubSpotConnector, emulator: HubSpotEmulator
) -> None:
    """A deal is read with its primary company, labelled contacts and line items."""
    ids = seed_deal(emulator)

    record = await connector.fetch_deal(ids["deal"], {"deal": ["po_number"], "company": ["city"]})

    deal = record.data["deal"]
    assert record.object_id == ids["deal"]
    assert deal["properties"]["dealname"] == "Website"
    assert deal["properties"]["po_number"] == "PO-7"
    assert record.version == emulator.deal(ids["deal"])["properties"]["hs_lastmodifieddate"]
    assert record.data["company"]["id"] == ids["acme"]
    assert record.data["company"]["properties"]["name"] == "Acme Ltd"
    assert record.data["company"]["properties"]["city"] == "Leeds"
    contacts = {contact["id"]: contact for contact in record.data["contacts"]}
    assert contacts[ids["ann"]]["labels"] == ["Billing contact"]
    assert contacts[ids["ann"]]["primary"] is False
    assert contacts[ids["bob"]]["primary"] is True
    items = sorted(record.data["line_items"], key=lambda item: item["properties"]["name"])
    assert [(item["properties"]["name"], item["properties"]["quantity"]) for item in items] == [
        ("Build", "1"),
        ("Design", "2"),
    ]


async def test_fetch_deal_without_primary_company_has_no_company(
    connector: HubSpotConnector, emulator: HubSpotEmulator
) -> None:
    """A deal whose only company is not labelled Primary has company None."""
    company = emulator.add_company({"name": "Loose Co"})
    deal = emulator.add_deal({"dealname": "Side project"})
    emulator.associate("deals", deal, "companies", company)

    record = await connector.fetch_deal(deal)

    assert record.data["company"] is None
    assert record.data["contacts"] == []
    assert record.data["line_items"] == []


async def test_fetch_unknown_deal_raises_not_found(connector: HubSpotConnector) -> None:
    """An unknown deal id raises NotFound."""
    with pytest.raises(NotFound):
        await connector.fetch_deal("999999")


async def test_iter_deals_streams_every_page(connector: HubSpotConnector, emulator: HubSpotEmulator) -> None:
    """iter_deals pages through the list endpoint 100 at a time without associations."""
    created = [emulator.add_deal({"dealname": f"Deal {n}"}) for n in range(230)]

    seen = [record async for record in connector.iter_deals()]

    assert [record.object_id for record in seen] == created
    assert emulator.calls["GET /crm/v3/objects/deals"] == 3
    assert seen[0].data["company"] is None
    assert seen[0].data["deal"]["properties"]["dealname"] == "Deal 0"


# ---------------------------------------------------------------------------- polling


async def test_poll_changes_returns_changed_deals_only_and_resumes(
    connector: HubSpotConnector, emulator: HubSpotEmulator, clock: Clock
) -> None:
    """Polling starts from now, then returns only deals changed since its cursor."""
    quiet = emulator.add_deal({"dealname": "Quiet"})
    first = emulator.add_deal({"dealname": "First"})
    second = emulator.add_deal({"dealname": "Second"})
    clock.advance(minutes=1)

    start = await connector.poll_changes(None)
    assert start.hints == ()
    assert start.more is False

    clock.advance(minutes=1)
    await emulator.set_deal_properties(first, {"dealstage": "contractsent"})
    page = await connector.poll_changes(start.cursor)
    assert [hint.object_id for hint in page.hints] == [first]
    assert page.hints[0].event_id.startswith(f"poll:{first}:")
    assert page.hints[0].kind == "deal.poll"

    clock.advance(minutes=1)
    await emulator.set_deal_properties(second, {"dealstage": "closedwon"})
    later = await connector.poll_changes(page.cursor)
    new_ids = {hint.event_id for hint in later.hints} - {hint.event_id for hint in page.hints}
    assert {hint.object_id for hint in later.hints} <= {first, second}
    assert any(event.startswith(f"poll:{second}:") for event in new_ids)
    assert quiet not in {hint.object_id for hint in (*page.hints, *later.hints)}


async def test_poll_changes_restarts_windows_at_the_result_cap(client: httpx.AsyncClient, clock: Clock) -> None:
    """When a search window reaches the result cap, polling restarts it and still sees every deal."""
    clock.tick = timedelta(milliseconds=1)
    emulator = HubSpotEmulator(rate_limits=False, clock=clock, search_result_cap=250)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=emulator.app)) as http:
        connector = build(http, clock, MemoryTokens(emulator), settings(search_max_results=250))
        start = await connector.poll_changes(None)
        deals = {emulator.add_deal({"dealname": f"Deal {n}"}) for n in range(600)}

        seen: set[str] = set()
        cursor, more, polls, restarts = start.cursor, True, 0, 0
        while more and polls < 50:
            page = await connector.poll_changes(cursor)
            seen |= {hint.object_id for hint in page.hints}
            restarts += page.more and json.loads(page.cursor)["after"] is None
            cursor, more, polls = page.cursor, page.more, polls + 1

    assert seen == deals
    assert more is False
    assert restarts >= 2
    assert emulator.calls["POST /crm/v3/objects/deals/search"] == polls


# ---------------------------------------------------------------------------- writes


async def test_ensure_properties_is_idempotent(connector: HubSpotConnector, emulator: HubSpotEmulator) -> None:
    """ensure_properties creates the group and properties once; a second run creates nothing."""
    first = await connector.ensure_properties()
    second = await connector.ensure_properties()

    assert first.group_created is True
    assert len(first.created) == 7
    assert first.present == ()
    assert second.group_created is False
    assert second.created == ()
    assert set(second.present) == set(first.created)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=emulator.app)) as http:
        answer = await http.get(
            f"{BASE}/crm/v3/properties/deals/syncd_invoice_due_date", headers={"Authorization": "Bearer pat-emulator"}
        )
    assert (answer.json()["type"], answer.json()["fieldType"], answer.json()["groupName"]) == ("date", "date", "syncd")


class _AnotherReplicaFirst(httpx.AsyncBaseTransport):
    """Each property (or group) create is first made by "another replica" (the same request, sent before)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path.startswith("/crm/v3/properties/deals"):
            other = httpx.Request(request.method, request.url, headers=request.headers, content=request.content)
            await self.inner.handle_async_request(other)
        return await self.inner.handle_async_request(request)


async def test_replicas_creating_the_properties_at_once_both_start(clock: Clock, emulator: HubSpotEmulator) -> None:
    """Another replica creates each property between our read and our create: HubSpot's 409 counts it as present."""
    transport = _AnotherReplicaFirst(httpx.ASGITransport(app=emulator.app))
    async with httpx.AsyncClient(transport=transport) as raced:
        setup = await build(raced, clock, MemoryTokens(emulator)).ensure_properties()

    assert setup.group_created is False
    assert setup.created == ()
    assert sorted(setup.present) == sorted(name.value for name in BillingProperty)
    assert emulator.calls["POST /crm/v3/properties/deals"] == 2 * len(BillingProperty)  # each create raced


async def test_a_property_create_that_fails_for_another_reason_still_fails(
    connector: HubSpotConnector, emulator: HubSpotEmulator
) -> None:
    """A 503 on a create whose property does not exist afterwards is raised, not taken for a race."""
    emulator.faults.add(Fault(kind="status", status=503, method="POST", path_contains="/crm/v3/properties/deals"))
    with pytest.raises(RetriableError, match="503"):
        await connector.ensure_properties()


async def test_write_billing_status_round_trips(connector: HubSpotConnector, emulator: HubSpotEmulator) -> None:
    """Billing status lands on the deal as HubSpot property values."""
    deal = emulator.add_deal({"dealname": "Retainer"})
    await connector.ensure_properties()
    status = DealBillingStatus(
        invoice_number="INV-0042",
        state="partially_paid",
        amount_due=Decimal("1234.50"),
        currency="EUR",
        due_date=date(2024, 7, 31),
        days_overdue=3,
        total_invoiced=Decimal("4000.00"),
    )

    await connector.write_billing_status(deal, status)

    stored = emulator.deal(deal)["properties"]
    assert stored["syncd_invoice_number"] == "INV-0042"
    assert stored["syncd_invoice_status"] == "partially_paid"
    assert stored["syncd_amount_due"] == "1234.50"
    assert stored["syncd_invoice_currency"] == "EUR"
    assert stored["syncd_invoice_due_date"] == "2024-07-31"
    assert stored["syncd_days_overdue"] == "3"
    assert stored["syncd_total_invoiced"] == "4000.00"
    record = await connector.fetch_deal(deal, {"deal": ["syncd_amount_due"]})
    assert record.data["deal"]["properties"]["syncd_amount_due"] == "1234.50"


async def test_write_billing_status_before_setup_is_refused(
    connector: HubSpotConnector, emulator: HubSpotEmulator
) -> None:
    """Writing to properties that do not exist yet fails as HubSpot would (400, fatal)."""
    deal = emulator.add_deal({"dealname": "No setup"})
    status = DealBillingStatus(invoice_number=None, state="draft", amount_due=Decimal(0), currency="USD")

    with pytest.raises(FatalError, match="PROPERTY_DOESNT_EXIST"):
        await connector.write_billing_status(deal, status)


async def test_lenient_emulator_accepts_billing_status_without_setup(clock: Clock) -> None:
    """With strict_properties off, the emulator defines unknown written properties on the fly."""
    emulator = HubSpotEmulator(rate_limits=False, clock=clock, strict_properties=False)
    deal = emulator.add_deal({"dealname": "Lenient"})
    status = DealBillingStatus(invoice_number="7", state="sent", amount_due=Decimal("10.00"), currency="USD")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=emulator.app)) as http:
        await build(http, clock, MemoryTokens(emulator)).write_billing_status(deal, status)

    assert emulator.deal(deal)["properties"]["syncd_invoice_status"] == "sent"


async def test_write_billing_status_rejects_an_unknown_state(connector: HubSpotConnector) -> None:
    """A state that is not an option of the status property fails the record, not the connection."""
    status = DealBillingStatus(invoice_number="1", state="mystery", amount_due=Decimal(1), currency="USD")

    with pytest.raises(RecordError, match="mystery"):
        await connector.write_billing_status("1", status)


# ---------------------------------------------------------------------------- HTTP behaviour


async def test_429_with_retry_after_is_retried(
    client: httpx.AsyncClient, clock: Clock, emulator: HubSpotEmulator
) -> None:
    """A 429 with Retry-After is waited out for exactly that long and retried."""
    deal = emulator.add_deal({"dealname": "Busy"})
    sleeps: list[float] = []
    connector = build(client, clock, MemoryTokens(emulator), sleeps=sleeps)
    emulator.faults.add(Fault(kind="status", status=429, retry_after_s=3, method="GET", path_contains="/objects/deals"))

    record = await connector.fetch_deal(deal)

    assert record.object_id == deal
    assert sleeps == [3.0]


async def test_emulator_limits_requests_with_hubspot_429(clock: Clock) -> None:
    """Past its limit the emulator answers 429 with HubSpot's body and rate-limit headers."""
    emulator = HubSpotEmulator(clock=clock, rate_limit_per_10s=2, search_rate_per_s=1)
    auth = {"Authorization": "Bearer pat-emulator"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=emulator.app), base_url=BASE) as http:
        answers = [await http.get("/crm/v3/objects/deals", headers=auth) for _ in range(3)]
        searches = [await http.post("/crm/v3/objects/deals/search", json={}, headers=auth) for _ in range(2)]

    assert [answer.status_code for answer in answers] == [200, 200, 429]
    assert answers[0].headers["X-HubSpot-RateLimit-Max"] == "2"
    assert answers[2].json()["errorType"] == "RATE_LIMIT"
    assert answers[2].json()["policyName"] == "TEN_SECONDLY_ROLLING"
    assert [answer.status_code for answer in searches] == [200, 429]
    assert searches[1].json()["policyName"] == "SECONDLY"


async def test_emulator_refuses_paging_past_the_search_cap(emulator: HubSpotEmulator) -> None:
    """Searching with after at the result cap is a 400, as HubSpot documents."""
    auth = {"Authorization": "Bearer pat-emulator"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=emulator.app), base_url=BASE) as http:
        answer = await http.post("/crm/v3/objects/deals/search", json={"after": "10000"}, headers=auth)
        anonymous = await http.get("/crm/v3/objects/deals")

    assert answer.status_code == 400
    assert answer.json()["category"] == "VALIDATION_ERROR"
    assert anonymous.status_code == 401
    assert anonymous.json()["category"] == "INVALID_AUTHENTICATION"


async def test_check_reports_rejected_credentials_without_the_token(
    client: httpx.AsyncClient, clock: Clock, emulator: HubSpotEmulator
) -> None:
    """check() is empty when the token works and names the problem (not the token) when it does not."""
    good = build(client, clock, MemoryTokens(emulator))
    bad = build(client, clock, MemoryTokens(emulator), settings(token="pat-wrong-secret-value"))

    assert await good.check() == []
    problems = await bad.check()
    assert len(problems) == 1
    assert "credentials rejected" in problems[0]
    assert "pat-wrong-secret-value" not in problems[0]


# ---------------------------------------------------------------------------- OAuth


def oauth_settings(**overrides: Any) -> HubSpotSettings:
    oauth: dict[str, Any] = {
        "token": None,
        "client_id": "emulator-client",
        "client_secret": "emulator-secret",
        "refresh_token": "emulator-refresh",
        "token_url": f"{BASE}/oauth/v3/token",
    }
    return settings(**{**oauth, **overrides})


async def test_oauth_refresh_saves_the_new_token_before_using_it(
    client: httpx.AsyncClient, clock: Clock, emulator: HubSpotEmulator
) -> None:
    """The first call refreshes, saves the token set, and only then calls the API with it."""
    deal = emulator.add_deal({"dealname": "OAuth"})
    tokens = MemoryTokens(emulator)
    connector = build(client, clock, tokens, oauth_settings())

    record = await connector.fetch_deal(deal)

    assert record.object_id == deal
    assert len(tokens.saved) == 1
    assert tokens.calls_at_save == [0]
    assert tokens.saved[0]["refresh_token"] == "emulator-refresh"
    assert tokens.saved[0]["expires_at"] == pytest.approx(clock.now.timestamp() + 1800)
    assert emulator.calls["POST /oauth/v3/token"] == 1


async def test_oauth_refreshes_once_after_a_401_and_reuses_a_valid_token(
    client: httpx.AsyncClient, clock: Clock, emulator: HubSpotEmulator
) -> None:
    """A valid stored token is used as is; a 401 triggers one refresh and a retry."""
    deal = emulator.add_deal({"dealname": "OAuth"})
    tokens = MemoryTokens(emulator)
    connector = build(client, clock, tokens, oauth_settings())
    await connector.fetch_deal(deal)
    await connector.fetch_deal(deal)
    assert emulator.calls["POST /oauth/v3/token"] == 1

    emulator.expire_access_tokens()
    await connector.fetch_deal(deal)

    assert emulator.calls["POST /oauth/v3/token"] == 2
    assert len(tokens.saved) == 2
    assert tokens.saved[1]["access_token"] != tokens.saved[0]["access_token"]
    # check() proves the configured secret with a token request of its own, and stores nothing.
    assert await connector.check() == []
    assert emulator.calls["POST /oauth/v3/token"] == 3
    assert len(tokens.saved) == 2


async def test_oauth_rejected_refresh_token_raises_auth_error(
    client: httpx.AsyncClient, clock: Clock, emulator: HubSpotEmulator
) -> None:
    """A refresh token HubSpot refuses raises AuthError without echoing it."""
    connector = build(client, clock, MemoryTokens(emulator), oauth_settings(refresh_token="revoked-refresh-value"))

    with pytest.raises(AuthError, match="invalid_grant") as raised:
        await connector.fetch_deal("1")
    assert "revoked-refresh-value" not in str(raised.value)


# ---------------------------------------------------------------------------- webhooks


def signed_request(
    body: bytes,
    *,
    clock: Clock,
    url: str = HOOK_URL,
    secret: str = "emulator-secret",  # noqa: S107 - the emulator's fake secret
    age_s: float = 0,
) -> WebhookRequest:
    timestamp = str(int((clock.now - timedelta(seconds=age_s)).timestamp() * 1000))
    headers = {
        "x-hubspot-signature-v3": sign_v3(secret, method="POST", uri=url, body=body, timestamp=timestamp),
        "x-hubspot-request-timestamp": timestamp,
        "content-type": "application/json",
    }
    return WebhookRequest(method="POST", url=url, headers=headers, body=body, received_at=clock.now)


EVENT = {
    "eventId": 17,
    "subscriptionId": 1200,
    "portalId": 62515,
    "appId": 54321,
    "occurredAt": 1717405200000,
    "subscriptionType": "deal.propertyChange",
    "attemptNumber": 0,
    "objectId": 8812,
    "propertyName": "dealstage",
    "propertyValue": "closedwon",
    "changeSource": "CRM_UI",
}


def test_verifier_accepts_a_good_signature(clock: Clock) -> None:
    """A correctly signed delivery becomes one hint per event, keyed by its own fields."""
    verifier = create_verifier(settings(), clock)
    company_event = {**EVENT, "subscriptionType": "company.propertyChange", "objectId": 5}
    body = json.dumps([EVENT, company_event]).encode()

    hints = verifier.verify(signed_request(body, clock=clock, url=f"{HOOK_URL}?tag=a%3Ab%2Cc"))

    assert [(hint.object_type, hint.object_id) for hint in hints] == [("deal", "8812"), ("company", "5")]
    assert hints[0].event_id == "1200:17:8812:1717405200000"
    assert hints[0].kind == "deal.propertyChange"
    assert hints[0].occurred_at == datetime(2024, 6, 3, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("mutate", "header"),
    [
        (lambda request: request.headers.pop("x-hubspot-signature-v3"), "X-HubSpot-Signature-v3"),
        (lambda request: request.headers.pop("x-hubspot-request-timestamp"), "X-HubSpot-Request-Timestamp"),
        (lambda request: request.headers.update({"x-hubspot-signature-v3": "AAAA"}), "X-HubSpot-Signature-v3"),
        (lambda request: request.headers.update({"x-hubspot-request-timestamp": "soon"}), "Timestamp"),
    ],
)
def test_verifier_rejects_missing_or_bad_headers(clock: Clock, mutate: Any, header: str) -> None:
    """A missing or wrong signature header is an AuthError naming that header."""
    verifier = create_verifier(settings(), clock)
    request = signed_request(json.dumps([EVENT]).encode(), clock=clock)
    mutate(request)

    with pytest.raises(AuthError, match=header) as raised:
        verifier.verify(request)
    assert "emulator-secret" not in str(raised.value)


def test_verifier_rejects_stale_and_tampered_deliveries(clock: Clock) -> None:
    """A delivery older than 5 minutes, or signed with another secret or URL, is refused."""
    verifier = create_verifier(settings(), clock)
    body = json.dumps([EVENT]).encode()

    with pytest.raises(AuthError, match="older than 5 minutes"):
        verifier.verify(signed_request(body, clock=clock, age_s=301))
    with pytest.raises(AuthError, match="does not match"):
        verifier.verify(signed_request(body, clock=clock, secret="another-secret"))
    moved = signed_request(body, clock=clock)
    with pytest.raises(AuthError, match="does not match"):
        verifier.verify(WebhookRequest(**{**moved.__dict__, "url": f"{HOOK_URL}/other"}))


def test_verifier_names_the_field_of_a_malformed_body(clock: Clock) -> None:
    """A correctly signed body missing a field is a RecordError naming that field."""
    verifier = create_verifier(settings(), clock)
    event = {key: value for key, value in EVENT.items() if key != "objectId"}

    with pytest.raises(RecordError, match=r"body\[0\]\.objectId") as raised:
        verifier.verify(signed_request(json.dumps([event]).encode(), clock=clock))
    assert raised.value.place == "body[0].objectId"
    with pytest.raises(RecordError, match="JSON array"):
        verifier.verify(signed_request(b'{"not": "a list"}', clock=clock))


async def test_closed_won_webhook_arrives_signed_and_verifies(emulator: HubSpotEmulator, clock: Clock) -> None:
    """Closing a deal in the emulator delivers signed events that verify; a retry keeps the event ids."""
    verifier = create_verifier(settings(), clock)
    bodies: list[list[dict[str, Any]]] = []
    verified: list[list[str]] = []

    def receive(request: httpx.Request) -> httpx.Response:
        delivery = WebhookRequest(
            method=request.method,
            url=str(request.url),
            headers={key.lower(): value for key, value in request.headers.items()},
            body=request.content,
            received_at=clock.now,
        )
        hints = verifier.verify(delivery)
        verified.append([f"{hint.object_id} {hint.kind} {hint.event_id}" for hint in hints])
        bodies.append(json.loads(request.content))
        return httpx.Response(204)

    deal = emulator.add_deal({"dealname": "Won"})
    async with httpx.AsyncClient(transport=httpx.MockTransport(receive)) as hooks:
        emulator.subscribe(HOOK_URL, hooks)
        await emulator.set_deal_properties(deal, {"dealstage": "closedwon"})
        clock.advance(minutes=10)
        status = await emulator.redeliver_last()

    stored = emulator.deal(deal)["properties"]
    assert stored["hs_is_closed_won"] == "true"
    assert stored["closedate"]
    assert status == 204
    assert len(verified[0]) == 1
    assert verified[0][0].startswith(f"{deal} deal.propertyChange ")
    assert bodies[0][0]["propertyName"] == "dealstage"
    assert bodies[0][0]["propertyValue"] == "closedwon"
    assert verified[1] == verified[0]
    assert bodies[1][0]["attemptNumber"] == 1


def webhook_receiver(clock: Clock, bodies: list[list[dict[str, Any]]]) -> Callable[[httpx.Request], httpx.Response]:
    """A MockTransport handler that verifies each delivery's v3 signature and keeps its events in ``bodies``."""
    verifier = create_verifier(settings(), clock)

    def receive(request: httpx.Request) -> httpx.Response:
        delivery = WebhookRequest(
            method=request.method,
            url=str(request.url),
            headers={key.lower(): value for key, value in request.headers.items()},
            body=request.content,
            received_at=clock.now,
        )
        assert [hint.object_id for hint in verifier.verify(delivery)]
        bodies.append(json.loads(request.content))
        return httpx.Response(200)

    return receive


async def test_a_deal_patched_over_the_api_delivers_its_subscribed_properties_only(
    emulator: HubSpotEmulator, client: httpx.AsyncClient, clock: Clock
) -> None:
    """PATCH /crm/v3/objects/deals/{id} delivers a signed deal.propertyChange per subscribed property changed."""
    bodies: list[list[dict[str, Any]]] = []
    receive = webhook_receiver(clock, bodies)

    deal = emulator.add_deal({"dealname": "Won over the API", "dealstage": "contractsent"})
    auth = {"Authorization": "Bearer pat-emulator"}
    async with httpx.AsyncClient(transport=httpx.MockTransport(receive)) as hooks:
        emulator.subscribe(HOOK_URL, hooks)  # no subscription list: the API delivers nothing
        quiet = await client.patch(
            f"{BASE}/crm/v3/objects/deals/{deal}", json={"properties": {"dealname": "Renamed"}}, headers=auth
        )
        emulator.subscribe(HOOK_URL, hooks, properties=["dealstage", "amount"])
        won = await client.patch(
            f"{BASE}/crm/v3/objects/deals/{deal}",
            json={"properties": {"dealstage": "closedwon", "dealname": "Renamed again"}},
            headers=auth,
        )
        same = await client.patch(
            f"{BASE}/crm/v3/objects/deals/{deal}", json={"properties": {"dealstage": "closedwon"}}, headers=auth
        )
    assert (quiet.status_code, won.status_code, same.status_code) == (200, 200, 200)
    (events,) = bodies  # the unchanged stage sends nothing
    assert [(e["subscriptionType"], e["propertyName"], e["propertyValue"]) for e in events] == [
        ("deal.propertyChange", "dealstage", "closedwon")
    ]
    assert events[0]["objectId"] == int(deal)
    assert events[0]["changeSource"] == "API"
    assert emulator.deal(deal)["properties"]["hs_is_closed_won"] == "true"


# ---------------------------------------------------------------------------- schema (drift guard)


async def test_properties_lists_live_names_and_leaves_out_archived_ones(
    connector: HubSpotConnector, emulator: HubSpotEmulator
) -> None:
    """properties() lists an object type's properties, custom ones included, and not archived ones."""
    emulator.define_property("companies", "legal_name")
    before = await connector.properties("company")
    assert {"name", "city", "hs_object_id", "legal_name"} <= before
    emulator.archive_property("companies", "legal_name")
    after = await connector.properties("company")
    assert before - after == {"legal_name"}
    assert "dealname" in await connector.properties("deal")
    assert "hs_sku" in await connector.properties("line_item")
    assert isinstance(connector, CrmSchema)
    with pytest.raises(ValueError, match="unknown CRM object type 'ticket'"):
        await connector.properties("ticket")


async def test_a_property_archived_over_the_api_leaves_the_list_and_reads(
    client: httpx.AsyncClient, connector: HubSpotConnector, emulator: HubSpotEmulator
) -> None:
    """DELETE /crm/v3/properties archives a custom property (204); it is gone from reads; a default one is refused."""
    ids = seed_deal(emulator)
    auth = {"Authorization": "Bearer pat-emulator"}
    gone = await client.delete(f"{BASE}/crm/v3/properties/deals/po_number", headers=auth)
    refused = await client.delete(f"{BASE}/crm/v3/properties/deals/dealname", headers=auth)
    missing = await client.delete(f"{BASE}/crm/v3/properties/deals/no_such", headers=auth)
    assert (gone.status_code, refused.status_code, missing.status_code) == (204, 400, 404)
    archived = await client.get(f"{BASE}/crm/v3/properties/deals", params={"archived": "true"}, headers=auth)
    assert [prop["name"] for prop in archived.json()["results"]] == ["po_number"]
    assert "po_number" not in await connector.properties("deal")
    record = await connector.fetch_deal(ids["deal"], {"deal": ["po_number"]})
    assert "po_number" not in record.data["deal"]["properties"]


# ---------------------------------------------------------------------------- scopes, setup at start-up

ALL_BUT_SCHEMA_WRITE = (
    "crm.objects.deals.read",
    "crm.objects.deals.write",
    "crm.objects.companies.read",
    "crm.objects.contacts.read",
    "crm.objects.line_items.read",
    "crm.schemas.deals.read",
)


async def test_a_token_without_a_scope_is_refused_403_missing_scopes(clock: Clock) -> None:
    """The emulator answers 403 MISSING_SCOPES naming the scope; the connector raises AuthError naming it too."""
    hub = HubSpotEmulator(rate_limits=False, clock=clock, scopes=ALL_BUT_SCHEMA_WRITE)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=hub.app)) as http:
        raw = await http.post(
            f"{BASE}/crm/v3/properties/deals",
            json={"name": "x", "label": "X", "type": "string", "fieldType": "text", "groupName": "dealinformation"},
            headers={"Authorization": f"Bearer {hub.token}"},
        )
        assert raw.status_code == 403
        body = raw.json()
        assert body["category"] == "MISSING_SCOPES"
        assert body["errors"][0]["context"]["requiredGranularScopes"] == ["crm.schemas.deals.write"]
        connector = build(http, clock, MemoryTokens(hub))
        assert await connector.properties("deal")
        with pytest.raises(AuthError) as caught:
            await connector.ensure_properties()
    message = str(caught.value)
    assert "403" in message
    assert "crm.schemas.deals.write" in message
    assert "private app" in message
    assert hub.token not in message


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503])
async def test_transient_statuses_are_retried(
    client: httpx.AsyncClient, clock: Clock, emulator: HubSpotEmulator, status: int
) -> None:
    """408, 409, 429 and 5xx are retried, waiting exactly a Retry-After."""
    deal = emulator.add_deal({"dealname": "Retry"})
    emulator.faults.add(Fault(kind="status", status=status, retry_after_s=2, path_contains="/objects/deals/"))
    sleeps: list[float] = []
    connector = build(client, clock, MemoryTokens(emulator), sleeps=sleeps)
    assert (await connector.fetch_deal(deal)).object_id == deal
    assert sleeps == [2.0]


async def test_a_400_is_a_record_error_carrying_hubspots_messages(
    connector: HubSpotConnector, emulator: HubSpotEmulator
) -> None:
    """A write HubSpot refuses (400 PROPERTY_DOESNT_EXIST) raises Rejected at once, with HubSpot's message."""
    deal = emulator.add_deal({"dealname": "Refused"})
    with pytest.raises(Rejected) as caught:
        await connector.http.request("PATCH", f"/crm/v3/objects/deals/{deal}", json={"properties": {"nope_x": "1"}})
    assert isinstance(caught.value, RecordError)
    assert caught.value.status == 400
    assert any("nope_x" in message for message in caught.value.messages)
    assert emulator.calls["PATCH /crm/v3/objects/deals/{id}"] == 1


async def test_an_expired_oauth_token_that_stays_refused_is_an_auth_error(
    client: httpx.AsyncClient, clock: Clock, emulator: HubSpotEmulator
) -> None:
    """A 401 after the one renewal raises AuthError saying to re-authorise, never retried further."""
    deal = emulator.add_deal({"dealname": "OAuth"})
    connector = build(client, clock, MemoryTokens(emulator), oauth_settings())
    emulator.faults.add(Fault(kind="status", status=401, path_contains="/objects/deals/", times=2))
    with pytest.raises(AuthError, match="re-authorise the app") as caught:
        await connector.fetch_deal(deal)
    assert str(caught.value).startswith("hubspot: GET /crm/v3/objects/deals/")
    assert emulator.calls["POST /oauth/v3/token"] == 2


async def test_the_configured_refresh_token_is_imported_once_and_replaced_when_changed(
    client: httpx.AsyncClient, clock: Clock, emulator: HubSpotEmulator
) -> None:
    """Same rule as Xero: first use imports it; a restart with the same value keeps the store; a new value replaces it."""
    deal = emulator.add_deal({"dealname": "Import"})
    tokens = MemoryTokens(emulator)
    await build(client, clock, tokens, oauth_settings()).fetch_deal(deal)
    first = dict(tokens.tokens or {})
    assert first["imported_sha256"] == hashlib.sha256(b"emulator-refresh").hexdigest()
    await build(client, clock, tokens, oauth_settings()).fetch_deal(deal)
    assert emulator.calls["POST /oauth/v3/token"] == 1
    assert tokens.tokens == first

    stale = {**first, "imported_sha256": hashlib.sha256(b"an-older-refresh").hexdigest()}
    tokens.tokens = stale
    with structlog.testing.capture_logs() as logs:
        await build(client, clock, tokens, oauth_settings()).fetch_deal(deal)
    assert emulator.calls["POST /oauth/v3/token"] == 2
    assert (tokens.tokens or {})["imported_sha256"] == first["imported_sha256"]
    assert (tokens.tokens or {})["access_token"] != first["access_token"]
    assert [entry.get("replaced") for entry in logs if entry["event"] == "token_imported"] == [True]
    assert "emulator-refresh" not in json.dumps(logs, default=str)


@pytest.mark.parametrize("given", ["http://hubspot.test", "http://hubspot.test/", "http://hubspot.test//"])
def test_base_url_takes_the_host_with_or_without_a_trailing_slash(given: str) -> None:
    """base_url is kept without a trailing slash, so paths join as {base_url}/crm/v3/..."""
    assert settings(base_url=given).base_url == BASE


def _config_at(tmp_path: Path, hub_url: str, hub: HubSpotEmulator) -> Path:
    path = write_config(tmp_path, f"sqlite:///{tmp_path / 's.db'}", hub, XeroEmulator())
    path.write_text(path.read_text(encoding="utf-8").replace("http://hubspot.test", hub_url), encoding="utf-8")
    return path


def test_setup_hubspot_prints_each_property_created_then_present(tmp_path: Path) -> None:
    """`syncd setup hubspot` lists each property created; run again, each already present."""
    hub = HubSpotEmulator(rate_limits=False)
    with serve_in_thread(hub.app) as url:
        config = _config_at(tmp_path, url, hub)
        first = invoke("setup", "hubspot", "--config", str(config))
        second = invoke("setup", "hubspot", "--config", str(config))
    assert first.exit_code == 0, first.output
    assert "property group 'syncd' created" in first.output
    for name in BillingProperty:
        assert re.search(rf"{name.value}\s+created", first.output)
        assert re.search(rf"{name.value}\s+already present", second.output)
    assert "7 created, 0 already present" in first.output
    assert "0 created, 7 already present" in second.output


def test_with_company_status_setup_and_start_create_the_company_properties_too(tmp_path: Path) -> None:
    """[collections] company_status: `syncd setup hubspot` creates the company properties once; without
    crm.schemas.companies.write, `syncd run` refuses to start naming it."""
    hub = HubSpotEmulator(rate_limits=False)
    with serve_in_thread(hub.app) as url:
        config = _config_at(tmp_path, url, hub)
        config.write_text(config.read_text(encoding="utf-8") + "\n[collections]\ncompany_status = true\n")
        first = invoke("setup", "hubspot", "--config", str(config))
        second = invoke("setup", "hubspot", "--config", str(config))
    assert first.exit_code == 0, first.output
    assert "hubspot: company property group 'syncd' created" in first.output
    for name in CompanyProperty:
        assert re.search(rf"{name.value}\s+created", first.output)
        assert re.search(rf"{name.value}\s+already present", second.output)
    assert f"0 created, {len(CompanyProperty)} already present" in second.output

    granted = (*ALL_BUT_SCHEMA_WRITE, "crm.schemas.deals.write", "crm.schemas.companies.read")
    scoped = HubSpotEmulator(rate_limits=False, scopes=granted)
    (tmp_path / "b").mkdir()
    with serve_in_thread(scoped.app) as url:
        config = _config_at(tmp_path / "b", url, scoped)
        config.write_text(config.read_text(encoding="utf-8") + "\n[collections]\ncompany_status = true\n")
        result = invoke("run", "--config", str(config))
    assert result.exit_code == 1
    (line,) = [text for text in result.output.splitlines() if "crm.schemas.companies.write" in text]
    assert "deal and company properties" in line


def test_setup_hubspot_without_the_scope_names_it(tmp_path: Path) -> None:
    """Without crm.schemas.deals.write, `syncd setup hubspot` exits 1 naming the scope."""
    hub = HubSpotEmulator(rate_limits=False, scopes=ALL_BUT_SCHEMA_WRITE)
    with serve_in_thread(hub.app) as url:
        result = invoke("setup", "hubspot", "--config", str(_config_at(tmp_path, url, hub)))
    assert result.exit_code == 1
    assert "crm.schemas.deals.write" in result.output


def test_syncd_run_refuses_to_start_without_the_scope(tmp_path: Path) -> None:
    """`syncd run` creates the properties before its workers; lacking the scope, it exits 1 with one line naming it."""
    hub = HubSpotEmulator(rate_limits=False, scopes=ALL_BUT_SCHEMA_WRITE)
    with serve_in_thread(hub.app) as url:
        result = invoke("run", "--config", str(_config_at(tmp_path, url, hub)))
    assert result.exit_code == 1
    (line,) = [text for text in result.output.splitlines() if "crm.schemas.deals.write" in text]
    assert "syncd setup hubspot" in line
    assert "Traceback" not in result.output


async def test_the_daemon_creates_the_properties_before_its_workers(tmp_path: Path, clock: Clock) -> None:
    """Starting the daemon creates the billing properties; a write-back right after needs no manual setup."""
    hub = HubSpotEmulator(rate_limits=False, clock=clock)
    xero = XeroEmulator(rate_limits=False)
    config = load_config(write_config(tmp_path, f"sqlite:///{tmp_path / 's.db'}", hub, xero))
    mounts = {
        "http://hubspot.test": httpx.ASGITransport(app=hub.app),
        "http://xero.test": httpx.ASGITransport(app=xero.app),
    }
    daemon = Daemon(config, mounts=mounts, poll=False, workers=0)
    async with daemon.lifespan():
        names = await daemon.runtime.connectors["hubspot"].properties("deal")
        assert {name.value for name in BillingProperty} <= names
        assert hub.calls["POST /crm/v3/properties/deals"] == len(BillingProperty)


async def test_replicas_import_and_refresh_once_on_the_encrypted_store(
    client: httpx.AsyncClient, clock: Clock, emulator: HubSpotEmulator, db_url: str
) -> None:
    """On the real token store, two replicas starting at once import and refresh once; a refused new value changes nothing."""
    deal = emulator.add_deal({"dealname": "Replicas"})
    store = Store.open(db_url)
    await store.migrate()
    try:
        tokens = DbTokenStore(store, "hubspot", Fernet.generate_key().decode())
        one = build(client, clock, tokens, oauth_settings())  # type: ignore[arg-type]
        two = build(client, clock, tokens, oauth_settings())  # type: ignore[arg-type]
        await asyncio.gather(one.fetch_deal(deal), two.fetch_deal(deal))
        assert emulator.calls["POST /oauth/v3/token"] == 1
        saved = await tokens.load()
        assert saved is not None
        assert saved["imported_sha256"] == hashlib.sha256(b"emulator-refresh").hexdigest()

        refused = build(client, clock, tokens, oauth_settings(refresh_token="not-the-apps-refresh"))  # type: ignore[arg-type]
        with structlog.testing.capture_logs() as logs, pytest.raises(AuthError, match="invalid_grant"):
            await refused.fetch_deal(deal)
        assert await tokens.load() == saved
        assert "token_imported" not in [entry["event"] for entry in logs]
    finally:
        await store.close()


class InFlight(httpx.AsyncBaseTransport):
    """Counts the requests in flight at once through the emulator's transport."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.now = 0
        self.most = 0
        self.paths: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.now += 1
        self.most = max(self.most, self.now)
        self.paths.append(re.sub(r"/\d+", "/{id}", request.url.path))
        try:
            return await self.inner.handle_async_request(request)
        finally:
            self.now -= 1


async def test_fetch_deal_reads_company_contacts_and_line_items_at_once(
    clock: Clock, emulator: HubSpotEmulator
) -> None:
    """After the deal, its company, contacts and line items are read side by side (three chains at once).

    Each answer is held back 20 ms (an emulator latency fault) so that reads sent together
    are seen in flight together; the record is the same as read one after another.
    """
    ids = seed_deal(emulator)
    emulator.faults.add(Fault(kind="latency", latency_s=0.02, path_contains="/crm/", times=None))
    counting = InFlight(httpx.ASGITransport(app=emulator.app))
    async with httpx.AsyncClient(transport=counting) as http:
        record = await build(http, clock, MemoryTokens(emulator)).fetch_deal(ids["deal"])
    assert counting.most == 3
    assert counting.paths[0] == "/crm/v3/objects/deals/{id}"  # the deal first: the rest depend on it
    assert sorted(counting.paths[1:4]) == [
        "/crm/v3/objects/line_items/batch/read",
        "/crm/v4/objects/deals/{id}/associations/companies",
        "/crm/v4/objects/deals/{id}/associations/contacts",
    ]
    assert record.data["company"]["id"] == ids["acme"]
    assert {contact["id"] for contact in record.data["contacts"]} == {ids["ann"], ids["bob"]}
    assert len(record.data["line_items"]) == 2


async def test_a_read_refused_beside_others_is_raised_after_they_end(
    connector: HubSpotConnector, emulator: HubSpotEmulator
) -> None:
    """The company read refused: its error is raised, and the contacts and line items read side by side still ended.

    No read is left running behind the caller (each one's outcome is collected first).
    """
    ids = seed_deal(emulator)
    emulator.faults.add(Fault(kind="status", status=400, method="GET", path_contains="/crm/v3/objects/companies/"))
    with pytest.raises(FatalError):
        await connector.fetch_deal(ids["deal"])
    assert emulator.calls["POST /crm/v3/objects/contacts/batch/read"] == 1
    assert emulator.calls["POST /crm/v3/objects/line_items/batch/read"] == 1
