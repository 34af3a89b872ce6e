"""A stateful local HubSpot: CRM objects, associations, properties, pipelines, search, OAuth, webhooks.

It speaks HubSpot's wire format closely enough that the official ``hubspot-api-client``
SDK and syncd's connector work against it. Sources (all on developers.hubspot.com):

* objects, paging, batch read, search and its limits:
  ``/docs/api-reference/legacy/crm/objects/deals/guide``,
  ``/docs/api-reference/legacy/crm/search-the-crm`` (``limit`` ≤ 200, default 10;
  10,000 results per query, 400 beyond; 5 searches per second; filter values for
  dates are epoch-ms strings; one sort);
* batch calls: ``batch/update`` all or nothing (:meth:`HubSpotEmulator._batch_update`),
  batch reads with ``propertiesWithHistory`` capped at 50 inputs, v4 association batch
  reads (:meth:`HubSpotEmulator._associations_v4_batch`), each citing its source there;
* association type ids and labels (``5`` deal→primary company, ``341`` deal→company,
  ``3`` deal→contact, ``19`` deal→line item, ``1``/``279`` contact→company):
  ``/docs/api-reference/legacy/crm/associations/associate-records/guide``;
* properties, groups, ``type``/``fieldType`` pairs and date formats:
  ``/docs/api-reference/legacy/crm/properties/guide``;
* archiving a property (``DELETE /crm/v3/properties/{objectType}/{name}``, "Move a
  property ... to the recycling bin"; archived properties are listed only with
  ``archived=true``): ``/docs/api-reference/legacy/crm/properties/delete-property``;
  the 204 answer, the 404 for an unknown name and the 400 for a property whose
  ``modificationMetadata.archivable`` is false are the emulator's choices;
* pipelines and stage metadata (``isClosed``, ``probability``):
  ``/docs/api-reference/legacy/crm/pipelines/guide``;
* error body shape (``status``, ``message``, ``category``, ``correlationId``):
  ``/docs/api-reference/error-handling``; 409 bodies carry ``category: CONFLICT``
  (as seen in real responses, e.g. HubSpot/hubspot-api-nodejs issue #545);
* 429 body (``errorType: RATE_LIMIT``, ``policyName``) and the ``X-HubSpot-RateLimit-*``
  headers: ``/docs/developer-tooling/platform/usage-guidelines`` and
  ``/changelog/2018-11-06-rate-limit-information-headers-will-be-included-in-http-responses``.
  HubSpot does not document ``Retry-After`` on 429, so none is sent;
* OAuth ``/oauth/v3/token``: ``/docs/api-reference/legacy/authentication/manage-oauth-tokens``;
* scopes (when the emulator is given ``scopes``): each endpoint needs its object's
  ``crm.objects.{type}.read``/``.write`` or, for properties, ``crm.schemas.{type}.read``/
  ``.write`` (the "Scope requirements" of each API guide, e.g.
  ``/docs/api-reference/latest/crm/properties/guide``); a token without it is answered
  403 with ``category: MISSING_SCOPES`` and the scopes in
  ``errors[].context.requiredGranularScopes``, the message linking ``/scopes`` (the
  body HubSpot sends, as quoted in HubSpot Community threads on MISSING_SCOPES);
* webhook bodies and v3 signatures: see ``connectors/hubspot/webhooks.py``;
* webhook subscriptions: "For property change subscriptions, you will need to specify
  which property you want to be notified of" (``/docs/methods/webhooks/webhooks-overview``),
  so a change made through the API (``PATCH /crm/v3/objects/deals/{id}``) is delivered
  as a ``deal.propertyChange`` event for each changed property with a subscription
  (``HubSpotEmulator.subscribe(..., properties=...)``), and for no other.
* tasks (``/crm/v3/objects/tasks``, object type ``0-27``): ``hs_timestamp`` required on
  create, ``hs_task_status`` ``NOT_STARTED``/``COMPLETED``, ``hs_task_priority``
  ``LOW``/``MEDIUM``/``HIGH``, ``hs_task_type`` ``EMAIL``/``CALL``/``TODO``, the contacts
  scopes, associations 216 (task→deal) and 192 (task→company):
  ``/docs/api-reference/legacy/crm/activities/tasks/guide``; ``hubspot_owner_id`` on
  deals, companies and tasks takes the ids of the owners added with ``add_owner``.

Request bodies, given a ``contract`` (:class:`SdkContract`, as
``tests/connectors/test_strict.py`` builds it): each write and search body must fit the
request model of the official ``hubspot-api-client`` SDK, whose models are generated from
HubSpot's OpenAPI files: no field the model does not name, each value of the model's type
(``openapi_types``), every required field present and every enum value allowed (the
model's own client-side validation). A breach is answered 400 ``VALIDATION_ERROR`` with
every problem and kept in ``HubSpotEmulator.contract.breaches``. One documented shape is
accepted beside the model: a search sort given as ``{"propertyName", "direction"}``,
which the search guide shows, where the SDK's ``PublicObjectSearchRequest.sorts`` says
``list[str]``. Property names on writes are checked whether or not a contract is given:
an undefined one is ``PROPERTY_DOESNT_EXIST`` (``strict_properties``) and a read-only one
``READ_ONLY_VALUE``.

Emulator-only choices (not confirmed against HubSpot): ``changeSource`` is ``API`` on
events of changes made through the API (``CRM_UI`` on the seeding API's edits); the task
property group name (``taskinformation``), ``hs_task_body`` as an ``html`` property; the v3 ``associations[].type``
names other than ``deal_to_company``/``deal_to_company_unlabeled``/``deal_to_contact``/
``deal_to_line_item`` follow the same pattern; list ``after`` cursors are record ids;
the exact wording of error messages.
"""

from __future__ import annotations

import bisect
import hashlib
import importlib
import itertools
import json
import re
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qs

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from connectors.emulation import Call, Contract, ContractGate, FaultMiddleware, FaultPlan, WebhookSender, WindowLimiter
from connectors.hubspot.models import epoch_ms, iso_ms, parse_hubspot_time
from connectors.hubspot.webhooks import sign_v3

Handler = Callable[[Request], Awaitable[Response]]

TYPE_ALIASES = {
    "deals": "deals",
    "deal": "deals",
    "0-3": "deals",
    "companies": "companies",
    "company": "companies",
    "0-2": "companies",
    "contacts": "contacts",
    "contact": "contacts",
    "0-1": "contacts",
    "line_items": "line_items",
    "line_item": "line_items",
    "0-8": "line_items",
    "tasks": "tasks",
    "task": "tasks",
    "0-27": "tasks",
}
OBJECT_TYPE_IDS = {"deals": "0-3", "companies": "0-2", "contacts": "0-1", "line_items": "0-8", "tasks": "0-27"}
# Keys of the ``associations`` block in v3 reads: ``line_items`` comes back as "line items".
ASSOCIATION_KEYS = {
    "deals": "deals",
    "companies": "companies",
    "contacts": "contacts",
    "line_items": "line items",
    "tasks": "tasks",
}
MODIFIED_PROPERTY = {
    "deals": "hs_lastmodifieddate",
    "companies": "hs_lastmodifieddate",
    "contacts": "lastmodifieddate",
    "line_items": "hs_lastmodifieddate",
    "tasks": "hs_lastmodifieddate",
}
# Returned when no ``properties`` are asked for (search guide, "Default returned properties";
# the tasks' list is the emulator's choice: the properties of the tasks guide's example).
DEFAULT_PROPERTIES = {
    "deals": ("dealname", "amount", "closedate", "pipeline", "dealstage", "createdate", "hs_lastmodifieddate"),
    "companies": ("name", "domain", "createdate", "hs_lastmodifieddate"),
    "contacts": ("firstname", "lastname", "email", "lastmodifieddate", "createdate"),
    "line_items": ("quantity", "amount", "price", "createdate", "hs_lastmodifieddate"),
    "tasks": ("hs_timestamp", "hs_task_subject", "hs_task_status", "hs_task_priority", "hs_lastmodifieddate"),
}
DEFAULT_GROUPS = {
    "deals": "dealinformation",
    "companies": "companyinformation",
    "contacts": "contactinformation",
    "line_items": "lineiteminformation",
    "tasks": "taskinformation",
}
# Properties required to create a record of a type (tasks guide: "hs_timestamp: Required").
REQUIRED_ON_CREATE = {"deals": ("dealname", "dealstage"), "tasks": ("hs_timestamp",)}
# The values of the tasks' enumeration properties: hs_task_status "either COMPLETED or
# NOT_STARTED", hs_task_priority "LOW, MEDIUM, or HIGH", hs_task_type "EMAIL, CALL, or
# TODO" (https://developers.hubspot.com/docs/api-reference/legacy/crm/activities/tasks/guide).
TASK_OPTIONS = {
    "hs_task_status": ("NOT_STARTED", "COMPLETED"),
    "hs_task_priority": ("LOW", "MEDIUM", "HIGH"),
    "hs_task_type": ("EMAIL", "CALL", "TODO"),
}

# (name, type, fieldType, read-only) of the default properties the emulator knows.
_COMMON = (
    ("hs_object_id", "number", "number", True),
    ("createdate", "datetime", "date", True),
)
_STANDARD: dict[str, tuple[tuple[str, str, str, bool], ...]] = {
    "deals": (
        ("dealname", "string", "text", False),
        ("amount", "number", "number", False),
        ("dealstage", "enumeration", "radio", False),
        ("pipeline", "enumeration", "select", False),
        ("closedate", "datetime", "date", False),
        ("dealtype", "string", "text", False),
        ("description", "string", "textarea", False),
        ("deal_currency_code", "string", "text", False),
        ("hs_is_closed_won", "bool", "booleancheckbox", True),
        ("hs_is_closed", "bool", "booleancheckbox", True),
        ("hs_lastmodifieddate", "datetime", "date", True),
    ),
    "companies": (
        ("name", "string", "text", False),
        ("domain", "string", "text", False),
        ("address", "string", "text", False),
        ("address2", "string", "text", False),
        ("city", "string", "text", False),
        ("state", "string", "text", False),
        ("zip", "string", "text", False),
        ("country", "string", "text", False),
        ("phone", "string", "phonenumber", False),
        ("hs_lastmodifieddate", "datetime", "date", True),
    ),
    "contacts": (
        ("firstname", "string", "text", False),
        ("lastname", "string", "text", False),
        ("email", "string", "text", False),
        ("phone", "string", "phonenumber", False),
        ("jobtitle", "string", "text", False),
        ("company", "string", "text", False),
        ("lastmodifieddate", "datetime", "date", True),
    ),
    "line_items": (
        ("name", "string", "text", False),
        ("description", "string", "textarea", False),
        ("quantity", "number", "number", False),
        ("price", "number", "number", False),
        ("amount", "number", "number", False),
        ("hs_sku", "string", "text", False),
        ("hs_product_id", "string", "text", False),
        ("hs_lastmodifieddate", "datetime", "date", True),
    ),
    "tasks": (
        ("hs_timestamp", "datetime", "date", False),
        ("hs_task_subject", "string", "text", False),
        ("hs_task_body", "string", "html", False),
        ("hs_task_status", "enumeration", "select", False),
        ("hs_task_priority", "enumeration", "select", False),
        ("hs_task_type", "enumeration", "select", False),
        ("hubspot_owner_id", "enumeration", "select", False),
        ("hs_lastmodifieddate", "datetime", "date", True),
    ),
}
# Every deal and company has an owner (HubSpot's default ``hubspot_owner_id``); its
# options are the portal's owners (add_owner).
_OWNED = ("deals", "companies", "tasks")
# ``type`` → allowed ``fieldType`` values (properties guide table).
FIELD_TYPES = {
    "bool": {"booleancheckbox", "calculation_equation"},
    "enumeration": {"booleancheckbox", "checkbox", "radio", "select", "calculation_equation"},
    "date": {"date"},
    "datetime": {"date"},
    "string": {"file", "text", "textarea", "calculation_equation", "html", "phonenumber"},
    "number": {"number", "calculation_equation"},
}

# (from, to) → (primary typeId, primary v3 name) | None, (plain typeId, plain v3 name)
_ASSOCIATION_TYPES: dict[tuple[str, str], tuple[tuple[int, str] | None, tuple[int, str]]] = {
    ("deals", "companies"): ((5, "deal_to_company"), (341, "deal_to_company_unlabeled")),
    ("companies", "deals"): ((6, "company_to_deal"), (342, "company_to_deal_unlabeled")),
    ("deals", "contacts"): (None, (3, "deal_to_contact")),
    ("contacts", "deals"): (None, (4, "contact_to_deal")),
    ("deals", "line_items"): (None, (19, "deal_to_line_item")),
    ("line_items", "deals"): (None, (20, "line_item_to_deal")),
    ("contacts", "companies"): ((1, "contact_to_company"), (279, "contact_to_company_unlabeled")),
    ("companies", "contacts"): ((2, "company_to_contact"), (280, "company_to_contact_unlabeled")),
    # HubSpot-defined task associations: task→deal 216, task→company 192, deal→task 215, company→task 191
    # ("Association type ID values", /docs/api-reference/legacy/crm/associations/associate-records/guide;
    # the same numbers as hubspot-api-client's hubspot.crm.AssociationType, checked in test_hubspot_sdk.py)
    ("tasks", "deals"): (None, (216, "task_to_deal")),
    ("deals", "tasks"): (None, (215, "deal_to_task")),
    ("tasks", "companies"): (None, (192, "task_to_company")),
    ("companies", "tasks"): (None, (191, "company_to_task")),
}

_STAGES = (
    ("appointmentscheduled", "Appointment Scheduled", "0.2", False),
    ("qualifiedtobuy", "Qualified To Buy", "0.4", False),
    ("presentationscheduled", "Presentation Scheduled", "0.6", False),
    ("decisionmakerboughtin", "Decision Maker Bought-In", "0.8", False),
    ("contractsent", "Contract Sent", "0.9", False),
    ("closedwon", "Closed Won", "1.0", True),
    ("closedlost", "Closed Lost", "0.0", True),
)
DEFAULT_PIPELINE = "default"
PORTAL_ID = 62515  # the portal id of HubSpot's own webhook examples
APP_ID = 54321
SEARCH_BODY_LIMIT = 3000  # characters (search guide, Limits)
SEARCH_PAGE_MAX = 200
LIST_PAGE_MAX = 100
BATCH_MAX = 100
# A batch read asking for propertiesWithHistory takes at most 50 inputs; HubSpot's 400 says
# "The maximum number of inputs supported in a batch request for property histories is 50"
# (quoted in PipedreamHQ/pipedream pull request #8462).
HISTORY_BATCH_MAX = 50
V4_PAGE_DEFAULT = 500
# v4 association batch reads: "may not exceed 1000 IDs per request body" (effective
# 2025-02-10, https://developers.hubspot.com/changelog/bug-fix-batch-read-limit-for-hubspot-associations-api).
V4_BATCH_MAX = 1000
# Singular object names in v4 association errors ("No company is associated with deal 5156…").
SINGULAR = {"deals": "deal", "companies": "company", "contacts": "contact", "line_items": "line_item", "tasks": "task"}
_NUMERIC_SEGMENT = re.compile(r"/\d+(?=/|$)")
_ISO_MS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")


class HubSpotError(Exception):
    """A HubSpot-shaped error answer, raised inside handlers."""

    def __init__(self, status: int, message: str, category: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"status": "error", "message": message, "correlationId": str(uuid.uuid4()), "category": category}
        self.body.update(extra)


_OAUTH_SCOPES = ["oauth", "crm.objects.deals.read", "crm.objects.deals.write"]
_SCOPED_PATH = re.compile(r"^/crm/v[34]/(objects|properties)/([a-z_]+)(/.*)?$")
_READING_POSTS = ("/search", "/batch/read")


def _required_scope(method: str, path: str) -> str | None:
    """The granular scope an endpoint needs (``None``: not checked by the emulator).

    Tasks records need the contacts scopes (the tasks guide's "Scope requirements":
    ``crm.objects.contacts.read``, ``crm.objects.contacts.write``).
    """
    found = _SCOPED_PATH.match(path)
    if found is None:
        return None
    family, object_type, rest = found.group(1), found.group(2), found.group(3) or ""
    reads = method == "GET" or (method == "POST" and rest.endswith(_READING_POSTS))
    kind = "objects" if family == "objects" else "schemas"
    if kind == "objects" and object_type == "tasks":
        object_type = "contacts"
    return f"crm.{kind}.{object_type}.{'read' if reads else 'write'}"


@dataclass
class _Record:
    id: str
    properties: dict[str, str | None]
    created: datetime
    updated: datetime
    archived: bool = False
    history: dict[str, list[tuple[str | None, datetime]]] = field(default_factory=dict)


@dataclass
class _Link:
    """The association types from one record to another (``(category, typeId, label)``)."""

    kinds: list[tuple[str, int, str | None]] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class ApiWrite:
    """One property write made through the API (``PATCH /crm/v3/objects/{type}/{id}``).

    Attributes:
        object_type: ``deals``, ``companies`` ...
        object_id: the record's id.
        properties: the values written, as sent (normalised as stored).
        at: when it was applied (the emulator's clock).
    """

    object_type: str
    object_id: str
    properties: Mapping[str, str | None]
    at: datetime


@dataclass(frozen=True, kw_only=True)
class _Settings:
    token: str
    client_id: str
    client_secret: str
    refresh_token: str
    access_token_ttl_s: int
    search_result_cap: int


class HubSpotEmulator:
    """A local HubSpot portal behind an ASGI app.

    Args:
        token: the private-app token accepted as ``Authorization: Bearer``.
        client_secret: the app's client secret (signs webhooks; OAuth client secret).
        rate_limits: enforce HubSpot's limits (off for benchmarks).
        rate_limit_per_10s / search_rate_per_s: the limits enforced.
        clock: current aware UTC time (timestamps, token expiry, webhook timestamps).
        client_id / refresh_token: OAuth app id and the refresh token the token endpoint accepts.
        access_token_ttl_s: lifetime of issued OAuth access tokens (HubSpot: 1800).
        search_result_cap: results per search query (HubSpot: 10,000; lower it in tests).
        association_page_size: associations per record on one page of a v4 batch
            association read (500, the emulator's choice, as its single-record v4 page;
            lower it in tests to page).
        scopes: the scopes granted to the private-app token and to OAuth access tokens;
            ``None`` grants every scope (no checks).
        strict_properties: API writes naming an undefined property are refused with
            HubSpot's 400 ``PROPERTY_DOESNT_EXIST`` (as HubSpot does); ``False`` defines
            them on the fly as text properties. Run ``ensure_properties`` (``syncd setup
            hubspot``) before writing billing status to a strict portal.
        contract: HubSpot's published request models to check each body against
            (:class:`SdkContract`; ``None``: no check).
        faults: the fault plan (``None``: a plan with nothing queued and no seed, i.e. off).

    Attributes:
        token / client_secret / client_id / refresh_token: the credentials it accepts.
        app: the ASGI app, wrapped in :class:`~connectors.emulation.FaultMiddleware`.
        faults: the fault plan applied to requests.
        webhooks: the webhook sender (deliveries kept for re-delivery).
        calls: requests received, keyed ``"GET /crm/v3/objects/deals/{id}"``.
        writes: every API write of properties, oldest first (:class:`ApiWrite`): the
            write-back history a test reads to see a deal never went backwards.
        contract: the :class:`~connectors.emulation.ContractGate` (``breaches`` lists refused requests).
    """

    def __init__(
        self,
        *,
        token: str = "pat-emulator",
        client_secret: str = "emulator-secret",
        rate_limits: bool = True,
        rate_limit_per_10s: int = 100,
        search_rate_per_s: int = 5,
        clock: Callable[[], datetime] | None = None,
        client_id: str = "emulator-client",
        refresh_token: str = "emulator-refresh",
        access_token_ttl_s: int = 1800,
        search_result_cap: int = 10_000,
        association_page_size: int = V4_PAGE_DEFAULT,
        strict_properties: bool = True,
        scopes: Iterable[str] | None = None,
        contract: Contract | None = None,
        faults: FaultPlan | None = None,
    ) -> None:
        self.token = token
        self.contract = ContractGate(contract)
        self.scopes = None if scopes is None else frozenset(scopes)
        self.client_secret = client_secret
        self.client_id = client_id
        self.refresh_token = refresh_token
        self._strict = strict_properties
        self._association_page_size = association_page_size
        self._settings = _Settings(
            token=token,
            client_id=client_id,
            client_secret=client_secret,
            refresh_token=refresh_token,
            access_token_ttl_s=access_token_ttl_s,
            search_result_cap=search_result_cap,
        )
        self._clock = clock or (lambda: datetime.now(UTC))
        self._limiter = WindowLimiter(rate_limit_per_10s if rate_limits else None, 10.0)
        self._search_limiter = WindowLimiter(search_rate_per_s if rate_limits else None, 1.0)
        self.faults = faults or FaultPlan()
        self.webhooks = WebhookSender()
        self.calls: Counter[str] = Counter()
        self.writes: list[ApiWrite] = []
        self._ids = itertools.count(1001)
        self._event_ids = itertools.count(100)
        self._subscriptions: dict[str, int] = {}
        self._watched: frozenset[str] | None = None
        self._access_tokens: dict[str, float] = {}
        self._records: dict[str, dict[str, _Record]] = {kind: {} for kind in OBJECT_TYPE_IDS}
        self._order: dict[str, list[int]] = {kind: [] for kind in OBJECT_TYPE_IDS}
        self._links: dict[tuple[str, str, str], dict[str, _Link]] = {}
        self._labels = itertools.count(30)
        self._groups: dict[str, dict[str, dict[str, Any]]] = {kind: {} for kind in OBJECT_TYPE_IDS}
        self._properties: dict[str, dict[str, dict[str, Any]]] = {kind: {} for kind in OBJECT_TYPE_IDS}
        self._archived: dict[str, dict[str, dict[str, Any]]] = {kind: {} for kind in OBJECT_TYPE_IDS}
        self._boot = self._clock()
        self._install_defaults()
        self.app: ASGIApp = FaultMiddleware(Starlette(routes=self._routes()), self.faults)

    # ------------------------------------------------------------------ seeding API

    def add_company(self, properties: dict[str, str]) -> str:
        """Create a company as if it were already in HubSpot; returns its id."""
        return self._seed("companies", properties).id

    def add_contact(self, properties: dict[str, str], *, company_id: str | None = None) -> str:
        """Create a contact, optionally with ``company_id`` as its primary company."""
        contact = self._seed("contacts", properties)
        if company_id is not None:
            self._link("contacts", contact.id, "companies", self._get("companies", company_id).id, primary=True)
        return contact.id

    def add_deal(
        self,
        properties: dict[str, str],
        *,
        company_id: str | None = None,
        contact_ids: Sequence[str] = (),
        line_items: Sequence[dict[str, str]] = (),
    ) -> str:
        """Create a deal with its primary company, contacts and line items; returns its id."""
        deal = self._seed("deals", {"pipeline": DEFAULT_PIPELINE, "dealstage": "appointmentscheduled", **properties})
        if company_id is not None:
            self._link("deals", deal.id, "companies", self._get("companies", company_id).id, primary=True)
        for contact_id in contact_ids:
            self._link("deals", deal.id, "contacts", self._get("contacts", contact_id).id)
        for item in line_items:
            self._link("deals", deal.id, "line_items", self._seed("line_items", item).id)
        return deal.id

    def associate(self, from_type: str, from_id: str, to_type: str, to_id: str, *, primary: bool = False) -> None:
        """Associate two existing records (both directions), e.g. a deal with a non-primary company."""
        from_kind, to_kind = _kind(from_type), _kind(to_type)
        self._link(from_kind, self._get(from_kind, from_id).id, to_kind, self._get(to_kind, to_id).id, primary=primary)

    def label_contact(self, deal_id: str, contact_id: str, label: str) -> None:
        """Add a custom association label (``USER_DEFINED``) to a deal's contact."""
        link = self._links.get(("deals", deal_id, "contacts"), {}).get(contact_id)
        if link is None:
            raise KeyError(f"contact {contact_id} is not associated with deal {deal_id}")
        link.kinds.append(("USER_DEFINED", next(self._labels), label))

    def define_property(self, object_type: str, name: str) -> None:
        """Create a custom text property, as an admin would in Settings > Properties (no-op if it exists)."""
        kind = _kind(object_type)
        if name not in self._properties[kind]:
            self._define(kind, name, "string", "text", group=DEFAULT_GROUPS[kind], hubspot=False, read_only=False)

    def archive_property(self, object_type: str, name: str) -> None:
        """Archive (delete) a property as an admin would: it leaves the property list and every read.

        Raises:
            KeyError: no such live property.
        """
        kind = _kind(object_type)
        definition = self._properties[kind].pop(name)
        definition.update(archived=True, archivedAt=iso_ms(self._clock()))
        self._archived[kind][name] = definition

    def deal(self, deal_id: str) -> dict[str, Any]:
        """The stored deal: ``id``, ``properties``, ``createdAt``, ``updatedAt``, ``archived``."""
        return _public(self._get("deals", deal_id), None)

    def company(self, company_id: str) -> dict[str, Any]:
        """The stored company: ``id``, ``properties``, ``createdAt``, ``updatedAt``, ``archived``."""
        return _public(self._get("companies", company_id), None)

    def add_owner(self, email: str) -> str:
        """A user who can own records (an option of every ``hubspot_owner_id``); their owner id."""
        owner_id = str(next(self._ids))
        for kind in _OWNED:
            options = self._properties[kind]["hubspot_owner_id"]["options"]
            options.append({"label": email, "value": owner_id, "displayOrder": len(options), "hidden": False})
        return owner_id

    def tasks(self) -> list[dict[str, Any]]:
        """Every task, oldest first, with ``associations``: ``{"deals": [ids], "companies": [ids]}``."""
        found = []
        for record in self._records["tasks"].values():
            body = _public(record, None)
            body["associations"] = {
                to_kind: sorted(self._links.get(("tasks", record.id, to_kind), {}))
                for to_kind in ("deals", "companies")
            }
            found.append(body)
        return found

    def subscribe(self, url: str, client: httpx.AsyncClient, *, properties: Iterable[str] | None = None) -> None:
        """Deliver webhooks to ``url`` (the full public URL, which is what gets signed).

        Args:
            url: the app's target URL.
            client: the client deliveries are posted with.
            properties: the deal properties with a ``deal.propertyChange`` subscription
                (HubSpot subscribes per property). A change through the API, and one made
                with :meth:`set_deal_properties`, is delivered for these properties only.
                ``None`` (tests that drive deliveries by hand): :meth:`set_deal_properties`
                delivers every property it changes, and the API delivers none.
        """
        self.webhooks.subscribe(url, client)
        self._watched = None if properties is None else frozenset(properties)

    def expire_access_tokens(self) -> None:
        """Make every issued OAuth access token expired (the private-app token stays valid)."""
        self._access_tokens = dict.fromkeys(self._access_tokens, 0.0)

    async def set_deal_properties(self, deal_id: str, properties: dict[str, str]) -> None:
        """Edit a deal as a user in HubSpot would, and deliver ``deal.propertyChange`` webhooks.

        ``hs_lastmodifieddate`` moves; a new ``dealstage`` sets ``hs_is_closed_won``,
        ``hs_is_closed`` and (when closing) ``closedate`` from the pipeline's stage metadata.
        One event per property whose value changed, in one signed delivery.

        Raises:
            KeyError: no such deal. ValueError: a value HubSpot would refuse.
        """
        record = self._get("deals", deal_id)
        values = self._seed_values("deals", properties)
        changed = self._apply("deals", record, values)
        watched = self._watched
        names = [name for name in changed if name in values and (watched is None or name in watched)]
        await self._deliver_changes(record, names, source="CRM_UI")

    async def redeliver_last(self) -> int | None:
        """Send the last delivery again, as HubSpot retries: same events (``attemptNumber`` + 1), fresh signature."""
        if not self.webhooks.deliveries:
            return None
        events = json.loads(self.webhooks.deliveries[-1].body)
        for event in events:
            event["attemptNumber"] = int(event.get("attemptNumber", 0)) + 1
        delivery = await self._deliver(events)
        return delivery.status if delivery is not None else None

    # ------------------------------------------------------------------ state

    def _install_defaults(self) -> None:
        for kind, group in DEFAULT_GROUPS.items():
            self._groups[kind][group] = {"name": group, "label": group, "displayOrder": -1, "archived": False}
            for name, prop_type, field_type, read_only in (*_COMMON, *_STANDARD[kind]):
                self._define(kind, name, prop_type, field_type, group=group, hubspot=True, read_only=read_only)
        stages = [
            {"label": label, "value": value, "displayOrder": i, "hidden": False}
            for i, (value, label, *_) in enumerate(_STAGES)
        ]
        self._properties["deals"]["dealstage"]["options"] = stages
        pipeline_option = {"label": "Sales Pipeline", "value": DEFAULT_PIPELINE, "displayOrder": 0, "hidden": False}
        self._properties["deals"]["pipeline"]["options"] = [pipeline_option]
        for kind in ("deals", "companies"):
            group = DEFAULT_GROUPS[kind]
            self._define(kind, "hubspot_owner_id", "enumeration", "select", group=group, hubspot=True, read_only=False)
        for name, values in TASK_OPTIONS.items():
            self._properties["tasks"][name]["options"] = [
                {"label": value.replace("_", " ").capitalize(), "value": value, "displayOrder": i, "hidden": False}
                for i, value in enumerate(values)
            ]

    def _define(
        self, kind: str, name: str, prop_type: str, field_type: str, *, group: str, hubspot: bool, read_only: bool
    ) -> dict[str, Any]:
        stamp = iso_ms(self._boot)
        definition: dict[str, Any] = {
            "name": name,
            "label": name.replace("_", " ").capitalize(),
            "type": prop_type,
            "fieldType": field_type,
            "description": "",
            "groupName": group,
            "options": [],
            "displayOrder": -1,
            "calculated": read_only and hubspot,
            "externalOptions": False,
            "hasUniqueValue": False,
            "hidden": False,
            "hubspotDefined": hubspot,
            "formField": not read_only,
            "modificationMetadata": {
                "archivable": not hubspot,
                "readOnlyDefinition": hubspot,
                "readOnlyValue": read_only,
            },
            "createdAt": stamp,
            "updatedAt": stamp,
            "archived": False,
        }
        self._properties[kind][name] = definition
        return definition

    def _seed(self, kind: str, properties: Mapping[str, str]) -> _Record:
        return self._create(kind, self._seed_values(kind, properties))

    def _seed_values(self, kind: str, properties: Mapping[str, str]) -> dict[str, str | None]:
        """Validated values for the seeding API; unknown names become custom text properties."""
        try:
            return self._validated(kind, properties, register=True)
        except HubSpotError as exc:
            raise ValueError(exc.body["message"]) from exc

    def _create(self, kind: str, values: Mapping[str, str | None]) -> _Record:
        now = self._clock()
        record = _Record(id=str(next(self._ids)), properties={}, created=now, updated=now)
        record.properties.update({"hs_object_id": record.id, "createdate": iso_ms(now)})
        self._records[kind][record.id] = record
        self._order[kind].append(int(record.id))
        self._apply(kind, record, values)
        return record

    def _get(self, kind: str, object_id: str) -> _Record:
        record = self._records[kind].get(str(object_id))
        if record is None:
            raise KeyError(f"no {kind} record {object_id}")
        return record

    def _apply(self, kind: str, record: _Record, values: Mapping[str, str | None]) -> list[str]:
        """Set property values; returns the names whose value changed."""
        changed = [name for name, value in values.items() if record.properties.get(name) != value]
        record.properties.update(values)
        if kind == "deals" and "dealstage" in values:
            changed.extend(self._derive_stage(record))
        now = self._clock()
        for name in changed:
            record.history.setdefault(name, []).insert(0, (record.properties.get(name), now))
        record.updated = now
        record.properties[MODIFIED_PROPERTY[kind]] = iso_ms(now)
        return changed

    def _derive_stage(self, record: _Record) -> list[str]:
        stage = next((s for s in _STAGES if s[0] == record.properties.get("dealstage")), None)
        if stage is None:
            return []
        _, _, probability, closed = stage
        derived = {
            "hs_is_closed": "true" if closed else "false",
            "hs_is_closed_won": "true" if closed and Decimal(probability) == 1 else "false",
        }
        if closed and not record.properties.get("closedate"):
            derived["closedate"] = iso_ms(self._clock())
        changed = [name for name, value in derived.items() if record.properties.get(name) != value]
        record.properties.update(derived)
        return changed

    def _link(self, from_kind: str, from_id: str, to_kind: str, to_id: str, *, primary: bool = False) -> None:
        self._add_kinds(from_kind, from_id, to_kind, to_id, primary)
        self._add_kinds(to_kind, to_id, from_kind, from_id, primary)

    def _add_kinds(self, from_kind: str, from_id: str, to_kind: str, to_id: str, primary: bool) -> None:
        primary_type, plain_type = _ASSOCIATION_TYPES[(from_kind, to_kind)]
        link = self._links.setdefault((from_kind, from_id, to_kind), {}).setdefault(to_id, _Link())
        wanted: list[tuple[str, int, str | None]] = [("HUBSPOT_DEFINED", plain_type[0], None)]
        if primary and primary_type is not None:
            wanted.insert(0, ("HUBSPOT_DEFINED", primary_type[0], "Primary"))
        link.kinds.extend(kind for kind in wanted if kind not in link.kinds)

    def _validated(self, kind: str, values: Mapping[str, Any], *, register: bool) -> dict[str, str | None]:
        """Normalised values, or :class:`HubSpotError` listing each invalid property."""
        problems: list[dict[str, Any]] = []
        clean: dict[str, str | None] = {}
        for name, raw in values.items():
            definition = self._properties[kind].get(name)
            if definition is None and register:
                definition = self._define(
                    kind, name, "string", "text", group=DEFAULT_GROUPS[kind], hubspot=False, read_only=False
                )
            try:
                clean[name] = _normalise(name, definition, raw)
            except ValueError as exc:
                problems.append({"isValid": False, "message": exc.args[0], "error": exc.args[1], "name": name})
        if problems:
            raise HubSpotError(400, f"Property values were not valid: {json.dumps(problems)}", "VALIDATION_ERROR")
        return clean

    # ------------------------------------------------------------------ webhooks

    async def _deliver_changes(self, record: _Record, names: Sequence[str], *, source: str) -> None:
        """One signed delivery with a ``deal.propertyChange`` event per name (none when empty)."""
        events = [self._change_event(record, name, source=source) for name in names]
        if events:
            await self._deliver(events)

    def _change_event(self, record: _Record, name: str, *, source: str = "CRM_UI") -> dict[str, Any]:
        subscription = self._subscriptions.setdefault(name, 1000 + len(self._subscriptions))
        event: dict[str, Any] = {
            "eventId": next(self._event_ids),
            "subscriptionId": subscription,
            "portalId": PORTAL_ID,
            "appId": APP_ID,
            "occurredAt": epoch_ms(self._clock()),
            "subscriptionType": "deal.propertyChange",
            "attemptNumber": 0,
            "objectId": int(record.id),
            "propertyName": name,
            "propertyValue": record.properties.get(name) or "",
            "changeSource": source,
        }
        if source == "CRM_UI":
            event["sourceId"] = "userId:1"
        return event

    async def _deliver(self, events: list[dict[str, Any]]) -> Any:
        if self.webhooks.url is None:
            return None
        body = json.dumps(events, separators=(",", ":")).encode()
        timestamp = str(epoch_ms(self._clock()))
        secret = self._settings.client_secret
        headers = {
            "content-type": "application/json",
            "x-hubspot-request-timestamp": timestamp,
            "x-hubspot-signature-v3": sign_v3(
                secret, method="POST", uri=self.webhooks.url, body=body, timestamp=timestamp
            ),
            "x-hubspot-signature-version": "v1",
            "x-hubspot-signature": hashlib.sha256(secret.encode() + body).hexdigest(),
        }
        return await self.webhooks.send(body, headers)

    # ------------------------------------------------------------------ HTTP plumbing

    def _routes(self) -> list[Route]:
        guarded = self._guarded
        return [
            Route("/oauth/v3/token", self._token, methods=["POST"]),
            Route("/oauth/v1/token", self._token, methods=["POST"]),
            Route("/crm/v3/objects/{object_type}/search", guarded(self._search, search=True), methods=["POST"]),
            Route("/crm/v3/objects/{object_type}/batch/read", guarded(self._batch_read), methods=["POST"]),
            Route("/crm/v3/objects/{object_type}/batch/update", guarded(self._batch_update), methods=["POST"]),
            Route(
                "/crm/v4/associations/{object_type}/{to_type}/batch/read",
                guarded(self._associations_v4_batch),
                methods=["POST"],
            ),
            Route("/crm/v3/objects/{object_type}", guarded(self._list), methods=["GET"]),
            Route("/crm/v3/objects/{object_type}", guarded(self._create_object), methods=["POST"]),
            Route("/crm/v3/objects/{object_type}/{object_id}", guarded(self._read), methods=["GET"]),
            Route("/crm/v3/objects/{object_type}/{object_id}", guarded(self._update), methods=["PATCH"]),
            Route(
                "/crm/v4/objects/{object_type}/{object_id}/associations/{to_type}",
                guarded(self._associations_v4),
                methods=["GET"],
            ),
            Route("/crm/v3/properties/{object_type}/groups", guarded(self._list_groups), methods=["GET"]),
            Route("/crm/v3/properties/{object_type}/groups", guarded(self._create_group), methods=["POST"]),
            Route("/crm/v3/properties/{object_type}/groups/{group_name}", guarded(self._read_group), methods=["GET"]),
            Route("/crm/v3/properties/{object_type}", guarded(self._list_properties), methods=["GET"]),
            Route("/crm/v3/properties/{object_type}", guarded(self._create_property), methods=["POST"]),
            Route("/crm/v3/properties/{object_type}/{property_name}", guarded(self._read_property), methods=["GET"]),
            Route(
                "/crm/v3/properties/{object_type}/{property_name}", guarded(self._archive_property), methods=["DELETE"]
            ),
            Route("/crm/v3/pipelines/{object_type}", guarded(self._list_pipelines), methods=["GET"]),
            Route("/crm/v3/pipelines/{object_type}/{pipeline_id}", guarded(self._read_pipeline), methods=["GET"]),
        ]

    def _guarded(self, handler: Handler, *, search: bool = False) -> Handler:
        async def endpoint(request: Request) -> Response:
            self.calls[f"{request.method} {_NUMERIC_SEGMENT.sub('/{id}', request.url.path)}"] += 1
            try:
                self._authenticate(request)
                self._authorise(request)
                self._throttle(search)
                await self._keeps_contract(request)
                response = await handler(request)
            except HubSpotError as exc:
                response = JSONResponse(exc.body, status_code=exc.status)
            if not search:
                response.headers.update(self._rate_headers())
            return response

        return endpoint

    async def _keeps_contract(self, request: Request) -> None:
        problems = await self.contract.problems(request)
        if problems:
            raise HubSpotError(400, f"Invalid input JSON: {'; '.join(problems)}", "VALIDATION_ERROR")

    def _authenticate(self, request: Request) -> None:
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if token and token == self._settings.token:
            return
        expires_at = self._access_tokens.get(token)
        if expires_at is None:
            raise HubSpotError(
                401,
                "Authentication credentials not found. This API supports OAuth 2.0 authentication.",
                "INVALID_AUTHENTICATION",
            )
        if expires_at <= self._clock().timestamp():
            raise HubSpotError(401, "The OAuth token used to make this call expired.", "EXPIRED_AUTHENTICATION")

    def _authorise(self, request: Request) -> None:
        """403 ``MISSING_SCOPES`` when the granted scopes lack the one this endpoint needs."""
        needed = _required_scope(request.method, request.url.path)
        if self.scopes is None or needed is None or needed in self.scopes:
            return
        raise HubSpotError(
            403,
            "This app hasn't been granted all required scopes to make this call. "
            "Read more about required scopes here: https://developers.hubspot.com/scopes.",
            "MISSING_SCOPES",
            errors=[
                {
                    "message": "One or more of the following scopes are required.",
                    "context": {"requiredGranularScopes": [needed]},
                }
            ],
            links={"scopes": "https://developers.hubspot.com/scopes"},
        )

    def _throttle(self, search: bool) -> None:
        if search:
            if self._search_limiter.hit("search") is not None:
                raise HubSpotError(
                    429,
                    "You have reached your secondly limit.",
                    "RATE_LIMITS",
                    errorType="RATE_LIMIT",
                    policyName="SECONDLY",
                )
            return
        if self._limiter.hit("api") is not None:
            raise HubSpotError(
                429,
                "You have reached your ten_secondly_rolling limit.",
                "RATE_LIMITS",
                errorType="RATE_LIMIT",
                policyName="TEN_SECONDLY_ROLLING",
            )

    def _rate_headers(self) -> dict[str, str]:
        if self._limiter.limit is None:
            return {}
        return {
            "X-HubSpot-RateLimit-Max": str(self._limiter.limit),
            "X-HubSpot-RateLimit-Remaining": str(self._limiter.remaining("api")),
            "X-HubSpot-RateLimit-Interval-Milliseconds": "10000",
        }

    # ------------------------------------------------------------------ OAuth

    async def _token(self, request: Request) -> Response:
        self.calls[f"POST {request.url.path}"] += 1
        form = {key: values[0] for key, values in parse_qs((await request.body()).decode()).items()}
        settings = self._settings
        if (
            form.get("grant_type") != "refresh_token"
            or form.get("client_id") != settings.client_id
            or form.get("client_secret") != settings.client_secret
            or form.get("refresh_token") != settings.refresh_token
        ):
            message = "refresh token is invalid, expired or revoked"
            body = {
                "error": "invalid_grant",
                "error_description": message,
                "status": "BAD_REFRESH_TOKEN",
                "message": message,
            }
            return JSONResponse(body, status_code=400)
        access = f"emu-at-{uuid.uuid4().hex}"
        self._access_tokens[access] = self._clock().timestamp() + settings.access_token_ttl_s
        return JSONResponse(
            {
                "token_type": "bearer",
                "refresh_token": settings.refresh_token,
                "access_token": access,
                "expires_in": settings.access_token_ttl_s,
                "hub_id": PORTAL_ID,
                "scopes": ["oauth", *sorted(self.scopes)] if self.scopes is not None else _OAUTH_SCOPES,
            }
        )

    # ------------------------------------------------------------------ objects

    async def _read(self, request: Request) -> Response:
        kind = _kind(request.path_params["object_type"])
        record = self._records[kind].get(request.path_params["object_id"])
        archived = request.query_params.get("archived", "false") == "true"
        if record is None or record.archived != archived:
            raise HubSpotError(
                404,
                "Object not found.  objectId are usually numeric.",
                "OBJECT_NOT_FOUND",
                context={"id": [request.path_params["object_id"]]},
            )
        body = _public(record, self._visible(kind, record, _multi(request, "properties")))
        with_history = _multi(request, "propertiesWithHistory")
        if with_history:
            body["propertiesWithHistory"] = _history(record, with_history)
        associations = self._embedded(kind, record.id, _multi(request, "associations"))
        if associations:
            body["associations"] = associations
        return JSONResponse(body)

    async def _list(self, request: Request) -> Response:
        kind = _kind(request.path_params["object_type"])
        limit = _bounded(request.query_params.get("limit"), default=10, maximum=LIST_PAGE_MAX)
        archived = request.query_params.get("archived", "false") == "true"
        after = request.query_params.get("after")
        order = self._order[kind]
        start = bisect.bisect_left(order, int(after)) if after and after.isdigit() else 0
        wanted = _multi(request, "properties")
        associations = _multi(request, "associations")
        results: list[dict[str, Any]] = []
        index = start
        while index < len(order) and len(results) < limit:
            record = self._records[kind][str(order[index])]
            index += 1
            if record.archived == archived:
                results.append(self._listed(kind, record, wanted, associations))
        body: dict[str, Any] = {"results": results}
        if index < len(order):
            body["paging"] = {"next": {"after": str(order[index])}}
        return JSONResponse(body)

    def _listed(self, kind: str, record: _Record, wanted: list[str], associations: list[str]) -> dict[str, Any]:
        body = _public(record, self._visible(kind, record, wanted))
        embedded = self._embedded(kind, record.id, associations)
        if embedded:
            body["associations"] = embedded
        return body

    async def _update(self, request: Request) -> Response:
        kind = _kind(request.path_params["object_type"])
        record = self._records[kind].get(request.path_params["object_id"])
        if record is None or record.archived:
            raise HubSpotError(404, "Object not found.  objectId are usually numeric.", "OBJECT_NOT_FOUND")
        payload = await _json(request)
        values = self._writable(kind, payload.get("properties"))
        return JSONResponse(await self._write(kind, record, values))

    async def _write(self, kind: str, record: _Record, values: Mapping[str, str | None]) -> dict[str, Any]:
        """Apply an API write (history, ``writes``, subscribed webhooks); the record as answered."""
        changed = self._apply(kind, record, values)
        self.writes.append(ApiWrite(object_type=kind, object_id=record.id, properties=dict(values), at=self._clock()))
        if kind == "deals" and self._watched:
            await self._deliver_changes(
                record, [name for name in changed if name in values and name in self._watched], source="API"
            )
        return _public(record, self._visible(kind, record, list(values)))

    async def _create_object(self, request: Request) -> Response:
        kind = _kind(request.path_params["object_type"])
        payload = await _json(request)
        values = self._writable(kind, payload.get("properties"))
        if kind == "deals":
            values = {"pipeline": DEFAULT_PIPELINE, **values}
        missing = [name for name in REQUIRED_ON_CREATE.get(kind, ()) if not values.get(name)]
        if missing:
            raise HubSpotError(400, f"Missing required properties: {', '.join(missing)}", "VALIDATION_ERROR")
        associations = self._requested_links(kind, payload.get("associations") or [])
        record = self._create(kind, values)
        for to_kind, to_id, primary in associations:
            self._link(kind, record.id, to_kind, to_id, primary=primary)
        return JSONResponse(_public(record, self._visible(kind, record, list(values))), status_code=201)

    def _requested_links(self, kind: str, associations: Iterable[Any]) -> list[tuple[str, str, bool]]:
        links: list[tuple[str, str, bool]] = []
        for association in associations:
            to_id = str(association.get("to", {}).get("id", ""))
            for spec in association.get("types", []):
                links.append(self._link_target(kind, to_id, int(spec.get("associationTypeId", 0))))
        return links

    def _link_target(self, kind: str, to_id: str, type_id: int) -> tuple[str, str, bool]:
        for (from_kind, to_kind), (primary, plain) in _ASSOCIATION_TYPES.items():
            if from_kind == kind and type_id in {plain[0], primary[0] if primary else -1}:
                if to_id not in self._records[to_kind]:
                    raise HubSpotError(400, f"No {to_kind} with id {to_id} to associate", "VALIDATION_ERROR")
                return to_kind, to_id, primary is not None and type_id == primary[0]
        raise HubSpotError(400, f"Unknown associationTypeId {type_id} from {kind}", "VALIDATION_ERROR")

    def _writable(self, kind: str, properties: Any) -> dict[str, str | None]:
        if not isinstance(properties, dict):
            raise HubSpotError(400, "Invalid input JSON: properties must be an object", "VALIDATION_ERROR")
        read_only = [
            name
            for name in properties
            if self._properties[kind].get(name, {}).get("modificationMetadata", {}).get("readOnlyValue")
        ]
        if read_only:
            problems = [
                {
                    "isValid": False,
                    "message": f'Property "{name}" is read-only',
                    "error": "READ_ONLY_VALUE",
                    "name": name,
                }
                for name in read_only
            ]
            raise HubSpotError(400, f"Property values were not valid: {json.dumps(problems)}", "VALIDATION_ERROR")
        return self._validated(kind, properties, register=not self._strict)

    async def _batch_read(self, request: Request) -> Response:
        kind = _kind(request.path_params["object_type"])
        payload = await _json(request)
        inputs = payload.get("inputs") or []
        if len(inputs) > BATCH_MAX:
            raise HubSpotError(400, f"Batch input size is limited to {BATCH_MAX}", "VALIDATION_ERROR")
        with_history = [str(name) for name in payload.get("propertiesWithHistory") or []]
        if with_history and len(inputs) > HISTORY_BATCH_MAX:
            raise HubSpotError(
                400,
                f"The maximum number of inputs supported in a batch request for property histories is "
                f"{HISTORY_BATCH_MAX}. Please reduce the number of items and try again",
                "VALIDATION_ERROR",
            )
        wanted = [str(name) for name in payload.get("properties") or []]
        started = iso_ms(self._clock())
        results: list[dict[str, Any]] = []
        missing: list[str] = []
        for item in inputs:
            record = self._records[kind].get(str(item.get("id")))
            if record is None or record.archived:
                missing.append(str(item.get("id")))
                continue
            found = _public(record, self._visible(kind, record, wanted))
            if with_history:
                found["propertiesWithHistory"] = _history(record, with_history)
            results.append(found)
        errors = [
            {
                "status": "error",
                "category": "OBJECT_NOT_FOUND",
                "context": {"ids": missing},
                "message": "Could not get some objects, they may be deleted or not exist.",
            }
        ]
        return self._batch_answer(started, results, errors if missing else [])

    async def _batch_update(self, request: Request) -> Response:
        """``POST /crm/v3/objects/{type}/batch/update``: all inputs are written, or none.

        Each input is checked as the single ``PATCH`` checks it (the record exists and is
        live, its properties are writable and valid) before anything is applied: HubSpot
        documents no partial success for batch updates ("If there are any errors in the
        request, the entire request will fail and no updates will be applied", the v1
        deals batch update: https://developers.hubspot.com/docs/api-reference/legacy/crm/objects/deals/v1/put-deals-v1-batch-async-update.md).
        At most 100 inputs (the same page). Emulator choices: an unknown id is answered
        404 ``OBJECT_NOT_FOUND`` naming the ids in ``context.ids`` (as the single PATCH
        and the batch read's error), a repeated id 400; the answer is the SDK's
        ``BatchResponseSimplePublicObject`` (crm/objects/models).
        """
        kind = _kind(request.path_params["object_type"])
        payload = await _json(request)
        inputs = payload.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise HubSpotError(400, "Invalid input JSON: inputs must be a non-empty list", "VALIDATION_ERROR")
        if len(inputs) > BATCH_MAX:
            raise HubSpotError(400, f"Batch input size is limited to {BATCH_MAX}", "VALIDATION_ERROR")
        ids = [str(item.get("id")) if isinstance(item, dict) else "" for item in inputs]
        repeated = sorted({object_id for object_id in ids if ids.count(object_id) > 1})
        if repeated:
            raise HubSpotError(400, f"Duplicate IDs found in batch input: {repeated}", "VALIDATION_ERROR")
        missing = [object_id for object_id in ids if not self._live(kind, object_id)]
        if missing:
            raise HubSpotError(
                404,
                "Could not update some objects, they may be deleted or not exist.",
                "OBJECT_NOT_FOUND",
                context={"ids": missing},
            )
        writes = [
            (self._records[kind][object_id], self._writable(kind, item.get("properties")))
            for object_id, item in zip(ids, inputs, strict=True)
        ]
        started = iso_ms(self._clock())
        results = [await self._write(kind, record, values) for record, values in writes]
        return self._batch_answer(started, results, [])

    def _live(self, kind: str, object_id: str) -> bool:
        record = self._records[kind].get(object_id)
        return record is not None and not record.archived

    # ------------------------------------------------------------------ search

    async def _search(self, request: Request) -> Response:
        kind = _kind(request.path_params["object_type"])
        raw = await request.body()
        if len(raw.decode(errors="replace")) > SEARCH_BODY_LIMIT:
            raise HubSpotError(400, f"Search request body exceeds {SEARCH_BODY_LIMIT} characters", "VALIDATION_ERROR")
        payload = await _json(request)
        limit = _bounded(payload.get("limit"), default=10, maximum=SEARCH_PAGE_MAX)
        after = str(payload.get("after") or "0")
        if not after.isdigit():
            raise HubSpotError(400, "after must be formatted as an integer", "VALIDATION_ERROR")
        offset = int(after)
        cap = self._settings.search_result_cap
        if offset >= cap:
            raise HubSpotError(400, f"Cannot page beyond {cap} results", "VALIDATION_ERROR")
        matches = self._sorted(kind, self._matching(kind, payload), payload.get("sorts") or [])
        end = min(offset + limit, len(matches), cap)
        wanted = [str(name) for name in payload.get("properties") or []]
        body: dict[str, Any] = {
            "total": len(matches),
            "results": [_public(record, self._visible(kind, record, wanted)) for record in matches[offset:end]],
        }
        if end < len(matches):
            body["paging"] = {"next": {"after": str(end)}}
        return JSONResponse(body)

    def _matching(self, kind: str, payload: Mapping[str, Any]) -> list[_Record]:
        groups = payload.get("filterGroups") or []
        if len(groups) > 5 or sum(len(group.get("filters") or []) for group in groups) > 18:
            raise HubSpotError(400, "Too many filterGroups or filters", "VALIDATION_ERROR")
        compiled = [[self._predicate(kind, condition) for condition in group.get("filters") or []] for group in groups]
        query = str(payload.get("query") or "").lower()
        found: list[_Record] = []
        for record in self._records[kind].values():
            if record.archived:
                continue
            if compiled and not any(all(test(record) for test in group) for group in compiled):
                continue
            if query and not any(query in (value or "").lower() for value in record.properties.values()):
                continue
            found.append(record)
        return found

    def _predicate(self, kind: str, condition: Mapping[str, Any]) -> Callable[[_Record], bool]:
        """One filter compiled once per search: its operand is parsed once, not per record."""
        name = str(condition.get("propertyName", ""))
        prop_type = self._properties[kind].get(name, {}).get("type", "string")
        operator = str(condition.get("operator", "EQ"))
        if operator in {"HAS_PROPERTY", "NOT_HAS_PROPERTY"}:
            wanted = operator == "HAS_PROPERTY"
            return lambda record: bool(record.properties.get(name)) is wanted
        compare = _comparison(operator, prop_type, condition)

        def test(record: _Record) -> bool:
            actual = record.properties.get(name)
            if not actual:
                return operator in {"NEQ", "NOT_IN", "NOT_CONTAINS_TOKEN"}
            try:
                return compare(_sort_key(prop_type, actual))
            except TypeError as exc:
                raise HubSpotError(400, f"Cannot compare values of {name}", "VALIDATION_ERROR") from exc

        return test

    def _sorted(self, kind: str, records: list[_Record], sorts: Sequence[Any]) -> list[_Record]:
        records.sort(key=lambda record: int(record.id))
        if not sorts:
            return records
        first = sorts[0]
        if isinstance(first, str):
            name, descending = first.lstrip("-"), first.startswith("-")
        else:
            name, descending = str(first.get("propertyName")), first.get("direction") == "DESCENDING"
        prop_type = self._properties[kind].get(name, {}).get("type", "string")
        present = [record for record in records if record.properties.get(name)]
        absent = [record for record in records if not record.properties.get(name)]
        present.sort(key=lambda record: _sort_key(prop_type, record.properties[name] or ""), reverse=descending)
        return present + absent

    # ------------------------------------------------------------------ associations

    def _embedded(self, kind: str, object_id: str, wanted: list[str]) -> dict[str, Any]:
        blocks: dict[str, Any] = {}
        for name in wanted:
            to_kind = TYPE_ALIASES.get(name)
            if to_kind is None or (kind, to_kind) not in _ASSOCIATION_TYPES:
                continue
            primary, plain = _ASSOCIATION_TYPES[(kind, to_kind)]
            names = {plain[0]: plain[1], **({primary[0]: primary[1]} if primary else {})}
            results = [
                {"id": to_id, "type": names.get(type_id, f"{kind}_to_{to_kind}")}
                for to_id, link in self._links.get((kind, object_id, to_kind), {}).items()
                for category, type_id, _ in link.kinds
                if category == "HUBSPOT_DEFINED"
            ]
            if results:
                blocks[ASSOCIATION_KEYS[to_kind]] = {"results": results}
        return blocks

    async def _associations_v4(self, request: Request) -> Response:
        kind = _kind(request.path_params["object_type"])
        to_kind = _kind(request.path_params["to_type"])
        limit = _bounded(request.query_params.get("limit"), default=V4_PAGE_DEFAULT, maximum=V4_PAGE_DEFAULT)
        after = request.query_params.get("after") or "0"
        offset = int(after) if after.isdigit() else 0
        links = sorted(
            self._links.get((kind, request.path_params["object_id"], to_kind), {}).items(),
            key=lambda item: int(item[0]),
        )
        body: dict[str, Any] = {"results": _associated(links[offset : offset + limit])}
        if offset + limit < len(links):
            body["paging"] = {"next": {"after": str(offset + limit)}}
        return JSONResponse(body)

    async def _associations_v4_batch(self, request: Request) -> Response:
        """``POST /crm/v4/associations/{from}/{to}/batch/read``: each input's associations, a page each.

        Body: ``inputs: [{id, after?}]`` (the SDK's ``BatchInputPublicFetchAssociationsBatchRequest``),
        at most :data:`V4_BATCH_MAX`. Answer: ``results[]`` of ``{from: {id}, to: [{toObjectId,
        associationTypes}], paging?}`` (``PublicAssociationMultiWithLabel``; ``from.id`` a
        string, ``toObjectId`` a number), 200, or 207 with ``errors``: an id without
        associations of that type, existing or not, is left out of ``results`` and listed
        as ``OBJECT_NOT_FOUND``/``crm.associations.NO_ASSOCIATIONS_FOUND`` with HubSpot's
        message "No company is associated with deal 5156…" and ``context`` ``fromObjectId``,
        ``fromObjectType``, ``toObjectType`` (real answers as quoted in public client code;
        the SDK's ``BatchResponsePublicAssociationMultiWithLabelWithErrors`` and
        ``StandardError``, whose ``links`` and ``errors`` are required). ``paging.next.after``
        is an offset into that record's list (emulator choice, as on the single-record read).
        """
        kind = _kind(request.path_params["object_type"])
        to_kind = _kind(request.path_params["to_type"])
        payload = await _json(request)
        inputs = payload.get("inputs")
        if not isinstance(inputs, list):
            raise HubSpotError(400, "Invalid input JSON: inputs must be a list", "VALIDATION_ERROR")
        if len(inputs) > V4_BATCH_MAX:
            raise HubSpotError(400, f"Batch input size is limited to {V4_BATCH_MAX}", "VALIDATION_ERROR")
        started = iso_ms(self._clock())
        results: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for item in inputs:
            from_id = str(item.get("id"))
            after = str(item.get("after") or "0")
            page = self._association_page(kind, from_id, to_kind, int(after) if after.isdigit() else 0)
            if page is None:
                errors.append(self._no_associations(kind, from_id, to_kind))
            else:
                results.append(page)
        return self._batch_answer(started, results, errors)

    def _batch_answer(self, started: str, results: list[dict[str, Any]], errors: list[dict[str, Any]]) -> Response:
        """A batch answer (the SDK's ``BatchResponse...``): 200, or 207 with ``numErrors`` and ``errors``."""
        body: dict[str, Any] = {
            "status": "COMPLETE",
            "results": results,
            "startedAt": started,
            "completedAt": iso_ms(self._clock()),
        }
        if not errors:
            return JSONResponse(body)
        body.update(numErrors=len(errors), errors=errors)
        return JSONResponse(body, status_code=207)

    def _association_page(self, kind: str, from_id: str, to_kind: str, offset: int) -> dict[str, Any] | None:
        """One record's page of associations from ``offset`` (``None``: it has none there)."""
        links = sorted(self._links.get((kind, from_id, to_kind), {}).items(), key=lambda item: int(item[0]))
        size = self._association_page_size
        page = links[offset : offset + size]
        if not page:
            return None
        result: dict[str, Any] = {"from": {"id": from_id}, "to": _associated(page)}
        if offset + size < len(links):
            result["paging"] = {"next": {"after": str(offset + size)}}
        return result

    @staticmethod
    def _no_associations(kind: str, from_id: str, to_kind: str) -> dict[str, Any]:
        return {
            "status": "error",
            "category": "OBJECT_NOT_FOUND",
            "subCategory": "crm.associations.NO_ASSOCIATIONS_FOUND",
            "message": f"No {SINGULAR[to_kind]} is associated with {SINGULAR[kind]} {from_id}.",
            "context": {
                "fromObjectId": [from_id],
                "fromObjectType": [SINGULAR[kind]],
                "toObjectType": [SINGULAR[to_kind]],
            },
            "links": {},
            "errors": [],
        }

    # ------------------------------------------------------------------ properties

    async def _list_properties(self, request: Request) -> Response:
        kind = _kind(request.path_params["object_type"])
        archived = request.query_params.get("archived", "false").lower() == "true"
        listed = self._archived[kind] if archived else self._properties[kind]
        return JSONResponse({"results": list(listed.values())})

    async def _archive_property(self, request: Request) -> Response:
        kind = _kind(request.path_params["object_type"])
        name = request.path_params["property_name"]
        definition = self._properties[kind].get(name)
        if definition is None:
            raise HubSpotError(404, f"Unable to find property {name} on {kind}", "OBJECT_NOT_FOUND")
        if not definition["modificationMetadata"]["archivable"]:
            raise HubSpotError(400, f"Property {name} is HubSpot-defined and cannot be archived", "VALIDATION_ERROR")
        self.archive_property(kind, name)
        return Response(status_code=204)

    async def _read_property(self, request: Request) -> Response:
        kind = _kind(request.path_params["object_type"])
        definition = self._properties[kind].get(request.path_params["property_name"])
        if definition is None:
            name = request.path_params["property_name"]
            raise HubSpotError(404, f"Unable to find property {name} on {kind}", "OBJECT_NOT_FOUND")
        return JSONResponse(definition)

    async def _create_property(self, request: Request) -> Response:
        kind = _kind(request.path_params["object_type"])
        payload = await _json(request)
        missing = [key for key in ("name", "label", "type", "fieldType", "groupName") if not payload.get(key)]
        if missing:
            raise HubSpotError(400, f"Missing required fields: {', '.join(missing)}", "VALIDATION_ERROR")
        name, prop_type, field_type = str(payload["name"]), str(payload["type"]), str(payload["fieldType"])
        if field_type not in FIELD_TYPES.get(prop_type, set()):
            raise HubSpotError(400, f"fieldType {field_type} is not valid for type {prop_type}", "VALIDATION_ERROR")
        if payload["groupName"] not in self._groups[kind]:
            raise HubSpotError(400, f"Property group {payload['groupName']} does not exist", "VALIDATION_ERROR")
        if name in self._properties[kind]:
            raise HubSpotError(409, f"Property named '{name}' already exists.", "CONFLICT")
        definition = self._define(
            kind, name, prop_type, field_type, group=str(payload["groupName"]), hubspot=False, read_only=False
        )
        definition["label"] = str(payload["label"])
        definition["description"] = str(payload.get("description") or "")
        definition["options"] = [_option(index, option) for index, option in enumerate(payload.get("options") or [])]
        return JSONResponse(definition, status_code=201)

    async def _list_groups(self, request: Request) -> Response:
        kind = _kind(request.path_params["object_type"])
        return JSONResponse({"results": list(self._groups[kind].values())})

    async def _read_group(self, request: Request) -> Response:
        kind = _kind(request.path_params["object_type"])
        group = self._groups[kind].get(request.path_params["group_name"])
        if group is None:
            name = request.path_params["group_name"]
            raise HubSpotError(404, f"Unable to find property group {name} on {kind}", "OBJECT_NOT_FOUND")
        return JSONResponse(group)

    async def _create_group(self, request: Request) -> Response:
        kind = _kind(request.path_params["object_type"])
        payload = await _json(request)
        name, label = payload.get("name"), payload.get("label")
        if not name or not label:
            raise HubSpotError(400, "Missing required fields: name, label", "VALIDATION_ERROR")
        if name in self._groups[kind]:
            raise HubSpotError(409, f"Property group '{name}' already exists.", "CONFLICT")
        group = {
            "name": str(name),
            "label": str(label),
            "displayOrder": int(payload.get("displayOrder", -1)),
            "archived": False,
        }
        self._groups[kind][str(name)] = group
        return JSONResponse(group, status_code=201)

    # ------------------------------------------------------------------ pipelines

    async def _list_pipelines(self, request: Request) -> Response:
        kind = _kind(request.path_params["object_type"])
        return JSONResponse({"results": [self._pipeline()] if kind == "deals" else []})

    async def _read_pipeline(self, request: Request) -> Response:
        kind = _kind(request.path_params["object_type"])
        if kind != "deals" or request.path_params["pipeline_id"] != DEFAULT_PIPELINE:
            raise HubSpotError(404, "Pipeline not found", "OBJECT_NOT_FOUND")
        return JSONResponse(self._pipeline())

    def _pipeline(self) -> dict[str, Any]:
        stamp = iso_ms(self._boot)
        stages = [
            {
                "id": stage_id,
                "label": label,
                "displayOrder": order,
                "metadata": {"isClosed": "true" if closed else "false", "probability": probability},
                "createdAt": stamp,
                "updatedAt": stamp,
                "archived": False,
                "writePermissions": "CRM_PERMISSIONS_ENFORCEMENT",
            }
            for order, (stage_id, label, probability, closed) in enumerate(_STAGES)
        ]
        return {
            "id": DEFAULT_PIPELINE,
            "label": "Sales Pipeline",
            "displayOrder": 0,
            "stages": stages,
            "createdAt": stamp,
            "updatedAt": stamp,
            "archived": False,
        }

    # ------------------------------------------------------------------ reading helpers

    def _visible(self, kind: str, record: _Record, wanted: list[str]) -> dict[str, str | None]:
        names = list(wanted) or list(DEFAULT_PROPERTIES[kind])
        names += ["createdate", MODIFIED_PROPERTY[kind], "hs_object_id"]
        defined = self._properties[kind]
        return {name: record.properties.get(name) for name in dict.fromkeys(names) if name in defined}


# ---------------------------------------------------------------------- request contract

# (method, path, SDK models module, model) for each body the emulator takes: the
# operations' request bodies in hubspot-api-client (crm/objects/api/basic_api.py ``create``
# and ``update``, batch_api.py ``read`` and ``update``, search_api.py ``do_search``;
# crm/associations/v4/api/batch_api.py ``get_page``;
# crm/properties/api/core_api.py ``create``, groups_api.py ``create``). Tasks are checked
# against the tasks client's own models first (crm/objects/tasks/api/basic_api.py and
# search_api.py), the first match winning.
_BODY_MODELS: tuple[tuple[str, re.Pattern[str], str, str], ...] = (
    ("POST", re.compile(r"/crm/v3/objects/tasks/search"), "hubspot.crm.objects.tasks", "PublicObjectSearchRequest"),
    ("POST", re.compile(r"/crm/v3/objects/tasks"), "hubspot.crm.objects.tasks", "SimplePublicObjectInputForCreate"),
    ("PATCH", re.compile(r"/crm/v3/objects/tasks/[^/]+"), "hubspot.crm.objects.tasks", "SimplePublicObjectInput"),
    ("POST", re.compile(r"/crm/v3/objects/[^/]+/search"), "hubspot.crm.objects", "PublicObjectSearchRequest"),
    (
        "POST",
        re.compile(r"/crm/v3/objects/[^/]+/batch/read"),
        "hubspot.crm.objects",
        "BatchReadInputSimplePublicObjectId",
    ),
    (
        "POST",
        re.compile(r"/crm/v3/objects/[^/]+/batch/update"),
        "hubspot.crm.objects",
        "BatchInputSimplePublicObjectBatchInput",
    ),
    (
        "POST",
        re.compile(r"/crm/v4/associations/[^/]+/[^/]+/batch/read"),
        "hubspot.crm.associations.v4",
        "BatchInputPublicFetchAssociationsBatchRequest",
    ),
    ("POST", re.compile(r"/crm/v3/objects/[^/]+"), "hubspot.crm.objects", "SimplePublicObjectInputForCreate"),
    ("PATCH", re.compile(r"/crm/v3/objects/[^/]+/[^/]+"), "hubspot.crm.objects", "SimplePublicObjectInput"),
    ("POST", re.compile(r"/crm/v3/properties/[^/]+/groups"), "hubspot.crm.properties", "PropertyGroupCreate"),
    ("POST", re.compile(r"/crm/v3/properties/[^/]+"), "hubspot.crm.properties", "PropertyCreate"),
)
_PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "datetime": (str,),
    "date": (str,),
}
# The search guide's sort object ("sorts": [{"propertyName": "createdate", "direction":
# "DESCENDING"}], https://developers.hubspot.com/docs/api-reference/legacy/crm/search-the-crm).
SORT_DIRECTIONS = ("ASCENDING", "DESCENDING")


class SdkContract:
    """HubSpot's request models, as the official ``hubspot-api-client`` SDK generates them.

    The SDK is a test dependency: it is imported when the contract is built, so an
    emulator without a contract (the demo) never needs it.

    Raises:
        ModuleNotFoundError: ``hubspot-api-client`` is not installed (``pip install -e '.[dev]'``).
    """

    def __init__(self) -> None:
        self._models: list[tuple[str, re.Pattern[str], Any, Any]] = []
        for method, pattern, package, name in _BODY_MODELS:
            models = importlib.import_module(f"{package}.models")
            configuration = importlib.import_module(f"{package}.configuration").Configuration()
            configuration.client_side_validation = True
            self._models.append((method, pattern, getattr(models, name), configuration))

    def problems(self, call: Call) -> list[str]:
        """The body's problems against its operation's model (none for a call without a body model)."""
        for method, pattern, model, configuration in self._models:
            if call.method == method and pattern.fullmatch(call.path):
                try:
                    payload = json.loads(call.body or b"{}")
                except ValueError as exc:
                    return [f"{model.__name__}: the body is not JSON ({exc})"]
                return _fit(model, payload, model.__name__, configuration)
        return []


def _fit(model: Any, data: Any, place: str, configuration: Any) -> list[str]:
    """Problems of ``data`` as an instance of the SDK ``model``: unknown fields, types, required, enums."""
    if not isinstance(data, dict):
        return [f"{place}: expected an object ({model.__name__}), got {type(data).__name__}"]
    names = {key: attribute for attribute, key in model.attribute_map.items()}
    problems = [
        f"{place}.{key}: not a field of {model.__name__} (fields: {', '.join(sorted(names))})"
        for key in data
        if key not in names
    ]
    values = {names[key]: value for key, value in data.items() if key in names}
    for attribute, value in values.items():
        where = f"{place}.{model.attribute_map[attribute]}"
        if model.__name__ == "PublicObjectSearchRequest" and attribute == "sorts":
            problems += _sorts(value, where)
        else:
            problems += _fit_type(model.openapi_types[attribute], value, where, model, configuration)
    if not problems:
        try:
            model(**values, local_vars_configuration=configuration)
        except ValueError as exc:  # the model's client-side validation: a required field or an enum
            problems.append(f"{place}: {exc}")
    return problems


def _fit_type(kind: str, value: Any, place: str, model: Any, configuration: Any) -> list[str]:
    """Problems of ``value`` as the SDK type ``kind`` (``str``, ``list[Filter]``, ``dict[str, str]`` ...)."""
    if value is None:
        return []  # a None for a required field is the model's own check
    if kind.startswith("list["):
        if not isinstance(value, list):
            return [f"{place}: expected a list, got {type(value).__name__}"]
        return [
            problem
            for index, item in enumerate(value)
            for problem in _fit_type(kind[5:-1], item, f"{place}[{index}]", model, configuration)
        ]
    if kind.startswith(("dict[", "dict(")):
        if not isinstance(value, dict):
            return [f"{place}: expected an object, got {type(value).__name__}"]
        inner = kind[5:-1].split(",", 1)[1].strip()
        return [
            problem
            for key, item in value.items()
            for problem in _fit_type(inner, item, f"{place}.{key}", model, configuration)
        ]
    if kind == "object":
        return []
    if kind in _PRIMITIVES:
        expected = _PRIMITIVES[kind]
        wrong_bool = isinstance(value, bool) and bool not in expected
        if wrong_bool or not isinstance(value, expected):
            return [f"{place}: expected {kind}, got {type(value).__name__} {value!r}"]
        return []
    nested = getattr(importlib.import_module(model.__module__.rsplit(".", 1)[0]), kind)
    return _fit(nested, value, place, configuration)


def _sorts(value: Any, place: str) -> list[str]:
    """A search's ``sorts``: property names (the SDK's ``list[str]``) or the guide's sort objects."""
    if not isinstance(value, list):
        return [f"{place}: expected a list, got {type(value).__name__}"]
    problems: list[str] = []
    for index, item in enumerate(value):
        where = f"{place}[{index}]"
        if isinstance(item, str):
            continue
        if not isinstance(item, dict):
            problems.append(f"{where}: expected a property name or a sort object, got {type(item).__name__}")
            continue
        unknown = sorted(set(item) - {"propertyName", "direction"})
        if unknown:
            problems.append(f"{where}: not fields of a sort: {', '.join(unknown)} (fields: direction, propertyName)")
        if not isinstance(item.get("propertyName"), str):
            problems.append(f"{where}.propertyName: required, a property name")
        if item.get("direction", "ASCENDING") not in SORT_DIRECTIONS:
            problems.append(f"{where}.direction: {item['direction']!r} must be one of {', '.join(SORT_DIRECTIONS)}")
    return problems


# ---------------------------------------------------------------------- pure helpers


def _public(record: _Record, properties: Mapping[str, str | None] | None) -> dict[str, Any]:
    return {
        "id": record.id,
        "properties": dict(record.properties if properties is None else properties),
        "createdAt": iso_ms(record.created),
        "updatedAt": iso_ms(record.updated),
        "archived": record.archived,
    }


def _history(record: _Record, names: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """``propertiesWithHistory``: each asked property's values, newest first.

    Properties the record does not have are left out, as HubSpot documents ("If any of
    the specified properties are not present on the requested object(s), they will be
    ignored": hubspot-api-client, crm/deals/api/basic_api.py ``get_by_id``). Entries are
    the SDK's ``ValueWithTimestamp`` (crm/deals/models/value_with_timestamp.py).
    """
    return {
        name: [
            {"value": value or "", "timestamp": iso_ms(at), "sourceType": "CRM_UI"}
            for value, at in record.history.get(name, [])
        ]
        for name in names
        if name in record.properties
    }


def _associated(page: Sequence[tuple[str, _Link]]) -> list[dict[str, Any]]:
    """v4 associated records (``MultiAssociatedObjectWithLabel``): ``toObjectId`` and every type/label linking it."""
    return [
        {
            "toObjectId": int(to_id),
            "associationTypes": [
                {"category": category, "typeId": type_id, "label": label} for category, type_id, label in link.kinds
            ],
        }
        for to_id, link in page
    ]


def _kind(name: str) -> str:
    kind = TYPE_ALIASES.get(name)
    if kind is None:
        raise HubSpotError(400, f"Unable to infer object type from: {name}", "VALIDATION_ERROR")
    return kind


def _multi(request: Request, key: str) -> list[str]:
    """A list query parameter, repeated (``a=1&a=2``, the SDK's form) or comma-separated."""
    return [part.strip() for value in request.query_params.getlist(key) for part in value.split(",") if part.strip()]


def _bounded(value: Any, *, default: int, maximum: int) -> int:
    try:
        number = int(value) if value is not None else default
    except (TypeError, ValueError) as exc:
        raise HubSpotError(400, f"limit must be an integer, got {value!r}", "VALIDATION_ERROR") from exc
    if number < 1 or number > maximum:
        raise HubSpotError(400, f"limit must be between 1 and {maximum}", "VALIDATION_ERROR")
    return number


async def _json(request: Request) -> dict[str, Any]:
    try:
        payload = json.loads(await request.body() or b"{}")
    except ValueError as exc:
        raise HubSpotError(400, "Invalid input JSON on line 1", "VALIDATION_ERROR") from exc
    if not isinstance(payload, dict):
        raise HubSpotError(400, "Invalid input JSON: expected an object", "VALIDATION_ERROR")
    return payload


def _option(index: int, option: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "label": str(option.get("label", option.get("value", ""))),
        "value": str(option.get("value", "")),
        "displayOrder": int(option.get("displayOrder", index)),
        "hidden": bool(option.get("hidden", False)),
        "description": str(option.get("description") or ""),
    }


def _normalise(name: str, definition: Mapping[str, Any] | None, raw: Any) -> str | None:
    """A value as HubSpot stores it; ``ValueError(message, error_code)`` when it refuses it."""
    if definition is None:
        raise ValueError(f'Property "{name}" does not exist', "PROPERTY_DOESNT_EXIST")
    if raw is None or raw == "":
        return "" if raw == "" else None
    text = str(raw).lower() if isinstance(raw, bool) else str(raw)
    prop_type = definition["type"]
    if prop_type == "number":
        return _number(name, text)
    if prop_type == "date":
        return _date(name, text)
    if prop_type == "datetime":
        return _datetime(name, text)
    if prop_type == "bool" and text not in {"true", "false"}:
        raise ValueError(f"{text} was not a valid boolean", "INVALID_BOOLEAN")
    options = {option["value"] for option in definition.get("options") or []}
    if prop_type == "enumeration" and options and not set(text.strip(";").split(";")) <= options:
        raise ValueError(f"{text} was not one of the allowed options: {sorted(options)}", "INVALID_OPTION")
    return text


def _number(name: str, text: str) -> str:
    try:
        Decimal(text)
    except InvalidOperation as exc:
        raise ValueError(f"{text} was not a valid number", "INVALID_FLOAT") from exc
    return text


def _date(name: str, text: str) -> str:
    """``date`` properties take ``YYYY-MM-DD`` or midnight-UTC epoch ms; they read back as ``YYYY-MM-DD``."""
    if text.isdigit():
        moment = datetime.fromtimestamp(int(text) / 1000, tz=UTC)
        if (moment.hour, moment.minute, moment.second, moment.microsecond) != (0, 0, 0, 0):
            raise ValueError(f"{text} is not midnight UTC", "INVALID_DATE")
        return moment.date().isoformat()
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError as exc:
        raise ValueError(f"{text} was not a valid date", "INVALID_DATE") from exc


def _datetime(name: str, text: str) -> str:
    try:
        return iso_ms(parse_hubspot_time(text))
    except ValueError as exc:
        raise ValueError(f"{text} was not a valid datetime", "INVALID_DATE") from exc


def _sort_key(prop_type: str, value: str) -> Any:
    """Comparable form of a value: ISO text for dates (stored normalised, so text order is time
    order; epoch-ms filter values are converted), Decimal for numbers, lower-case text otherwise."""
    try:
        if prop_type == "datetime":
            return value if _ISO_MS.fullmatch(value) else iso_ms(parse_hubspot_time(value))
        if prop_type == "date":
            return parse_hubspot_time(value).date().isoformat() if value.isdigit() else value
        if prop_type == "number":
            return Decimal(value)
    except (ValueError, InvalidOperation):
        return value.lower()
    return value.lower()


def _comparison(operator: str, prop_type: str, condition: Mapping[str, Any]) -> Callable[[Any], bool]:
    """A test of a stored value's comparable form against the filter's operand(s)."""

    def operand(value: Any) -> Any:
        return _sort_key(prop_type, str(value))

    if operator in {"IN", "NOT_IN"}:
        values = {operand(value) for value in condition.get("values") or []}
        return (lambda actual: actual in values) if operator == "IN" else (lambda actual: actual not in values)
    if operator in {"CONTAINS_TOKEN", "NOT_CONTAINS_TOKEN"}:
        pattern = re.compile(re.escape(str(condition.get("value", "")).lower()).replace(r"\*", ".*"))
        wanted = operator == "CONTAINS_TOKEN"
        return lambda actual: (pattern.search(str(actual)) is not None) is wanted
    value = operand(condition.get("value", ""))
    if operator == "BETWEEN":
        high = operand(condition.get("highValue", ""))
        return lambda actual: bool(value <= actual <= high)
    comparisons: dict[str, Callable[[Any], bool]] = {
        "EQ": lambda actual: bool(actual == value),
        "NEQ": lambda actual: bool(actual != value),
        "LT": lambda actual: bool(actual < value),
        "LTE": lambda actual: bool(actual <= value),
        "GT": lambda actual: bool(actual > value),
        "GTE": lambda actual: bool(actual >= value),
    }
    if operator not in comparisons:
        raise HubSpotError(400, f"Unknown filter operator {operator}", "VALIDATION_ERROR")
    return comparisons[operator]
