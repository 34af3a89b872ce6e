"""The HubSpot CRM connector: deals with their primary company, contacts and line items.

Endpoints used (HubSpot CRM v3/v4; every path is relative to ``base_url``):

* ``GET /crm/v3/objects/deals/{id}?properties=…&associations=…`` and
  ``GET /crm/v3/objects/deals?limit=&after=`` —
  https://developers.hubspot.com/docs/api-reference/legacy/crm/objects/deals/guide
  (``properties``/``associations`` are comma-separated lists; list pages hold at most 100).
  The response's ``associations`` keys are HubSpot's names, not the ones passed: asking
  for ``line_items`` returns the key ``"line items"`` (observed in real responses, e.g.
  chithien0909/hubspot-sdk-go ``hubspot/associations.go``), so keys are normalised.
* ``GET /crm/v4/objects/deals/{id}/associations/{companies|contacts}`` — association types
  with labels; type ``5`` is "Deal to primary company"
  (https://developers.hubspot.com/docs/api-reference/legacy/crm/associations/associate-records/guide).
* ``POST /crm/v3/objects/{type}/batch/read`` — up to 100 ids per call; 50 when
  ``propertiesWithHistory`` is asked (:data:`HISTORY_BATCH_LIMIT`).
* ``POST /crm/v4/associations/deals/{companies|contacts|line_items}/batch/read`` — each
  deal's associations with types and labels, paged per deal with ``{id, after}`` inputs,
  up to 1,000 inputs (:meth:`HubSpotConnector.fetch_deals`).
* ``POST /crm/v3/objects/deals/batch/update`` — up to 100 ``{id, properties}`` inputs, all
  or nothing (:meth:`HubSpotConnector.write_billing_statuses`).
* ``POST /crm/v3/objects/deals/search`` — filters on ``hs_lastmodifieddate`` (epoch-ms
  string values), one sort, ``limit`` ≤ 200, ``after`` offsets, 10,000 results per query
  at most (400 beyond), 5 requests per second
  (https://developers.hubspot.com/docs/api-reference/legacy/crm/search-the-crm).
* ``PATCH /crm/v3/objects/companies/{id}`` — a client detail owned by another system
  (the client record, :mod:`syncd.engine.clients`) written onto the company.
* ``PATCH /crm/v3/objects/deals/{id}`` and the properties API
  (``/crm/v3/properties/deals``, ``/crm/v3/properties/deals/groups``) —
  https://developers.hubspot.com/docs/api-reference/legacy/crm/properties/guide.
* ``GET /crm/v3/properties/{objectType}`` ("Read all existing properties for the
  specified object type", ``results[].name``) for the drift guard —
  https://developers.hubspot.com/docs/api-reference/legacy/crm/properties/get-properties.
* ``PATCH /crm/v3/objects/companies/{id}`` and ``/crm/v3/properties/companies`` (and its
  ``/groups``) for a company's receivables (:meth:`HubSpotConnector.write_company_status`);
  the same properties guide. Needs ``crm.objects.companies.write`` and
  ``crm.schemas.companies.write`` (docs/credentials.md).
* Tasks: ``POST /crm/v3/objects/tasks`` (``hs_timestamp`` required, the task's due
  time; ``hs_task_subject``, ``hs_task_body``, ``hs_task_status`` ``NOT_STARTED`` or
  ``COMPLETED``, ``hs_task_priority``, ``hs_task_type``, ``hubspot_owner_id``; an
  ``associations`` list of ``{"to": {"id"}, "types": [{"associationCategory",
  "associationTypeId"}]}``), ``PATCH /crm/v3/objects/tasks/{id}`` and
  ``POST /crm/v3/objects/tasks/search`` —
  https://developers.hubspot.com/docs/api-reference/legacy/crm/activities/tasks/guide,
  whose scope requirements are ``crm.objects.contacts.read``/``.write``. Association
  types 216 (task to deal) and 192 (task to company) are HubSpot-defined
  (https://developers.hubspot.com/docs/api-reference/legacy/crm/associations/associate-records/guide,
  "Association type ID values", table "Task to object"; the SDK's
  ``hubspot.crm.AssociationType.TASK_TO_DEAL``/``TASK_TO_COMPANY`` agree). The owner of a deal or company is its
  ``hubspot_owner_id`` property.
* Rate limits: 100 requests per 10 s for Free/Starter accounts (the lowest published
  burst limit; https://developers.hubspot.com/docs/developer-tooling/platform/usage-guidelines),
  search excluded and limited separately.
"""

from __future__ import annotations

import asyncio
import enum
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import httpx
import structlog
from pydantic import SecretStr, field_validator, model_validator

from connectors.hubspot.auth import BearerToken, HubSpotErrors, check_credentials, oauth_tokens
from connectors.hubspot.models import (
    AssociatedObject,
    AssociationBatch,
    AssociationCollection,
    AssociationPage,
    BatchRead,
    CrmObject,
    ObjectPage,
    PollCursor,
    PropertyList,
    SearchPage,
    epoch_ms,
    iso_ms,
    parse_hubspot_time,
)
from connectors.hubspot.webhooks import HubSpotWebhookVerifier
from syncd.core.errors import ConfigError, NotFound, RecordError, RetriableError, SyncdError
from syncd.core.interfaces import (
    Capability,
    ChangeHint,
    ChangePage,
    CompanyBillingStatus,
    Crm,
    CrmSchema,
    DealBillingStatus,
    FollowUpTask,
    InvoiceState,
    ReadsDealsInBatches,
    SourceRecord,
    UpdatesCompanies,
    WebhookVerifier,
    WritesStatusInBatches,
)
from syncd.plumbing.http import RateLimit, Rejected, VendorHttp, within
from syncd.plumbing.registry import ConnectionSettings, ConnectorContext, ConnectorSpec, secret_value
from syncd.plumbing.tokens import TokenAuth

log = structlog.get_logger("connectors.hubspot")

# Properties read beside what the mapping asks for. Default property names per HubSpot's
# knowledge base (hubspots-default-deal-properties, hubspot-crm-default-company-properties,
# hubspots-default-contact-properties, hubspots-default-line-item-properties).
DEAL_PROPERTIES = (
    "dealname",
    "amount",
    "dealstage",
    "pipeline",
    "closedate",
    "createdate",
    "hs_is_closed_won",
    "hs_lastmodifieddate",
    "deal_currency_code",
)
COMPANY_PROPERTIES = ("name", "domain", "address", "address2", "city", "state", "zip", "country", "phone")
CONTACT_PROPERTIES = ("firstname", "lastname", "email", "phone", "jobtitle")
LINE_ITEM_PROPERTIES = ("name", "description", "quantity", "price", "amount", "hs_sku", "hs_product_id")

# Canonical object type -> HubSpot's object type name in CRM v3 paths.
OBJECT_TYPES = {"deal": "deals", "company": "companies", "contact": "contacts", "line_item": "line_items"}

_T = TypeVar("_T")
PRIMARY_COMPANY_TYPE_ID = 5  # "Deal to primary company" (associations guide, type ID table)
PRIMARY_LABEL = "primary"
PAGE_LIMIT = 100  # list endpoints return at most 100 per page; search allows 200
BATCH_LIMIT = 100  # batch read: up to 100 ids per request
V4_PAGE_LIMIT = 500
# "The maximum number of inputs supported in a batch request for property histories is
# 50": HubSpot's 400 answer to a batch read with propertiesWithHistory and more inputs,
# quoted in PipedreamHQ/pipedream pull request #8462 (the usual batch cap is 100).
HISTORY_BATCH_LIMIT = 50
# v4 association batch reads take at most 1,000 inputs (effective 2025-02-10:
# https://developers.hubspot.com/changelog/bug-fix-batch-read-limit-for-hubspot-associations-api).
V4_BATCH_LIMIT = 1000

BILLING_GROUP = "syncd"
BILLING_GROUP_LABEL = "syncd billing"
STATUS_OPTIONS = (*[state.value for state in InvoiceState], "overdue")


class BillingProperty(enum.StrEnum):
    """The deal properties syncd writes (created by :meth:`HubSpotConnector.ensure_properties`)."""

    INVOICE_NUMBER = "syncd_invoice_number"
    INVOICE_STATUS = "syncd_invoice_status"
    AMOUNT_DUE = "syncd_amount_due"
    INVOICE_CURRENCY = "syncd_invoice_currency"
    INVOICE_DUE_DATE = "syncd_invoice_due_date"
    DAYS_OVERDUE = "syncd_days_overdue"
    TOTAL_INVOICED = "syncd_total_invoiced"


def _property_definition(name: BillingProperty) -> dict[str, Any]:
    """``type``/``fieldType`` pairs per the properties guide's table."""
    labels = {
        BillingProperty.INVOICE_NUMBER: ("Invoice number", "string", "text"),
        BillingProperty.INVOICE_STATUS: ("Invoice status", "enumeration", "select"),
        BillingProperty.AMOUNT_DUE: ("Amount due", "number", "number"),
        BillingProperty.INVOICE_CURRENCY: ("Invoice currency", "string", "text"),
        BillingProperty.INVOICE_DUE_DATE: ("Invoice due date", "date", "date"),
        BillingProperty.DAYS_OVERDUE: ("Days overdue", "number", "number"),
        BillingProperty.TOTAL_INVOICED: ("Total invoiced", "number", "number"),
    }
    label, kind, field_type = labels[name]
    body: dict[str, Any] = {
        "name": name.value,
        "label": label,
        "type": kind,
        "fieldType": field_type,
        "groupName": BILLING_GROUP,
        "description": f"{label}, written by syncd from the invoicing tool.",
    }
    if kind == "enumeration":
        body["options"] = [
            {"label": value.replace("_", " ").capitalize(), "value": value, "displayOrder": order, "hidden": False}
            for order, value in enumerate(STATUS_OPTIONS)
        ]
    return body


class CompanyProperty(enum.StrEnum):
    """The company properties syncd writes (created by :meth:`HubSpotConnector.ensure_company_properties`)."""

    CURRENCY = "syncd_currency"
    OUTSTANDING = "syncd_outstanding_balance"
    OVERDUE = "syncd_overdue_balance"
    OLDEST_OVERDUE_DAYS = "syncd_oldest_overdue_days"
    AGING_CURRENT = "syncd_aging_current"
    AGING_1_30 = "syncd_aging_1_30"
    AGING_31_60 = "syncd_aging_31_60"
    AGING_61_90 = "syncd_aging_61_90"
    AGING_90_PLUS = "syncd_aging_90_plus"
    UNALLOCATED_CREDIT = "syncd_unallocated_credit"
    LAST_PAYMENT_DATE = "syncd_last_payment_date"
    AT_RISK = "syncd_at_risk"
    AT_RISK_REASON = "syncd_at_risk_reason"
    OTHER_CURRENCIES = "syncd_other_currencies"


_COMPANY_LABELS: dict[CompanyProperty, tuple[str, str, str]] = {
    CompanyProperty.CURRENCY: ("Receivables currency", "string", "text"),
    CompanyProperty.OUTSTANDING: ("Outstanding balance", "number", "number"),
    CompanyProperty.OVERDUE: ("Overdue balance", "number", "number"),
    CompanyProperty.OLDEST_OVERDUE_DAYS: ("Oldest overdue (days)", "number", "number"),
    CompanyProperty.AGING_CURRENT: ("Aging: current", "number", "number"),
    CompanyProperty.AGING_1_30: ("Aging: 1-30 days", "number", "number"),
    CompanyProperty.AGING_31_60: ("Aging: 31-60 days", "number", "number"),
    CompanyProperty.AGING_61_90: ("Aging: 61-90 days", "number", "number"),
    CompanyProperty.AGING_90_PLUS: ("Aging: 90+ days", "number", "number"),
    CompanyProperty.UNALLOCATED_CREDIT: ("Unallocated credit", "number", "number"),
    CompanyProperty.LAST_PAYMENT_DATE: ("Last payment date", "date", "date"),
    CompanyProperty.AT_RISK: ("Payment at risk", "bool", "booleancheckbox"),
    CompanyProperty.AT_RISK_REASON: ("Payment risk reason", "string", "text"),
    CompanyProperty.OTHER_CURRENCIES: ("Receivables in other currencies", "string", "textarea"),
}


def _company_property_definition(name: CompanyProperty) -> dict[str, Any]:
    """A company property body.

    A ``bool`` property is a ``booleancheckbox`` (the ``type``/``fieldType`` pair of
    https://developers.hubspot.com/docs/api-reference/latest/crm/properties/create-property);
    its two options are the values ``true`` and ``false`` written by :func:`company_values`.
    """
    label, kind, field_type = _COMPANY_LABELS[name]
    body: dict[str, Any] = {
        "name": name.value,
        "label": label,
        "type": kind,
        "fieldType": field_type,
        "groupName": BILLING_GROUP,
        "description": f"{label}, written by syncd from the invoicing tool (its client's invoices and credit notes).",
    }
    if kind == "bool":
        body["options"] = [
            {"label": "Yes", "value": "true", "displayOrder": 0, "hidden": False},
            {"label": "No", "value": "false", "displayOrder": 1, "hidden": False},
        ]
    return body


def company_values(status: CompanyBillingStatus) -> dict[str, str]:
    """The company property values for ``status``: decimal text, ISO dates, ``""`` to clear."""
    money = {
        CompanyProperty.OUTSTANDING: status.outstanding_balance,
        CompanyProperty.OVERDUE: status.overdue_balance,
        CompanyProperty.AGING_CURRENT: status.aging_current,
        CompanyProperty.AGING_1_30: status.aging_1_30,
        CompanyProperty.AGING_31_60: status.aging_31_60,
        CompanyProperty.AGING_61_90: status.aging_61_90,
        CompanyProperty.AGING_90_PLUS: status.aging_90_plus,
        CompanyProperty.UNALLOCATED_CREDIT: status.unallocated_credit,
    }
    values = {name.value: format(amount, "f") for name, amount in money.items()}
    values.update(
        {
            CompanyProperty.CURRENCY.value: status.currency,
            CompanyProperty.OLDEST_OVERDUE_DAYS.value: str(status.oldest_overdue_days),
            CompanyProperty.LAST_PAYMENT_DATE.value: status.last_payment_date.isoformat()
            if status.last_payment_date
            else "",
            CompanyProperty.AT_RISK.value: "true" if status.at_risk else "false",
            CompanyProperty.AT_RISK_REASON.value: status.at_risk_reason or "",
            CompanyProperty.OTHER_CURRENCIES.value: status.other_currencies or "",
        }
    )
    return values


TASK_TO_DEAL_TYPE_ID = 216  # "Task to deal": the associate-records guide, "Association type ID values"
TASK_TO_COMPANY_TYPE_ID = 192  # "Task to company": the same table (and hubspot.crm.AssociationType)
OWNER_PROPERTY = "hubspot_owner_id"
TASK_OPEN = "NOT_STARTED"
TASK_DONE = "COMPLETED"


def task_stamp(key: str) -> str:
    """The line a follow-up task's body ends with, so a retry can recognise the task."""
    return f"(syncd {key})"


class HubSpotSettings(ConnectionSettings):
    """``[connections.NAME]`` for ``connector = "hubspot"``.

    Exactly one way to authenticate: a private-app ``token``, or OAuth with
    ``client_id`` + ``client_secret`` + ``refresh_token``.

    Attributes:
        base_url: API root (``https://api.hubapi.com``, with or without a trailing slash;
            an emulator or proxy in tests).
        token: private-app access token.
        client_id / client_secret / refresh_token: OAuth app credentials and the refresh
            token, imported once into the token store (a changed value replaces the
            stored set; the same value never overwrites it).
        token_url: OAuth token endpoint.
        webhook_secret: the app's client secret, the key of v3 webhook signatures
            (defaults to ``client_secret`` when unset).
        rate_limit_per_10s: requests per 10 seconds (HubSpot's burst limit; ``None`` = off).
        search_rate_per_s: search requests per second (``None`` = off).
        poll_lag_s: seconds a change may take to show in search results; polls re-read
            that far back so late-indexed changes are not missed.
        search_max_results: HubSpot's cap on results per search query (lower only in tests).
    """

    connector: str = "hubspot"
    base_url: str = "https://api.hubapi.com"
    token: SecretStr | None = None
    client_id: str | None = None
    client_secret: SecretStr | None = None
    refresh_token: SecretStr | None = None
    # manage-oauth-tokens guide; a URL, not a secret
    token_url: str = "https://api.hubspot.com/oauth/v3/token"  # noqa: S105
    webhook_secret: SecretStr | None = None
    rate_limit_per_10s: int | None = 100
    search_rate_per_s: int | None = 5
    poll_lag_s: int = 30
    search_max_results: int = 10_000

    @field_validator("base_url")
    @classmethod
    def _api_root(cls, value: str) -> str:
        # Paths are joined as ``{base_url}/crm/v3/...``: no trailing slash.
        return value.rstrip("/")

    @model_validator(mode="after")
    def _one_auth_method(self) -> HubSpotSettings:
        oauth = [self.client_id, self.client_secret, self.refresh_token]
        if self.token is not None and any(value is not None for value in oauth):
            raise ValueError(
                "set either token (private app) or client_id/client_secret/refresh_token (OAuth), not both"
            )
        if self.token is None and not all(value is not None for value in oauth):
            names = ("client_id", "client_secret", "refresh_token")
            absent = [name for name, value in zip(names, oauth, strict=True) if value is None]
            raise ValueError(
                "no HubSpot credentials: set token (private app access token), or all of "
                f"client_id, client_secret and refresh_token for OAuth (missing: {', '.join(absent)})"
            )
        return self


@dataclass(frozen=True, kw_only=True)
class PropertySetup:
    """What :meth:`HubSpotConnector.ensure_properties` did.

    Attributes:
        group_created: whether the ``syncd`` property group was created now.
        created: deal properties created now.
        present: deal properties that already existed.
    """

    group_created: bool
    created: tuple[str, ...]
    present: tuple[str, ...]


class HubSpotConnector:
    """HubSpot as syncd's :class:`~syncd.core.interfaces.Crm`.

    Args:
        settings: the connection's settings.
        http: the connection's HTTP plumbing, bound to ``settings.base_url``.
        connection: the connection name.
        clock: current aware UTC time.
    """

    capabilities = frozenset({Capability.WEBHOOKS})

    def __init__(
        self, *, settings: HubSpotSettings, http: VendorHttp, connection: str, clock: Callable[[], datetime]
    ) -> None:
        self.settings = settings
        self.http = http
        self.connection = connection
        self.clock = clock
        # deal id → modification stamp our own last write-back gave it (see poll_changes)
        self._own_writes: OrderedDict[str, str] = OrderedDict()

    # -- reads -------------------------------------------------------------------

    async def fetch_deal(self, deal_id: str, properties: Mapping[str, Sequence[str]] | None = None) -> SourceRecord:
        """Re-read one deal with its primary company, contacts and line items.

        Raises:
            NotFound: no deal with that id.
        """
        wanted = _Wanted.of(properties)
        deal = await self._read_deal(deal_id, wanted.deal)
        links = _associations(deal)
        # The company, the contacts and the line items depend on the deal only, not on each
        # other: read at once, the deal's record costs three round trips instead of six.
        # Every read runs to its end; the first error, in this order, is raised.
        company, contacts, items = await asyncio.gather(
            self._primary_company(deal_id, links, wanted.company),
            self._contacts(deal_id, links, wanted.contact),
            self._line_items(deal_id, links, wanted.line_item),
            return_exceptions=True,
        )
        return self._record(deal, _deal_data(deal, _value(company), _value(contacts), _value(items)))

    async def fetch_deals(
        self, deal_ids: Sequence[str], properties: Mapping[str, Sequence[str]] | None = None
    ) -> Mapping[str, SourceRecord | SyncdError]:
        """Each deal as :meth:`fetch_deal` returns it, by deal id, in a constant number of calls.

        One batch read of the deals (with ``dealstage`` history), one v4 batch association
        read each for companies, contacts and line items, and one batch read each of those
        (more only past a chunk size or an association page).

        A deal HubSpot does not return maps to :class:`NotFound`, as does a deal whose
        primary company is gone (:meth:`fetch_deal` raises then too). An error of a whole
        request (auth, 429 or 5xx after retries) is raised.
        """
        wanted = _Wanted.of(properties)
        ids = list(dict.fromkeys(deal_ids))
        deals = {deal.id: deal for deal in await self._batch_read_deals(ids, wanted.deal)}
        related = await self._related(list(deals), wanted)
        return {deal_id: self._batch_record(deal_id, deals.get(deal_id), related) for deal_id in ids}

    async def _related(self, deal_ids: Sequence[str], wanted: _Wanted) -> _Related:
        """The deals' associations (v4 batch reads) and the associated records (batch reads).

        The three chains (companies, contacts, line items: each an association read, then
        a read of what it found) depend only on the deals, so they run side by side: two
        round trips instead of six, as in :meth:`fetch_deal`.
        """

        def primaries(links: Mapping[str, Sequence[AssociatedObject]]) -> list[str]:
            return _to_ids([[primary for associated in links.values() if (primary := _primary(associated))]])

        def every(links: Mapping[str, Sequence[AssociatedObject]]) -> list[str]:
            return _to_ids(links.values())

        async def chain(
            to_type: str,
            ids: Callable[[Mapping[str, Sequence[AssociatedObject]]], list[str]],
            properties: Sequence[str],
        ) -> tuple[dict[str, list[AssociatedObject]], dict[str, CrmObject]]:
            links = await self._v4_batch(deal_ids, to_type)
            return links, await self._read_by_id(to_type, ids(links), properties)

        companies, contacts, line_items = await asyncio.gather(
            chain("companies", primaries, wanted.company),
            chain("contacts", every, wanted.contact),
            chain("line_items", every, wanted.line_item),
            return_exceptions=True,
        )
        found = {"companies": _value(companies), "contacts": _value(contacts), "line_items": _value(line_items)}
        return _Related(
            links={to_type: links for to_type, (links, _records) in found.items()},
            companies=found["companies"][1],
            contacts=found["contacts"][1],
            line_items=found["line_items"][1],
        )

    def _batch_record(self, deal_id: str, deal: CrmObject | None, related: _Related) -> SourceRecord | NotFound:
        """One deal's record from a batch, or :class:`NotFound` for it or for its primary company."""
        primary = _primary(related.links["companies"].get(deal_id, ()))
        company = related.companies.get(str(primary.to_object_id)) if primary is not None else None
        if deal is None or (primary is not None and company is None):
            return self._missing(deal_id, primary)
        return self._record(deal, _deal_data(deal, company, related.contacts_of(deal_id), related.items_of(deal_id)))

    async def iter_deals(self) -> AsyncIterator[SourceRecord]:
        """Every deal from the list endpoint, page by page (no associations read)."""
        after: str | None = None
        while True:
            params: dict[str, Any] = {"limit": PAGE_LIMIT, "properties": ",".join(DEAL_PROPERTIES)}
            if after is not None:
                params["after"] = after
            response = await self.http.request("GET", "/crm/v3/objects/deals", params=params)
            page = ObjectPage.model_validate_json(response.content)
            for deal in page.results:
                yield self._record(deal, {"deal": deal.as_data(), "company": None, "contacts": [], "line_items": []})
            if page.paging is None or page.paging.next is None:
                return
            after = page.paging.next.after

    async def poll_changes(self, cursor: str | None, *, since: datetime | None = None) -> ChangePage:
        """Deals changed since ``cursor``, one search page per call.

        The search is ascending on ``hs_lastmodifieddate`` from the cursor's lower bound.
        When paging would pass HubSpot's per-query cap the window restarts at the last
        modification time seen; at the end of a window the bound moves to the newest
        change seen, but never later than ``now - poll_lag_s`` (search indexing lags).
        Changes on the bound are hinted again with the same ``event_id`` (harmless).
        """
        now_ms = epoch_ms(self.clock())
        if cursor is not None:
            window = PollCursor.load(cursor, connection=self.connection)
        elif since is not None:
            window = PollCursor(gte_ms=min(now_ms, epoch_ms(since)))
        else:
            return ChangePage(hints=(), cursor=PollCursor(gte_ms=now_ms).dump(), more=False)
        page = await self._search_changed(window)
        hints = tuple(self._hint(deal) for deal in page.results if not self._is_own_write(deal))
        following, more = self._next_cursor(window, page, now_ms)
        return ChangePage(hints=hints, cursor=following.dump(), more=more)

    async def check(self) -> list[str]:
        """One cheap authenticated read; problems as sentences (no token is ever included).

        With OAuth, a fresh token request with the configured credentials comes first,
        so a wrong client secret is reported even while a stored access token works.
        """
        try:
            if self.settings.token is None:
                await check_credentials(
                    client=self.http.client,
                    token_url=self.settings.token_url,
                    client_id=self.settings.client_id or "",
                    client_secret=secret_value(self.settings.client_secret),
                    refresh_token=secret_value(self.settings.refresh_token),
                )
            await self.http.request("GET", "/crm/v3/objects/deals", params={"limit": 1}, retry=False)
        except NotFound:
            return [f"{self.connection}: {self.settings.base_url} has no CRM deals API; check base_url"]
        except SyncdError as exc:  # every expected failure is reported, not raised
            return [f"{self.connection}: {exc}"]
        return []

    async def properties(self, object_type: str) -> frozenset[str]:
        """The internal names of ``object_type``'s live properties (the drift guard reads them).

        ``GET /crm/v3/properties/{objectType}`` without ``archived``: HubSpot's
        ``archived`` query flag defaults to false, so properties moved to the recycling
        bin (``DELETE /crm/v3/properties/{objectType}/{name}``, "Archive a property":
        https://developers.hubspot.com/docs/api-reference/legacy/crm/properties/delete-property)
        are not listed. The default is documented for the objects endpoints ("archived
        boolean default:false",
        https://developers.hubspot.com/docs/api-reference/latest/crm/objects/companies/get-companies)
        and HubSpot's SDKs default it to false here too; the properties page itself does
        not spell it out (not confirmed there).

        Raises:
            ValueError: ``object_type`` is not ``deal``, ``company``, ``contact`` or ``line_item``.
        """
        plural = OBJECT_TYPES.get(object_type)
        if plural is None:
            raise ValueError(f"unknown CRM object type {object_type!r}; expected one of {', '.join(OBJECT_TYPES)}")
        response = await self.http.request("GET", f"/crm/v3/properties/{plural}")
        return frozenset(prop.name for prop in PropertyList.model_validate_json(response.content).results)

    # -- writes ------------------------------------------------------------------

    async def write_billing_status(self, deal_id: str, status: DealBillingStatus) -> None:
        """Write the deal's standing onto it: invoice numbers, state, amount due, currency, due date, aging, total invoiced.

        Date properties take an ISO ``YYYY-MM-DD`` (properties guide); numbers are sent as
        plain decimal strings; an empty string clears a value.

        Raises:
            RecordError: the state is not one of the status property's options.
            NotFound: no deal with that id.
        """
        values = self._status_values(deal_id, status)
        response = await self.http.request("PATCH", f"/crm/v3/objects/deals/{deal_id}", json={"properties": values})
        self._remember_write(CrmObject.model_validate_json(response.content))

    async def write_billing_statuses(
        self, statuses: Mapping[str, DealBillingStatus]
    ) -> Mapping[str, SyncdError | None]:
        """Write each deal's standing (as :meth:`write_billing_status`) through ``batch/update``; per deal ``None`` or its error.

        ``POST /crm/v3/objects/deals/batch/update`` takes up to 100 ``{id, properties}``
        inputs. HubSpot documents no partial success for it ("If there are any errors in
        the request, the entire request will fail and no updates will be applied",
        https://developers.hubspot.com/docs/api-reference/legacy/crm/objects/deals/v1/put-deals-v1-batch-async-update.md,
        the batch update of the v1 deals API): a batch refused with a 4xx (an unknown
        deal, a refused value) is split in halves and each half sent again, until the bad
        deal is alone and gets HubSpot's answer as its error. A state that is not an
        option fails that deal before anything is sent.

        Raises:
            AuthError, RetriableError: the whole request failed (401/403, 429 or 5xx
                after retries); every deal of the batch fails alike.
        """
        results: dict[str, SyncdError | None] = {}
        inputs: list[tuple[str, dict[str, str]]] = []
        for deal_id, status in statuses.items():
            try:
                inputs.append((deal_id, self._status_values(deal_id, status)))
            except RecordError as exc:
                results[deal_id] = exc
        for start in range(0, len(inputs), BATCH_LIMIT):
            results.update(await self._update_deals(inputs[start : start + BATCH_LIMIT]))
        return {deal_id: results[deal_id] for deal_id in statuses}

    def _status_values(self, deal_id: str, status: DealBillingStatus) -> dict[str, str]:
        """The billing property values for ``status``.

        Raises:
            RecordError: the state is not one of the status property's options.
        """
        if status.state not in STATUS_OPTIONS:
            raise RecordError(
                f"{self.connection}: invoice state {status.state!r} is not an option of "
                f"{BillingProperty.INVOICE_STATUS.value} ({', '.join(STATUS_OPTIONS)})",
                place=f"deal {deal_id}",
            )
        return {
            BillingProperty.INVOICE_NUMBER.value: status.invoice_number or "",
            BillingProperty.INVOICE_STATUS.value: status.state,
            BillingProperty.AMOUNT_DUE.value: format(status.amount_due, "f"),
            BillingProperty.INVOICE_CURRENCY.value: status.currency,
            BillingProperty.INVOICE_DUE_DATE.value: status.due_date.isoformat() if status.due_date else "",
            BillingProperty.DAYS_OVERDUE.value: str(status.days_overdue),
            BillingProperty.TOTAL_INVOICED.value: format(status.total_invoiced, "f")
            if status.total_invoiced is not None
            else "",
        }

    async def _update_deals(self, inputs: Sequence[tuple[str, dict[str, str]]]) -> dict[str, SyncdError | None]:
        """One ``batch/update``; refused as a whole (404, 400 ...), split in halves until the bad deal is alone."""
        body = {"inputs": [{"id": deal_id, "properties": values} for deal_id, values in inputs]}
        try:
            response = await self.http.request("POST", "/crm/v3/objects/deals/batch/update", json=body)
        except (NotFound, Rejected) as exc:
            if len(inputs) == 1:
                return {inputs[0][0]: self._refused(inputs[0][0], exc)}
            middle = len(inputs) // 2
            log.info("hubspot_batch_update_split", connection=self.connection, size=len(inputs), reason=str(exc))
            return {**await self._update_deals(inputs[:middle]), **await self._update_deals(inputs[middle:])}
        for deal in BatchRead.model_validate_json(response.content).results:
            self._remember_write(deal)
        return {deal_id: None for deal_id, _ in inputs}

    def _refused(self, deal_id: str, exc: NotFound | Rejected) -> SyncdError:
        """The error of the one deal a ``batch/update`` was refused for, named by the deal."""
        place = f"deal {deal_id}"
        if isinstance(exc, Rejected):
            return Rejected(exc.message, status=exc.status, messages=exc.messages, place=place)
        return NotFound(f"{exc.message}: HubSpot has no deal {deal_id}", place=place)

    async def write_company_status(self, company_id: str, status: CompanyBillingStatus) -> None:
        """Write a company's receivables onto it (:data:`CompanyProperty`; see :func:`company_values`).

        Raises:
            NotFound: no company with that id.
        """
        path = f"/crm/v3/objects/companies/{company_id}"
        await self.http.request("PATCH", path, json={"properties": company_values(status)})

    async def record_owner(self, object_type: str, object_id: str) -> str | None:
        """The ``hubspot_owner_id`` of a deal or company (``None``: none set).

        Raises:
            ValueError: ``object_type`` is not ``deal`` or ``company``.
            NotFound: no such record.
        """
        if object_type not in ("deal", "company"):
            raise ValueError(f"records with owners are deals and companies, not {object_type!r}")
        path = f"/crm/v3/objects/{OBJECT_TYPES[object_type]}/{object_id}"
        response = await self.http.request("GET", path, params={"properties": OWNER_PROPERTY})
        return CrmObject.model_validate_json(response.content).properties.get(OWNER_PROPERTY) or None

    async def create_task(self, task: FollowUpTask) -> str:
        """Create the task, associated with its deal and company; its id.

        Sent once (``retry=False``): HubSpot takes no idempotency key for it, so a lost
        answer is resolved by :meth:`find_task`, never by creating it again.
        """
        associations = [
            {"to": {"id": object_id}, "types": [{"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": kind}]}
            for object_id, kind in ((task.deal_id, TASK_TO_DEAL_TYPE_ID), (task.company_id, TASK_TO_COMPANY_TYPE_ID))
            if object_id
        ]
        properties = {
            "hs_timestamp": iso_ms(task.due_at),
            "hs_task_subject": task.subject,
            "hs_task_body": f"{task.body}\n{task_stamp(task.key)}",
            "hs_task_status": TASK_OPEN,
            "hs_task_priority": "HIGH",
            "hs_task_type": "TODO",
        }
        if task.owner_id:
            properties[OWNER_PROPERTY] = task.owner_id
        body = {"properties": properties, "associations": associations}
        response = await self.http.request("POST", "/crm/v3/objects/tasks", json=body, retry=False)
        created = CrmObject.model_validate_json(response.content)
        log.info("hubspot_task_created", connection=self.connection, task_id=created.id, key=task.key)
        return created.id

    async def find_task(self, task: FollowUpTask) -> str | None:
        """The task created for ``task.key`` (same subject, body ending with its stamp), if any.

        Searches on ``hs_task_subject``; search results may lag a write by a few seconds
        (search guide), so a retry soon after a lost answer may not find it yet.
        """
        body = {
            "filterGroups": [
                {"filters": [{"propertyName": "hs_task_subject", "operator": "EQ", "value": task.subject}]}
            ],
            "properties": ["hs_task_subject", "hs_task_body"],
            "limit": 100,
        }
        response = await self.http.request("POST", "/crm/v3/objects/tasks/search", json=body, bucket="search")
        found = SearchPage.model_validate_json(response.content).results
        stamp = task_stamp(task.key)
        return next((item.id for item in found if (item.properties.get("hs_task_body") or "").endswith(stamp)), None)

    async def close_task(self, task_id: str, body: str, *, complete: bool) -> None:
        """Replace a task's body (a note why it is settled) and, if ``complete``, mark it ``COMPLETED``."""
        properties = {"hs_task_body": body}
        if complete:
            properties["hs_task_status"] = TASK_DONE
        await self.http.request("PATCH", f"/crm/v3/objects/tasks/{task_id}", json={"properties": properties})

    async def ensure_company_properties(self) -> PropertySetup:
        """Create the ``syncd`` group and the company properties (:class:`CompanyProperty`) if missing.

        Idempotent, like :meth:`ensure_properties`.
        """
        return await self._ensure(
            "companies", {name.value: _company_property_definition(name) for name in CompanyProperty}
        )

    async def update_company(self, company_id: str, properties: Mapping[str, str | None]) -> None:
        """Set client details on a company: ``PATCH /crm/v3/objects/companies/{id}`` with ``{"properties": …}``.

        "Update a company by ID (companyId) … Provided property values will be overwritten
        … Properties values can be cleared by passing an empty string"
        (https://developers.hubspot.com/docs/api-reference/latest/crm/objects/companies/update-company);
        properties not sent are left as they are. A ``None`` is sent as an empty string.

        Raises:
            NotFound: no company with that id.
        """
        values = {name: "" if value is None else value for name, value in properties.items()}
        await self.http.request("PATCH", f"/crm/v3/objects/companies/{company_id}", json={"properties": values})
        log.info("hubspot_company_updated", company_id=company_id, properties=sorted(values))

    def _remember_write(self, deal: CrmObject) -> None:
        """Note the stamp our write gave the deal, so the next poll does not hint it back.

        HubSpot bumps ``hs_lastmodifieddate`` on API writes too, so without this every
        write-back would come back as a change and cost a full re-read. Per process and
        bounded; a later edit by a person carries a newer stamp and is never skipped.
        """
        self._own_writes[deal.id] = _stamp(deal)
        self._own_writes.move_to_end(deal.id)
        while len(self._own_writes) > OWN_WRITES_KEPT:
            self._own_writes.popitem(last=False)

    def _is_own_write(self, deal: CrmObject) -> bool:
        return self._own_writes.get(deal.id) == _stamp(deal)

    async def ensure_properties(self) -> PropertySetup:
        """Create the ``syncd`` property group and the billing deal properties if missing.

        Idempotent: it reads what exists first, so a second run creates nothing. Replicas
        starting together may both find a property missing; the one whose create is
        refused (HubSpot answers 409 ``CONFLICT``, "already exists") reads it back and
        counts it as present instead of failing its start.
        """
        return await self._ensure("deals", {name.value: _property_definition(name) for name in BillingProperty})

    async def _ensure(self, plural: str, definitions: Mapping[str, dict[str, Any]]) -> PropertySetup:
        group_created = False
        try:
            await self.http.request("GET", f"/crm/v3/properties/{plural}/groups/{BILLING_GROUP}")
        except NotFound:
            group = {"name": BILLING_GROUP, "label": BILLING_GROUP_LABEL, "displayOrder": -1}
            group_created = await self._create_unless_raced(
                f"/crm/v3/properties/{plural}/groups", group, f"/crm/v3/properties/{plural}/groups/{BILLING_GROUP}"
            )
        response = await self.http.request("GET", f"/crm/v3/properties/{plural}")
        existing = {prop.name for prop in PropertyList.model_validate_json(response.content).results}
        created: list[str] = []
        for name, body in definitions.items():
            if name in existing:
                continue
            if await self._create_unless_raced(
                f"/crm/v3/properties/{plural}", body, f"/crm/v3/properties/{plural}/{name}"
            ):
                created.append(name)
            else:
                existing.add(name)
        present = tuple(name for name in definitions if name in existing)
        log.info(
            "hubspot_properties_ensured",
            connection=self.connection,
            object_type=plural,
            created=created,
            present=list(present),
        )
        return PropertySetup(group_created=group_created, created=tuple(created), present=present)

    # -- helpers -----------------------------------------------------------------

    async def _create_unless_raced(self, path: str, body: Mapping[str, Any], read_path: str) -> bool:
        """POST ``body`` once; ``False`` when it failed because someone else created it meanwhile.

        A refused or failed create is followed by a read of ``read_path``: if the thing
        exists now (another replica's create won), that is not a failure. Otherwise the
        create's own error is raised.
        """
        try:
            await self.http.request("POST", path, json=body, retry=False)
        except RetriableError as exc:
            try:
                await self.http.request("GET", read_path)
            except NotFound:
                raise exc from None
            return False
        return True

    async def _read_deal(self, deal_id: str, properties: Sequence[str]) -> CrmObject:
        # The history of dealstage says when HubSpot recorded the move into the current
        # stage (billing_start is compared with it, not with the editable closedate):
        # "propertiesWithHistory: A comma separated list of the properties to be returned
        # along with their history of previous values" (hubspot-api-client,
        # crm/deals/api/basic_api.py get_by_id; GET /crm/v3/objects/deals/{dealId}).
        params = {
            "properties": ",".join(properties),
            "propertiesWithHistory": "dealstage",
            "associations": "companies,contacts,line_items",
        }
        response = await self.http.request("GET", f"/crm/v3/objects/deals/{deal_id}", params=params)
        return CrmObject.model_validate_json(response.content)

    async def _primary_company(
        self, deal_id: str, links: Mapping[str, AssociationCollection], properties: Sequence[str]
    ) -> CrmObject | None:
        if not links.get("companies", AssociationCollection()).results:
            return None
        associated = await self._v4_associations(deal_id, "companies")
        primary = _primary(associated)
        if primary is None:
            return None
        params = {"properties": ",".join(properties)}
        response = await self.http.request("GET", f"/crm/v3/objects/companies/{primary.to_object_id}", params=params)
        return CrmObject.model_validate_json(response.content)

    async def _contacts(
        self, deal_id: str, links: Mapping[str, AssociationCollection], properties: Sequence[str]
    ) -> list[tuple[CrmObject, AssociatedObject]]:
        if not links.get("contacts", AssociationCollection()).results:
            return []
        associated = _by_to_id(await self._v4_associations(deal_id, "contacts"))
        found = await self._batch_read("contacts", list(associated), properties)
        return [(contact, associated[contact.id]) for contact in found]

    async def _line_items(
        self, deal_id: str, links: Mapping[str, AssociationCollection], properties: Sequence[str]
    ) -> list[CrmObject]:
        return await self._batch_read("line_items", await self._line_item_ids(deal_id, links), properties)

    async def _line_item_ids(self, deal_id: str, links: Mapping[str, AssociationCollection]) -> list[str]:
        block = links.get("line_items", AssociationCollection())
        if block.paging is not None and block.paging.next is not None:
            return [str(item.to_object_id) for item in await self._v4_associations(deal_id, "line_items")]
        return list(dict.fromkeys(item.id for item in block.results))

    async def _v4_associations(self, deal_id: str, to_type: str) -> list[AssociatedObject]:
        found: list[AssociatedObject] = []
        after: str | None = None
        while True:
            params: dict[str, Any] = {"limit": V4_PAGE_LIMIT}
            if after is not None:
                params["after"] = after
            path = f"/crm/v4/objects/deals/{deal_id}/associations/{to_type}"
            page = AssociationPage.model_validate_json((await self.http.request("GET", path, params=params)).content)
            found.extend(page.results)
            if page.paging is None or page.paging.next is None:
                return found
            after = page.paging.next.after

    async def _batch_read(self, object_type: str, ids: Sequence[str], properties: Sequence[str]) -> list[CrmObject]:
        found: list[CrmObject] = []
        for start in range(0, len(ids), BATCH_LIMIT):
            chunk = ids[start : start + BATCH_LIMIT]
            # propertiesWithHistory is required by HubSpot's batch read model, even when empty
            # (hubspot-api-client, crm/objects/models/batch_read_input_simple_public_object_id.py).
            body = {
                "inputs": [{"id": object_id} for object_id in chunk],
                "properties": list(properties),
                "propertiesWithHistory": [],
            }
            response = await self.http.request(
                "POST", f"/crm/v3/objects/{object_type}/batch/read", json=body, write=False
            )
            by_id = {item.id: item for item in BatchRead.model_validate_json(response.content).results}
            found.extend(by_id[object_id] for object_id in chunk if object_id in by_id)
        return found

    async def _batch_read_deals(self, ids: Sequence[str], properties: Sequence[str]) -> list[CrmObject]:
        """Deals with ``dealstage`` history, :data:`HISTORY_BATCH_LIMIT` per request (see there)."""
        found: list[CrmObject] = []
        for start in range(0, len(ids), HISTORY_BATCH_LIMIT):
            body = {
                "inputs": [{"id": deal_id} for deal_id in ids[start : start + HISTORY_BATCH_LIMIT]],
                "properties": list(properties),
                "propertiesWithHistory": ["dealstage"],
            }
            response = await self.http.request("POST", "/crm/v3/objects/deals/batch/read", json=body, write=False)
            found.extend(BatchRead.model_validate_json(response.content).results)
        return found

    async def _v4_batch(self, deal_ids: Sequence[str], to_type: str) -> dict[str, list[AssociatedObject]]:
        """Each deal's associations of ``to_type`` through the v4 batch read, following each deal's pages.

        ``POST /crm/v4/associations/deals/{to_type}/batch/read`` with ``inputs: [{id, after}]``
        (hubspot-api-client, crm/associations/v4/api/batch_api.py ``get_page``: "The 'after'
        field in a returned paging object can be added alongside the 'id' to retrieve the
        next page of associations from that objectId"); at most
        :data:`V4_BATCH_LIMIT` inputs per request. A deal without any is left out.
        """
        found: dict[str, list[AssociatedObject]] = {}
        pending: list[dict[str, str]] = [{"id": deal_id} for deal_id in deal_ids]
        while pending:
            following: list[dict[str, str]] = []
            for start in range(0, len(pending), V4_BATCH_LIMIT):
                body = {"inputs": pending[start : start + V4_BATCH_LIMIT]}
                path = f"/crm/v4/associations/deals/{to_type}/batch/read"
                response = await self.http.request("POST", path, json=body, write=False)
                for result in AssociationBatch.model_validate_json(response.content).results:
                    found.setdefault(result.from_object.id, []).extend(result.to)
                    if result.paging is not None and result.paging.next is not None:
                        following.append({"id": result.from_object.id, "after": result.paging.next.after})
            pending = following
        return found

    async def _read_by_id(
        self, object_type: str, ids: Sequence[str], properties: Sequence[str]
    ) -> dict[str, CrmObject]:
        """:meth:`_batch_read` of the distinct ``ids``, by id (records HubSpot did not return are absent)."""
        found = await self._batch_read(object_type, list(dict.fromkeys(ids)), properties)
        return {item.id: item for item in found}

    def _missing(self, deal_id: str, primary: AssociatedObject | None) -> NotFound:
        """The error of a deal the batch did not find, or whose primary company it did not find."""
        if primary is None:
            return NotFound(f"{self.connection}: HubSpot has no deal {deal_id} (batch read)", place=f"deal {deal_id}")
        return NotFound(
            f"{self.connection}: the primary company {primary.to_object_id} of deal {deal_id} was not found (batch read)",
            place=f"deal {deal_id}",
        )

    async def _search_changed(self, window: PollCursor) -> SearchPage:
        body: dict[str, Any] = {
            "filterGroups": [
                {"filters": [{"propertyName": "hs_lastmodifieddate", "operator": "GTE", "value": str(window.gte_ms)}]}
            ],
            "sorts": [{"propertyName": "hs_lastmodifieddate", "direction": "ASCENDING"}],
            "properties": ["hs_lastmodifieddate"],
            "limit": PAGE_LIMIT,
        }
        if window.after is not None:
            body["after"] = window.after
        response = await self.http.request(
            "POST", "/crm/v3/objects/deals/search", json=body, bucket="search", write=False
        )
        return SearchPage.model_validate_json(response.content)

    def _next_cursor(self, window: PollCursor, page: SearchPage, now_ms: int) -> tuple[PollCursor, bool]:
        """The cursor after ``page``, and whether more changes are waiting right now."""
        last_ms = _last_modified_ms(page.results)
        if page.paging is not None and page.paging.next is not None:
            if int(page.paging.next.after) < self.settings.search_max_results:
                return PollCursor(gte_ms=window.gte_ms, after=page.paging.next.after), True
            return PollCursor(gte_ms=self._restart_at(window, last_ms)), True
        settled_ms = now_ms - self.settings.poll_lag_s * 1000
        newest = settled_ms if last_ms is None else min(last_ms, settled_ms)
        return PollCursor(gte_ms=max(window.gte_ms, newest)), False

    def _restart_at(self, window: PollCursor, last_ms: int | None) -> int:
        if last_ms is not None and last_ms > window.gte_ms:
            return last_ms
        # A whole result cap of deals modified in one millisecond: step past it rather
        # than loop forever; the deals beyond the cap are left to a full sync.
        log.warning("hubspot_poll_window_stuck", connection=self.connection, gte_ms=window.gte_ms)
        return window.gte_ms + 1

    def _hint(self, deal: CrmObject) -> ChangeHint:
        modified = _stamp(deal)
        return ChangeHint(
            connection=self.connection,
            object_type="deal",
            object_id=deal.id,
            event_id=f"poll:{deal.id}:{modified}",
            occurred_at=_modified_at(deal),
            kind="deal.poll",
            version=modified,
        )

    def _record(self, deal: CrmObject, data: Mapping[str, Any]) -> SourceRecord:
        version = _stamp(deal)
        return SourceRecord(
            connection=self.connection,
            object_type="deal",
            object_id=deal.id,
            version=version,
            modified_at=_modified_at(deal),
            data=data,
            stage_changed_at=deal.entered_current("dealstage"),
        )


def _merge(defaults: Iterable[str], extra: Iterable[str]) -> list[str]:
    """Defaults then extras, without duplicates, order kept."""
    return list(dict.fromkeys([*defaults, *extra]))


def _associations(deal: CrmObject) -> dict[str, AssociationCollection]:
    """The deal's associations keyed ``companies``/``contacts``/``line_items`` whatever HubSpot named them."""
    return {key.replace(" ", "_").lower(): block for key, block in deal.associations.items()}


def _value(outcome: _T | BaseException) -> _T:
    """A result of ``asyncio.gather(..., return_exceptions=True)``, its error raised."""
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _primary(associated: Iterable[AssociatedObject]) -> AssociatedObject | None:
    """The deal's primary company among its associated companies, if one is marked so."""
    return next((item for item in associated if _is_primary_company(item)), None)


def _is_primary_company(item: AssociatedObject) -> bool:
    return any(
        kind.type_id == PRIMARY_COMPANY_TYPE_ID and kind.category == "HUBSPOT_DEFINED"
        for kind in item.association_types
    )


@dataclass(frozen=True, kw_only=True)
class _Wanted:
    """The properties read of each object type: syncd's defaults, then what the mapping asks for."""

    deal: list[str]
    company: list[str]
    contact: list[str]
    line_item: list[str]

    @classmethod
    def of(cls, properties: Mapping[str, Sequence[str]] | None) -> _Wanted:
        wanted = properties or {}
        return cls(
            deal=_merge(DEAL_PROPERTIES, wanted.get("deal", ())),
            company=_merge(COMPANY_PROPERTIES, wanted.get("company", ())),
            contact=_merge(CONTACT_PROPERTIES, wanted.get("contact", ())),
            line_item=_merge(LINE_ITEM_PROPERTIES, wanted.get("line_item", ())),
        )


def _deal_data(
    deal: CrmObject,
    company: CrmObject | None,
    contacts: Sequence[tuple[CrmObject, AssociatedObject]],
    items: Sequence[CrmObject],
) -> dict[str, Any]:
    """A deal record's data: the deal, its primary company, contacts (with labels) and line items."""
    return {
        "deal": deal.as_data(),
        "company": {"id": company.id, "properties": dict(company.properties)} if company is not None else None,
        "contacts": [_contact(contact, association) for contact, association in contacts],
        "line_items": [{"id": item.id, "properties": dict(item.properties)} for item in items],
    }


@dataclass(frozen=True, kw_only=True)
class _Related:
    """What a batch read found for its deals: associations by type and deal, and the associated records by id."""

    links: Mapping[str, Mapping[str, Sequence[AssociatedObject]]]
    companies: Mapping[str, CrmObject]
    contacts: Mapping[str, CrmObject]
    line_items: Mapping[str, CrmObject]

    def contacts_of(self, deal_id: str) -> list[tuple[CrmObject, AssociatedObject]]:
        """The deal's contacts that were read, each with its association (labels), in association order."""
        associated = _by_to_id(self.links["contacts"].get(deal_id, ()))
        return [(self.contacts[key], item) for key, item in associated.items() if key in self.contacts]

    def items_of(self, deal_id: str) -> list[CrmObject]:
        """The deal's line items that were read, in association order."""
        associated = _by_to_id(self.links["line_items"].get(deal_id, ()))
        return [self.line_items[key] for key in associated if key in self.line_items]


def _by_to_id(associated: Iterable[AssociatedObject]) -> dict[str, AssociatedObject]:
    """Associations by the associated record's id (as a string), first one kept, order kept."""
    found: dict[str, AssociatedObject] = {}
    for item in associated:
        found.setdefault(str(item.to_object_id), item)
    return found


def _to_ids(lists: Iterable[Iterable[AssociatedObject]]) -> list[str]:
    """Every associated record id of every list (one per deal), without repeats."""
    return list(dict.fromkeys(str(item.to_object_id) for associated in lists for item in associated))


def _contact(contact: CrmObject, association: AssociatedObject) -> dict[str, Any]:
    labels = association.labels()
    return {
        "id": contact.id,
        "properties": dict(contact.properties),
        "primary": any(label.lower() == PRIMARY_LABEL for label in labels),
        "labels": labels,
    }


def _modified_at(deal: CrmObject) -> datetime:
    text = deal.properties.get("hs_lastmodifieddate")
    if text:
        try:
            return parse_hubspot_time(text)
        except ValueError:
            log.warning("hubspot_bad_lastmodified", deal_id=deal.id)
    return deal.updated_at


def _last_modified_ms(deals: Sequence[CrmObject]) -> int | None:
    return epoch_ms(_modified_at(deals[-1])) if deals else None


def _iso_text(moment: datetime) -> str:
    return iso_ms(moment)


# -- registration ----------------------------------------------------------------


def _auth(settings: HubSpotSettings, ctx: ConnectorContext) -> httpx.Auth:
    if settings.token is not None:
        return BearerToken(settings.token.get_secret_value())
    tokens = oauth_tokens(
        client=ctx.client,
        token_url=settings.token_url,
        client_id=settings.client_id or "",
        client_secret=secret_value(settings.client_secret),
        configured_refresh_token=secret_value(settings.refresh_token) or None,
        tokens=ctx.tokens,
        clock=ctx.clock,
        connection=ctx.connection,
        on_failure=ctx.token_refresh_failed,
    )
    return TokenAuth(tokens)


def rate_limits(settings: HubSpotSettings) -> list[RateLimit]:
    """The connection's buckets, sized to stay under HubSpot's windows (:func:`syncd.plumbing.http.within`).

    ``None`` or 0 switches a limit off (TOML has no null).
    """
    return [
        *within(settings.rate_limit_per_10s, 10, name="default"),
        *within(settings.search_rate_per_s, 1, name="search"),
    ]


def create(settings: HubSpotSettings, ctx: ConnectorContext) -> HubSpotConnector:
    """Build the connector for one connection."""
    http = ctx.make_http(
        base_url=settings.base_url,
        auth=_auth(settings, ctx),
        headers={"Accept": "application/json"},
        limits=rate_limits(settings),
        errors=HubSpotErrors(ctx.connection, oauth=settings.token is None),
    )
    return HubSpotConnector(settings=settings, http=http, connection=ctx.connection, clock=ctx.clock)


def create_verifier(settings: HubSpotSettings, clock: Callable[[], datetime]) -> WebhookVerifier:
    """Build the v3 webhook verifier (the key is the app's client secret).

    Raises:
        ConfigError: neither ``webhook_secret`` nor ``client_secret`` is set.
    """
    secret = settings.webhook_secret or settings.client_secret
    if secret is None:
        raise ConfigError(
            "webhook_secret is not set; HubSpot signs webhooks with the app's client secret",
            place=f"[connections.{settings.connector}].webhook_secret",
        )
    return HubSpotWebhookVerifier(connection=settings.connector, secret=secret.get_secret_value(), clock=clock)


SPEC = ConnectorSpec(
    name="hubspot",
    roles=frozenset({Crm, CrmSchema, UpdatesCompanies, ReadsDealsInBatches, WritesStatusInBatches}),
    settings_model=HubSpotSettings,
    factory=create,
    verifier=create_verifier,
    secret_fields=("token", "client_secret", "refresh_token", "webhook_secret"),
)

__all__ = [
    "SPEC",
    "BillingProperty",
    "CompanyProperty",
    "HubSpotConnector",
    "HubSpotSettings",
    "PropertySetup",
    "create",
    "create_verifier",
    "rate_limits",
]


OWN_WRITES_KEPT = 10_000


def _stamp(deal: CrmObject) -> str:
    """A deal's modification stamp: ``hs_lastmodifieddate``, else ``updatedAt``."""
    return deal.properties.get("hs_lastmodifieddate") or _iso_text(deal.updated_at)
