"""A stateful local fake of Xero's identity service and Accounting API.

It speaks Xero's JSON wire format closely enough that the official ``xero-python`` SDK
and the published OpenAPI file (``specs/xero/xero_accounting.yaml``) accept it:
``/api.xro/2.0`` paths, PascalCase fields, ``/Date(ms+0000)/`` dates with their
``DateString`` twins, the ``Id/Status/ProviderName/DateTimeUTC`` envelope, paging with a
``pagination`` object, ``ValidationException`` bodies, ``Idempotency-Key`` replay,
``If-Modified-Since``, the small ``where`` grammar the connector uses, rate limits with
Xero's headers, and signed webhooks.

Routes (one app; point each setting at it):

* ``POST /connect/token``: client credentials, authorization code, refresh token
  (identity.xero.com/connect/token). Refresh tokens are single-use: a spent one is
  answered ``invalid_grant``. (Xero itself accepts a spent refresh token for a 30-minute
  grace period, https://developer.xero.com/faq/oauth2; the emulator is stricter, as asked.)
* ``GET /identity/connect/authorize``: consents at once and redirects back with a code
  (login.xero.com/identity/connect/authorize).
* ``GET /connections`` (``xero-identity.yaml``).
* ``/api.xro/2.0/``: Organisation, Accounts, TaxRates, Currencies, TrackingCategories
  (GET); Contacts, Invoices, CreditNotes (GET/PUT/POST, and by id); ``Invoices/{id}/Email``;
  ``CreditNotes/{id}/Allocations`` (PUT); Payments.

Ledger rules it enforces on SUBMITTED and AUTHORISED invoices and credit notes (drafts
are accepted without them, as Xero does):

* every line has an account code: "Account code must be specified" (Xero's wording, as
  reported in https://github.com/benedwards44/Apex-for-Xero/issues/9 and
  https://github.com/calcinai/xero-php/issues/230; drafts may leave it out:
  https://github.com/XeroAPI/xero-node/issues/398);
* the date is after the lock dates (``PeriodLockDate``, ``EndOfYearLockDate`` on
  ``GET /Organisation``, spec schema ``Organisation``): "The document date cannot be
  before the period lock date, currently set at 30-Nov-2018" (Xero's wording, as quoted at
  https://www.chargebee.com/docs/billing/2.0/kb/accounting/how-to-check-the-lock-date-in-xero
  and https://help.dext.com/en/articles/105721-how-do-xero-lock-dates-affect-publishing-in-dext,
  which also says a lock date stops changes "on or before the set date" and that drafts
  can still be published);
* a line's tracking names a category and option that exist (``GET /TrackingCategories``).

Batches (several Contacts, Invoices or CreditNotes in one PUT or POST) are taken element
by element, as Xero does: a good element is created even when another in the same
request fails. By default the answer is then a 400 ``ValidationException`` whose
``Elements`` are the failing elements with their ``ValidationErrors``, so the created
ones are not named (observed, and explained by a Xero staff answer, at
https://stackoverflow.com/questions/52706101/xero-api-response-when-request-has-valid-and-invalid-elements);
with ``summarizeErrors=false`` it is a 200 listing every element in order, the good ones
with ``StatusAttributeString: OK`` and the failing ones with ``ERROR``,
``HasErrors: true`` and their ``ValidationErrors`` (spec parameter ``summarizeErrors``:
"If false return 200 OK and mix of successfully created objects and any with validation
errors").

A refused element is answered in Xero's shape, as the spec's ``StatusAttributeString:
ERROR`` examples show it (dates, lines and totals as computed, the empty id
``00000000-0000-0000-0000-000000000000``). ``faults.refuse_element(match, message)``
(:class:`~connectors.emulation.ElementFault`) refuses the next new invoice or credit note
whose ``Reference`` contains ``match``, as if Xero had found it invalid. A PUT or POST
body over 3.5 MB is refused whole with 413 before anything is stored (see
:data:`REQUEST_MAX_BYTES`).

A request without ``Accept: application/json`` is refused with 406 before anything else:
Xero would answer it in XML ("By default all successful responses on the accounting API
are returned as XML", https://developer.xero.com/documentation/api/requests-and-responses),
which a JSON client cannot read, so the emulator makes that mistake loud rather than
inventing an XML body.

Given a ``contract`` (:class:`~connectors.emulation.OpenApiContract` over
``specs/xero/xero_accounting.yaml``, as ``tests/connectors/test_strict.py`` builds it),
each authenticated Accounting API request is also validated against the published
description (parameters, headers, body schema: required fields, types, enums) and a
breach is answered with the spec's ``400Error`` body, a ``ValidationException`` whose one
element carries every problem; it is kept in ``XeroEmulator.contract.breaches``.

Credit note allocations (``PUT /CreditNotes/{id}/Allocations``, spec operation
``createCreditNoteAllocation``) are checked strictly: both documents AUTHORISED, same
contact and currency, the amount at most the credit left and the invoice's amount due;
they lower ``RemainingCredit`` and ``AmountDue`` (a document at zero becomes PAID).
Webhooks are delivered by the test-facing :meth:`XeroEmulator.allocate` (CREDITNOTE and
INVOICE UPDATE), not by the API route, as :meth:`XeroEmulator.pay_invoice` does for payments.

Emulator data, not Xero's: one Australian demo organisation; the tax rates OUTPUT 10 %,
INPUT 10 %, EXEMPTOUTPUT 0 %, NONE 0 %; accounts 200/260 (revenue), 400 (expense) and
090 (bank); currencies AUD, USD, NZD, GBP, EUR. Validation messages quoted from Xero's
documentation are marked as such; the others are the emulator's own wording.

Calls are counted in :attr:`XeroEmulator.calls` under the spec's ``operationId``
(``createInvoices``, ``getInvoices`` …) plus ``token``, ``authorize`` and ``connections``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
import secrets
import string
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qs, urlencode

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from connectors.emulation import (
    Contract,
    ContractGate,
    Delivery,
    FaultMiddleware,
    FaultPlan,
    WebhookSender,
    WindowLimiter,
)
from connectors.xero.models import (
    dump_json,
    format_xero_date,
    format_xero_datetime,
    load_json,
    parse_xero_date,
    parse_xero_datetime,
)
from syncd.core.money import round_money

DEFAULT_TENANT_ID = "3f7c2a6e-9b1d-4e58-a2c4-6d0e8f1b7a39"
API = "/api.xro/2.0"
PROVIDER_NAME = "syncd Xero emulator"
BASE_CURRENCY = "AUD"
BANK_ACCOUNT_CODE = "090"
# Token lifetimes: access tokens 30 minutes, unused refresh tokens 60 days
# (https://developer.xero.com/faq/oauth2); authorization codes 5 minutes
# (https://developer.xero.com/documentation/oauth2/auth-flow).
ACCESS_TOKEN_TTL_S = 1800
REFRESH_TOKEN_TTL_S = 60 * 24 * 3600
CODE_TTL_S = 300
# Idempotency keys: at most 128 characters (spec parameter ``idempotencyKey``); reusing one
# with a different request is refused, and "keys are stored for 6 minutes from the time
# of the first call, after which they expire"
# (https://developer.xero.com/documentation/guides/idempotent-requests/idempotency/, as
# quoted by third-party integration docs: the official page itself was not reachable from
# here). A replay does not extend the window. ``XeroEmulator(idempotency_ttl_s=...)``
# changes it for a test.
IDEMPOTENCY_KEY_MAX = 128
IDEMPOTENCY_TTL_S = 360
# Limits: 60 calls/minute, 5000/day and 5 concurrent per organisation; 10,000/minute per
# app across organisations; headers X-MinLimit-Remaining, X-DayLimit-Remaining,
# X-AppMinLimit-Remaining; 429 on breach (https://developer.xero.com/faq/limits).
# On a 429, X-Rate-Limit-Problem names the limit and Retry-After gives seconds for the
# minute and day limits (https://developer.xero.com/documentation/guides/oauth2/limits/;
# the values "minute"/"day"/"concurrent" are the ones seen in client code, and the
# official SDK reads the header: xero_python/exceptions/http_status_exceptions.py).
DAY_LIMIT = 5000
APP_MINUTE_LIMIT = 10_000
REFERENCE_MAX = 255
# "A single POST to the Accounting or Payroll APIs has a size limit of 3.5MB"
# (https://developer.xero.com/documentation/auth-and-limits/xero-api-limits, Request Size
# Limit), read as 3,500,000 bytes (the stricter reading). The page names no status for a
# larger body; the emulator answers HTTP's own, 413 Content Too Large (RFC 9110 section 15.5.14).
REQUEST_MAX_BYTES = 3_500_000
# The id Xero shows on an element it did not store (spec examples, e.g. ``AccountID`` and
# ``InvoiceID`` ``00000000-0000-0000-0000-000000000000`` in the 400 examples).
UNSAVED_ID = "00000000-0000-0000-0000-000000000000"
DEFAULT_PAGE_SIZE = 100  # spec: "Up to 100 invoices will be returned in a single API call"
MAX_PAGE_SIZE = 1000

TAX_RATES: dict[str, tuple[str, Decimal]] = {
    "OUTPUT": ("GST on Income", Decimal("10.0000")),
    "INPUT": ("GST on Expenses", Decimal("10.0000")),
    "EXEMPTOUTPUT": ("GST Free Income", Decimal("0.0000")),
    "NONE": ("BAS Excluded", Decimal("0.0000")),
}
ACCOUNTS: tuple[dict[str, str], ...] = (
    {"Code": "200", "Name": "Sales", "Type": "REVENUE", "TaxType": "OUTPUT", "Class": "REVENUE"},
    {"Code": "260", "Name": "Other Revenue", "Type": "REVENUE", "TaxType": "OUTPUT", "Class": "REVENUE"},
    {"Code": "400", "Name": "Advertising", "Type": "EXPENSE", "TaxType": "INPUT", "Class": "EXPENSE"},
    {"Code": "090", "Name": "Business Bank Account", "Type": "BANK", "TaxType": "NONE", "Class": "ASSET"},
)
CURRENCIES = {
    "AUD": "Australian Dollar",
    "USD": "United States Dollar",
    "NZD": "New Zealand Dollar",
    "GBP": "British Pound",
    "EUR": "Euro",
}
PAYMENT_TERM_TYPES = ("DAYSAFTERBILLDATE", "DAYSAFTERBILLMONTH", "OFCURRENTMONTH", "OFFOLLOWINGMONTH")
LINE_AMOUNT_TYPES = ("Exclusive", "Inclusive", "NoTax")

Json = dict[str, Any]


class _JsonResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dump_json(content)


@dataclass
class _Grant:
    kind: str
    scope: str
    expires_at: float
    spent: bool = False
    redirect_uri: str = ""


@dataclass(frozen=True, kw_only=True)
class _Caller:
    client_id: str
    tenant_id: str


@dataclass(frozen=True, kw_only=True)
class _Remembered:
    fingerprint: str
    status: int
    body: bytes
    media_type: str | None
    stored_at: float


@dataclass
class _Outcome:
    response: Response
    committed: list[tuple[str, Json]] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class _Kind:
    """Invoices and credit notes share their life cycle; this says how they differ."""

    name: str
    collection: str
    id_field: str
    number_field: str
    prefix: str
    types: tuple[str, ...]


INVOICE = _Kind(
    name="invoice",
    collection="Invoices",
    id_field="InvoiceID",
    number_field="InvoiceNumber",
    prefix="INV",
    types=("ACCREC", "ACCPAY"),
)
CREDIT_NOTE = _Kind(
    name="credit_note",
    collection="CreditNotes",
    id_field="CreditNoteID",
    number_field="CreditNoteNumber",
    prefix="CN",
    types=("ACCRECCREDIT", "ACCPAYCREDIT"),
)
Handler = Callable[[Request, _Caller], Awaitable[_Outcome]]


# ---------------------------------------------------------------------------
# Small wire helpers
# ---------------------------------------------------------------------------


def _error(status: int, message: str, error_type: str = "BadRequest") -> Response:
    return _JsonResponse({"Type": error_type, "Message": message}, status_code=status)


def _problem(status: int, title: str, detail: str) -> Response:
    # The identity layer's 401/403 body (Title/Status/Detail).
    return _JsonResponse({"Type": None, "Title": title, "Status": status, "Detail": detail}, status_code=status)


def _validation_error(elements: list[Json]) -> Response:
    # Spec components.schemas.Error and its PUT /Contacts 400 example.
    body = {
        "ErrorNumber": 10,
        "Type": "ValidationException",
        "Message": "A validation exception occurred",
        "Elements": elements,
    }
    return _JsonResponse(body, status_code=400)


def _element(raw: Json, errors: list[str]) -> Json:
    return {**raw, "HasErrors": True, "ValidationErrors": [{"Message": message} for message in errors]}


def _summarized(request: Request) -> bool:
    """``summarizeErrors`` (spec parameter; default true): a failing batch is answered 400."""
    return request.query_params.get("summarizeErrors", "true").lower() != "false"


def _itemised(answers: list[tuple[Json, bool]]) -> list[Json]:
    """Every element of a batch answered with ``summarizeErrors=false``, in request order.

    A good element gets ``StatusAttributeString: OK`` and ``HasErrors: false`` as in the
    spec's createInvoices 200 example; a refused one ``ERROR`` (its ``HasErrors`` and
    ``ValidationErrors`` are already on it).
    """
    return [{**answer, "StatusAttributeString": "OK" if ok else "ERROR", "HasErrors": not ok} for answer, ok in answers]


def _decimal(value: Any, name: str, errors: list[str]) -> Decimal:
    try:
        return value if isinstance(value, Decimal) else Decimal(str(value))
    except InvalidOperation:
        errors.append(f"{name} {value!r} is not a valid number")
        return Decimal(0)


def _items(body: Any, collection: str) -> list[Json] | None:
    """The elements of a ``{"Collection": [...]}`` body, or a single bare element."""
    if isinstance(body, dict) and isinstance(body.get(collection), list):
        return [item for item in body[collection] if isinstance(item, dict)]
    if isinstance(body, dict) and body and collection not in body:
        return [body]
    return None


def _since(value: str) -> datetime:
    """``If-Modified-Since``: ISO-8601 (naive = UTC) or an HTTP date."""
    try:
        return parse_xero_datetime(value)
    except ValueError:
        return parsedate_to_datetime(value).astimezone(UTC)


# ---------------------------------------------------------------------------
# The ``where`` filter: a small subset of Xero's C#-like syntax
# ---------------------------------------------------------------------------

Predicate = Callable[[Mapping[str, Any]], bool]
_TOKEN = re.compile(
    r"""\s*(?:(?P<string>"(?:[^"\\]|\\.)*")|(?P<op>==|!=|>=|<=|&&|\|\||[()<>.,=])"""
    r"""|(?P<number>-?\d+(?:\.\d+)?)|(?P<word>[A-Za-z_][A-Za-z0-9_]*))"""
)


class WhereError(ValueError):
    """The ``where`` expression is outside the grammar the emulator understands."""


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    position = 0
    while text[position:].strip():
        match = _TOKEN.match(text, position)
        if match is None or match.lastgroup is None:
            raise WhereError(f"cannot parse the where filter at {text[position : position + 20]!r}")
        kind, value = match.lastgroup, match.group(match.lastgroup)
        if kind == "word" and value.upper() in ("AND", "OR"):
            kind, value = "op", "&&" if value.upper() == "AND" else "||"
        tokens.append((kind, value))
        position = match.end()
    return tokens


def _lookup(obj: Mapping[str, Any], path: list[str]) -> Any:
    value: Any = obj
    for part in path:
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _comparable(left: Any, right: Any) -> tuple[Any, Any]:
    if isinstance(right, Decimal):
        return (Decimal(str(left)) if left is not None else None), right
    if isinstance(right, date):
        return (parse_xero_date(left) if isinstance(left, str) else None), right
    if isinstance(right, _Guid):
        return (str(left).lower() if left is not None else None), right.value
    return left, right


@dataclass(frozen=True)
class _Guid:
    value: str


_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "==": lambda a, b: bool(a == b),
    "=": lambda a, b: bool(a == b),
    "!=": lambda a, b: bool(a != b),
    ">": lambda a, b: a is not None and bool(a > b),
    "<": lambda a, b: a is not None and bool(a < b),
    ">=": lambda a, b: a is not None and bool(a >= b),
    "<=": lambda a, b: a is not None and bool(a <= b),
}
_METHODS: dict[str, Callable[[str, str], bool]] = {
    "Contains": lambda a, b: b in a,
    "StartsWith": lambda a, b: a.startswith(b),
    "EndsWith": lambda a, b: a.endswith(b),
}


class _WhereParser:
    """Recursive descent over ``||``/``&&``, parentheses, comparisons and string methods."""

    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.index = 0

    def parse(self) -> Predicate:
        predicate = self._or()
        if self.index != len(self.tokens):
            raise WhereError(f"unexpected {self.tokens[self.index][1]!r} in the where filter")
        return predicate

    def _peek(self, value: str) -> bool:
        return self.index < len(self.tokens) and self.tokens[self.index][1] == value

    def _take(self, value: str) -> bool:
        if self._peek(value):
            self.index += 1
            return True
        return False

    def _next(self, kind: str) -> str:
        if self.index >= len(self.tokens) or self.tokens[self.index][0] != kind:
            raise WhereError(f"expected a {kind} in the where filter")
        self.index += 1
        return self.tokens[self.index - 1][1]

    def _or(self) -> Predicate:
        left = self._and()
        while self._take("||"):
            right = self._and()
            left = (lambda a, b: lambda obj: a(obj) or b(obj))(left, right)
        return left

    def _and(self) -> Predicate:
        left = self._atom()
        while self._take("&&"):
            right = self._atom()
            left = (lambda a, b: lambda obj: a(obj) and b(obj))(left, right)
        return left

    def _atom(self) -> Predicate:
        if self._take("("):
            inner = self._or()
            if not self._take(")"):
                raise WhereError("missing ) in the where filter")
            return inner
        return self._comparison()

    def _comparison(self) -> Predicate:
        path = [self._next("word")]
        while self._take("."):
            name = self._next("word")
            if self._take("("):
                argument = self._value()
                if not self._take(")") or not isinstance(argument, str) or name not in _METHODS:
                    raise WhereError(f"unsupported method {name} in the where filter")
                return _method(path, name, argument)
            path.append(name)
        operator = self._next("op")
        if operator not in _COMPARE:
            raise WhereError(f"unsupported operator {operator!r} in the where filter")
        return _compare(path, operator, self._value())

    def _value(self) -> Any:
        kind, value = self.tokens[self.index] if self.index < len(self.tokens) else ("end", "")
        self.index += 1
        if kind == "string":
            return re.sub(r"\\(.)", r"\1", value[1:-1])
        if kind == "number":
            return Decimal(value)
        if kind == "word" and value in ("null", "true", "false"):
            return {"null": None, "true": True, "false": False}[value]
        if kind == "word" and value.lower() == "guid" and self._take("("):
            guid = self._next("string")[1:-1].lower()
            self._take(")")
            return _Guid(guid)
        if kind == "word" and value == "DateTime" and self._take("("):
            parts = [int(self._next("number"))]
            while self._take(","):
                parts.append(int(self._next("number")))
            self._take(")")
            return date(parts[0], parts[1], parts[2])
        raise WhereError(f"unsupported value {value!r} in the where filter")


def _method(path: list[str], name: str, argument: str) -> Predicate:
    def predicate(obj: Mapping[str, Any]) -> bool:
        value = _lookup(obj, path)
        if value is None:
            # Xero needs a null check before a method on an optional field.
            raise WhereError(f"{'.'.join(path)} is null; put {'.'.join(path)}!=null before .{name}()")
        return _METHODS[name](str(value), argument)

    return predicate


def _compare(path: list[str], operator: str, expected: Any) -> Predicate:
    def predicate(obj: Mapping[str, Any]) -> bool:
        left, right = _comparable(_lookup(obj, path), expected)
        if right is None:
            left = left if left != "" else None
        return _COMPARE[operator](left, right)

    return predicate


def compile_where(text: str) -> Predicate:
    """A predicate for a ``where`` expression such as ``Reference!=null&&Reference.Contains("x")``.

    Raises:
        WhereError: outside the supported grammar (comparisons ``== != > < >= <=``,
            ``.Contains/.StartsWith/.EndsWith("…")``, ``Guid("…")``, ``DateTime(y,m,d)``,
            ``null``/``true``/``false``, ``&&``/``||``/``AND``/``OR`` and parentheses).
    """
    return _WhereParser(text).parse()


# ---------------------------------------------------------------------------
# Totals: per line, half-up, as Xero does (tax per line rounded, then summed:
# https://developer.xero.com/documentation/guides/how-to-guides/rounding-in-xero/)
# ---------------------------------------------------------------------------


def _line_tax(amount: Decimal, rate: Decimal, line_amount_types: str, currency: str) -> Decimal:
    if line_amount_types == "NoTax" or rate == 0:
        return round_money(Decimal(0), currency)
    if line_amount_types == "Inclusive":
        return round_money(amount * rate / (100 + rate), currency)
    return round_money(amount * rate / 100, currency)


def _compute_line(raw: Json, line_amount_types: str, currency: str, unitdp: int, errors: list[str]) -> Json:
    description = raw.get("Description")
    if not description and not raw.get("ItemCode"):
        errors.append("Description needs to be at least 1 char long")  # spec LineItem.Description
    quantity = _decimal(raw.get("Quantity", 1), "Quantity", errors)
    if "UnitAmount" not in raw and "LineAmount" in raw and quantity:
        unit = _decimal(raw["LineAmount"], "LineAmount", errors) / quantity
    else:
        unit = _decimal(raw.get("UnitAmount", 0), "UnitAmount", errors)
    unit = unit.quantize(Decimal(1).scaleb(-unitdp), rounding=ROUND_HALF_UP)
    discount = _decimal(raw.get("DiscountRate", 0), "DiscountRate", errors)
    account = _account(raw.get("AccountCode"))
    if raw.get("AccountCode") and account is None:
        errors.append(f"Account code '{raw['AccountCode']}' is not a valid code for this document.")
    tax_type = "NONE" if line_amount_types == "NoTax" else raw.get("TaxType") or (account or {}).get("TaxType", "NONE")
    if tax_type not in TAX_RATES:
        errors.append(f"The TaxType code '{tax_type}' does not exist or cannot be used with this type of transaction.")
    amount = round_money(quantity * unit * (100 - discount) / 100, currency)
    line: Json = {
        "LineItemID": str(uuid.uuid4()),
        "Description": description or "",
        "Quantity": quantity,
        "UnitAmount": unit,
        "TaxType": tax_type,
        "TaxAmount": _line_tax(amount, TAX_RATES.get(tax_type, ("", Decimal(0)))[1], line_amount_types, currency),
        "LineAmount": amount,
        "Tracking": [],
    }
    if raw.get("ItemCode"):
        line["ItemCode"] = raw["ItemCode"]
    if raw.get("Tracking"):
        line["Tracking"] = [{"Name": item.get("Name"), "Option": item.get("Option")} for item in raw["Tracking"]]
    if account is not None:
        line["AccountCode"], line["AccountID"] = account["Code"], account["AccountID"]
    if discount:
        line["DiscountRate"] = discount
    return line


def _totals(lines: list[Json], line_amount_types: str) -> tuple[Decimal, Decimal, Decimal]:
    tax = sum((line["TaxAmount"] for line in lines), Decimal(0))
    amounts = sum((line["LineAmount"] for line in lines), Decimal(0))
    subtotal = amounts - tax if line_amount_types == "Inclusive" else amounts
    return subtotal, tax, subtotal + tax


def _account(code: Any) -> Json | None:
    for account in _ACCOUNT_ROWS:
        if account["Code"] == code:
            return account
    return None


_ACCOUNT_ROWS: tuple[Json, ...] = tuple(
    {**row, "AccountID": str(uuid.uuid5(uuid.NAMESPACE_URL, f"xero-emulator/account/{row['Code']}"))}
    for row in ACCOUNTS
)


# ---------------------------------------------------------------------------
# The emulator
# ---------------------------------------------------------------------------


class XeroEmulator:
    """Xero's identity service and Accounting API, in memory.

    Args:
        client_id / client_secret: the one app the token endpoint accepts.
        tenant_id: the one organisation's id (``xero-tenant-id``).
        webhook_key: the key webhook deliveries are signed with.
        rate_limits: enforce Xero's limits (429 with Retry-After); ``False`` for benchmarks.
        rate_limit_per_min / max_concurrent: the limits (Xero: 60 and 5).
        clock: the current aware UTC time; drives token expiry, ``UpdatedDateUTC``,
            idempotency expiry and the rate-limit windows (inject one in tests).
        idempotency_ttl_s: seconds an ``Idempotency-Key`` is replayed, counted from its
            first call (Xero: 360); ``0`` remembers no key.
        contract: Xero's published contract to check each Accounting API request
            against (``None``: no check; see the module docstring).
        faults: the fault plan (``None``: a plan with nothing queued and no seed, i.e. off).

    Attributes:
        app: the ASGI app, wrapped in :class:`~connectors.emulation.FaultMiddleware`.
        faults: the fault plan (429, 5xx, latency, dropped responses).
        webhooks: the webhook sender (deliveries kept for re-delivery).
        calls: calls per operation (the spec's ``operationId``; ``token`` …); the token
            endpoint's calls are also counted per grant (``token:refresh_token``) and per
            refusal (``token:refresh_token:invalid_grant``).
        emails: ids of invoices emailed through ``POST /Invoices/{id}/Email``.
        contract: the :class:`~connectors.emulation.ContractGate` (``breaches`` lists refused requests).
        on_commit: called with ``("invoice" | "credit_note", object)`` right after an
            invoice or credit note is stored by an API call, before the answer is sent
            (and after its idempotency record is kept); an exception from it escapes
            the app, as a crash would.
    """

    def __init__(
        self,
        *,
        client_id: str = "emulator-client",
        client_secret: str = "emulator-secret",
        tenant_id: str = DEFAULT_TENANT_ID,
        webhook_key: str = "emulator-webhook-key",
        rate_limits: bool = True,
        rate_limit_per_min: int = 60,
        max_concurrent: int = 5,
        clock: Callable[[], datetime] | None = None,
        idempotency_ttl_s: float = IDEMPOTENCY_TTL_S,
        contract: Contract | None = None,
        faults: FaultPlan | None = None,
    ) -> None:
        if idempotency_ttl_s < 0:
            raise ValueError(f"idempotency_ttl_s must be 0 or more seconds, not {idempotency_ttl_s}")
        self.idempotency_ttl_s = idempotency_ttl_s
        self.client_id = client_id
        self.contract = ContractGate(contract)
        self.client_secret = client_secret
        self.tenant_id = tenant_id
        self.webhook_key = webhook_key
        self.rate_limits = rate_limits
        self.max_concurrent = max_concurrent
        self.clock: Callable[[], datetime] = clock or (lambda: datetime.now(UTC))
        seconds = self._seconds
        self._minute = WindowLimiter(rate_limit_per_min if rate_limits else None, 60, clock=seconds)
        self._day = WindowLimiter(DAY_LIMIT if rate_limits else None, 86_400, clock=seconds)
        self._app_minute = WindowLimiter(APP_MINUTE_LIMIT if rate_limits else None, 60, clock=seconds)
        self._inflight: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.emails: list[str] = []
        self.on_commit: Callable[[str, dict[str, Any]], None] | None = None
        self.faults = faults or FaultPlan()
        self.webhooks = WebhookSender()
        self._contacts: dict[str, Json] = {}
        self._documents: dict[str, dict[str, Json]] = {INVOICE.name: {}, CREDIT_NOTE.name: {}}
        self._payments: dict[str, Json] = {}
        self._archived_accounts: set[str] = set()
        self.period_lock_date: date | None = None
        self.end_of_year_lock_date: date | None = None
        self.tracking: dict[str, list[str]] = {"Region": ["North", "South"]}
        self._numbers: Counter[str] = Counter()
        self._grants: dict[str, _Grant] = {}
        self._remembered: dict[tuple[str, str], _Remembered] = {}
        self._sequence = 0
        self._connected_at = self.clock()
        self.app: ASGIApp = FaultMiddleware(Starlette(routes=self._routes()), self.faults)

    # -- public API -----------------------------------------------------------

    def invoices(self) -> list[dict[str, Any]]:
        """Stored invoices, in Xero's JSON shape (Decimals for amounts)."""
        return list(self._documents[INVOICE.name].values())

    def credit_notes(self) -> list[dict[str, Any]]:
        """Stored credit notes, in Xero's JSON shape."""
        return list(self._documents[CREDIT_NOTE.name].values())

    def contacts(self) -> list[dict[str, Any]]:
        """Stored contacts, in Xero's JSON shape."""
        return list(self._contacts.values())

    def subscribe(self, url: str, client: httpx.AsyncClient) -> None:
        """Deliver webhooks to ``url`` through ``client``."""
        self.webhooks.subscribe(url, client)

    def seed_contact(
        self,
        name: str,
        *,
        contact_number: str | None = None,
        email: str | None = None,
        status: str = "ACTIVE",
    ) -> dict[str, Any]:
        """Store a contact as if someone had created it in Xero (for tests and the demo)."""
        raw: Json = {"Name": name, "ContactNumber": contact_number, "EmailAddress": email}
        contact = self._new_contact({key: value for key, value in raw.items() if value is not None})
        contact["ContactStatus"] = status
        self._contacts[contact["ContactID"]] = contact
        return contact

    def edit_contact(self, contact_id: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Change a contact as a user in Xero's web app would (``Name``, ``EmailAddress`` ...)."""
        contact = self._merge_contact(self._contacts[contact_id], dict(fields))
        self._contacts[contact_id] = contact
        return contact

    async def edit_invoice(self, invoice_id: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Change an invoice as a user in Xero's web app would, and deliver the INVOICE UPDATE webhook.

        ``fields`` are the ``Invoice`` keys a user edits (``LineItems``, ``DueDate``,
        ``Reference``, ``Contact``, ``LineAmountTypes``, ``Status`` ...), checked as
        ``POST /Invoices/{InvoiceID}`` checks them (an invoice with payments cannot be edited).

        Raises:
            ValueError: Xero would refuse the edit.
        """
        existing = self._find_document(INVOICE, invoice_id)
        if existing is None:
            raise ValueError(f"no invoice {invoice_id}")
        errors: list[str] = []
        raw = dict(fields)
        document = self._revise(INVOICE, existing, raw, 4, errors)
        if "Contact" in raw:
            contact = self._resolve_contact(raw["Contact"], errors)
            document["Contact"] = _contact_summary(contact) if contact else document["Contact"]
        if errors:
            raise ValueError("; ".join(errors))
        self._keep(INVOICE, document)
        await self.send_event("INVOICE", "UPDATE", invoice_id)
        return document

    async def edit_contact_at_xero(self, contact_id: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        """:meth:`edit_contact`, then the signed CONTACT UPDATE webhook (``xero-webhooks.yaml`` eventCategory)."""
        contact = self.edit_contact(contact_id, fields)
        await self.send_event("CONTACT", "UPDATE", contact_id)
        return contact

    def archive_account(self, code: str) -> None:
        """Archive an account as an admin would: ``GET /Accounts`` lists it with Status ARCHIVED.

        Raises:
            KeyError: no account with that code.
        """
        if _account(code) is None:
            raise KeyError(f"no account with code {code!r}")
        self._archived_accounts.add(code)

    def set_lock_dates(self, *, period: date | None = None, end_of_year: date | None = None) -> None:
        """Lock the ledger as an adviser would (Accounting > Financial settings > Lock dates)."""
        self.period_lock_date, self.end_of_year_lock_date = period, end_of_year

    async def allocate(self, credit_note_id: str, invoice_id: str, amount: Decimal) -> dict[str, Any]:
        """Allocate credit as ``PUT /CreditNotes/{id}/Allocations`` does, then deliver the
        signed CREDITNOTE and INVOICE UPDATE webhooks (``xero-webhooks.yaml`` eventCategory).

        Raises:
            ValueError: Xero would refuse the allocation.
        """
        errors: list[str] = []
        allocation = self._apply_allocation(
            credit_note_id, {"Invoice": {"InvoiceID": invoice_id}, "Amount": amount}, errors
        )
        if errors:
            raise ValueError("; ".join(errors))
        await self.send_event("CREDITNOTE", "UPDATE", credit_note_id)
        await self.send_event("INVOICE", "UPDATE", invoice_id)
        return allocation

    def issue_code(self, *, redirect_uri: str, scope: str = "offline_access accounting.invoices") -> str:
        """An authorization code, as if a person had consented (5 minutes, single use)."""
        code = secrets.token_urlsafe(24)
        self._grants[code] = _Grant("code", scope, self._seconds() + CODE_TTL_S, redirect_uri=redirect_uri)
        return code

    def revoke_access_tokens(self) -> None:
        """Invalidate every access token, as a revocation at Xero would (refresh tokens stay)."""
        for grant in self._grants.values():
            if grant.kind.startswith("access"):
                grant.expires_at = 0

    async def pay_invoice(self, invoice_id: str, amount: Decimal, *, on: date | None = None) -> dict[str, Any]:
        """Record a payment (as ``PUT /Payments`` does) and deliver the signed INVOICE UPDATE webhook.

        Raises:
            ValueError: Xero would refuse the payment (unknown invoice, not approved,
                more than is due).
        """
        raw = {
            "Invoice": {"InvoiceID": invoice_id},
            "Account": {"Code": BANK_ACCOUNT_CODE},
            "Amount": amount,
            "Date": (on or self.clock().date()).isoformat(),
        }
        errors: list[str] = []
        payment = self._apply_payment(raw, errors)
        if errors:
            raise ValueError("; ".join(errors))
        await self.send_event("INVOICE", "UPDATE", invoice_id)
        return payment

    async def delete_payment(self, payment_id: str) -> None:
        """Delete (reverse) a payment as a user at Xero would, and deliver the INVOICE UPDATE webhook.

        Xero: "Deleting (reversing) a payment": ``POST /Payments/{PaymentID}`` with
        ``{"Status": "DELETED"}`` (https://developer.xero.com/documentation/api/accounting/payments);
        the invoice is owed again and goes back to AUTHORISED.

        Raises:
            KeyError: no such payment.
        """
        payment = self._payments[payment_id]
        invoice = self._find_document(INVOICE, str(payment["Invoice"]["InvoiceID"]))
        if invoice is None or payment["Status"] == "DELETED":
            raise KeyError(f"payment {payment_id} cannot be deleted")
        payment["Status"] = "DELETED"
        self._stamp(payment)
        invoice["Payments"] = [p for p in invoice["Payments"] if p["PaymentID"] != payment_id]
        invoice["AmountPaid"] -= payment["Amount"]
        invoice["AmountDue"] += payment["Amount"]
        invoice["Status"] = "AUTHORISED"
        invoice.pop("FullyPaidOnDate", None)
        self._stamp(invoice)
        invoice["UpdatedDateUTCString"] = self.clock().astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        await self.send_event("INVOICE", "UPDATE", invoice["InvoiceID"])

    async def send_event(self, category: str, event_type: str, resource_id: str) -> Delivery | None:
        """Deliver one signed event (``xero-webhooks.yaml`` payload) to the subscriber."""
        self._sequence += 1
        moment = self.clock().astimezone(UTC)
        event = {
            "resourceUrl": f"https://api.xero.com{API}/{_RESOURCES.get(category, category.title())}/{resource_id}",
            "resourceId": resource_id,
            "tenantId": self.tenant_id,
            "tenantType": "ORGANISATION",
            "eventCategory": category,
            "eventType": event_type,
            "eventDateUtc": f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}",
        }
        payload = {
            "events": [event],
            "firstEventSequence": self._sequence,
            "lastEventSequence": self._sequence,
            "entropy": _entropy(),
        }
        return await self._deliver(dump_json(payload), valid=True)

    async def intent_to_receive(self) -> tuple[int | None, int | None]:
        """Xero's intent-to-receive check: one correctly and one wrongly signed empty delivery.

        Returns the subscriber's two statuses; Xero wants ``(200, 401)``
        (https://developer.xero.com/documentation/webhooks/configuring-your-server).
        """
        body = dump_json({"events": [], "lastEventSequence": 0, "firstEventSequence": 0, "entropy": _entropy()})
        good, bad = await self._deliver(body, valid=True), await self._deliver(body, valid=False)
        return (good.status if good else None), (bad.status if bad else None)

    def signature(self, body: bytes) -> str:
        """``x-xero-signature`` for ``body``: base64(HMAC-SHA256(webhook key, body))."""
        digest = hmac.new(self.webhook_key.encode("utf-8"), body, hashlib.sha256).digest()
        return base64.b64encode(digest).decode("ascii")

    # -- plumbing -------------------------------------------------------------

    def _seconds(self) -> float:
        return self.clock().timestamp()

    async def _deliver(self, body: bytes, *, valid: bool) -> Delivery | None:
        signature = self.signature(body) if valid else self.signature(body + b"tampered")
        return await self.webhooks.send(body, {"content-type": "application/json", "x-xero-signature": signature})

    def _routes(self) -> list[Route]:
        routes = [
            Route("/connect/token", self._token_endpoint, methods=["POST"]),
            Route("/identity/connect/authorize", self._authorize, methods=["GET"]),
            Route("/connections", self._connections, methods=["GET"]),
        ]
        table: list[tuple[str, str, str, Handler]] = [
            ("GET", "/Organisation", "getOrganisations", self._organisation),
            ("GET", "/Accounts", "getAccounts", self._accounts),
            ("GET", "/TaxRates", "getTaxRates", self._tax_rates),
            ("GET", "/Currencies", "getCurrencies", self._currencies),
            ("GET", "/Contacts", "getContacts", self._list_contacts),
            ("PUT", "/Contacts", "createContacts", self._create_contacts),
            ("POST", "/Contacts", "updateOrCreateContacts", self._upsert_contacts),
            ("GET", "/Contacts/{ContactID}", "getContact", self._get_contact),
            ("POST", "/Contacts/{ContactID}", "updateContact", self._update_contact),
            ("GET", "/Invoices", "getInvoices", self._list_documents(INVOICE)),
            ("PUT", "/Invoices", "createInvoices", self._create_documents(INVOICE, upsert=False)),
            ("POST", "/Invoices", "updateOrCreateInvoices", self._create_documents(INVOICE, upsert=True)),
            ("GET", "/Invoices/{ID}", "getInvoice", self._get_document(INVOICE)),
            ("POST", "/Invoices/{ID}", "updateInvoice", self._update_document(INVOICE)),
            ("POST", "/Invoices/{ID}/Email", "emailInvoice", self._email_invoice),
            ("GET", "/CreditNotes", "getCreditNotes", self._list_documents(CREDIT_NOTE)),
            ("PUT", "/CreditNotes", "createCreditNotes", self._create_documents(CREDIT_NOTE, upsert=False)),
            ("POST", "/CreditNotes", "updateOrCreateCreditNotes", self._create_documents(CREDIT_NOTE, upsert=True)),
            ("GET", "/CreditNotes/{ID}", "getCreditNote", self._get_document(CREDIT_NOTE)),
            ("PUT", "/CreditNotes/{ID}/Allocations", "createCreditNoteAllocation", self._create_allocations),
            ("GET", "/TrackingCategories", "getTrackingCategories", self._tracking_categories),
            ("POST", "/CreditNotes/{ID}", "updateCreditNote", self._update_document(CREDIT_NOTE)),
            ("GET", "/Payments", "getPayments", self._list_payments),
            ("PUT", "/Payments", "createPayments", self._create_payments),
            ("POST", "/Payments", "createPayment", self._create_payments),
        ]
        routes += [
            Route(API + path, self._endpoint(op, handler), methods=[method]) for method, path, op, handler in table
        ]
        return routes

    def _endpoint(self, operation: str, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return await self._serve(request, operation, handler)

        return endpoint

    async def _serve(self, request: Request, operation: str, handler: Handler) -> Response:
        self.calls[operation] += 1
        if "application/json" not in request.headers.get("accept", ""):
            # Xero answers XML unless asked for JSON (module docstring); the emulator speaks JSON only.
            return _error(406, "send Accept: application/json (Xero answers XML otherwise)", "NotAcceptable")
        caller = self._authenticate(request, tenant_required=True)
        if isinstance(caller, Response):
            return caller
        refused = self._rate_check(caller.tenant_id)
        if refused is not None:
            return refused
        if request.method in ("PUT", "POST") and len(await request.body()) > REQUEST_MAX_BYTES:
            return _error(
                413, f"The request is larger than Xero's limit of {REQUEST_MAX_BYTES} bytes", "RequestTooLarge"
            )
        # The spec marks xero-tenant-id required, but a custom connection may leave it out
        # ("the xero-tenant-id header is not required", https://developer.xero.com/faq/custom-integration):
        # the contract sees the tenant the token resolved to.
        problems = await self.contract.problems(request, headers={"xero-tenant-id": caller.tenant_id})
        if problems:
            return _validation_error([{"HasErrors": True, "ValidationErrors": [{"Message": p} for p in problems]}])
        self._inflight[caller.tenant_id] += 1
        try:
            response = await self._idempotent(request, caller, handler)
        finally:
            self._inflight[caller.tenant_id] -= 1
        response.headers.update(self._remaining(caller.tenant_id))
        return response

    def _authenticate(self, request: Request, *, tenant_required: bool) -> _Caller | Response:
        header = request.headers.get("authorization", "")
        grant = self._grants.get(header[7:]) if header.startswith("Bearer ") else None
        if grant is None or not grant.kind.startswith("access") or grant.expires_at <= self._seconds():
            return _problem(401, "Unauthorized", "AuthenticationUnsuccessful")
        tenant = request.headers.get("xero-tenant-id")
        if tenant is None and (grant.kind == "access:client_credentials" or not tenant_required):
            # "the xero-tenant-id header is not required" for custom connections
            # (https://developer.xero.com/faq/custom-integration).
            tenant = self.tenant_id
        if tenant is None or tenant.lower() != self.tenant_id.lower():
            return _problem(403, "Forbidden", "AuthorizationUnsuccessful")
        return _Caller(client_id=self.client_id, tenant_id=self.tenant_id)

    def _rate_check(self, tenant: str) -> Response | None:
        if not self.rate_limits:
            return None
        if self._inflight[tenant] >= self.max_concurrent:
            return self._too_many(tenant, "concurrent", None)
        self._app_minute.hit()
        for problem, limiter in (("minute", self._minute), ("day", self._day)):
            wait = limiter.hit(tenant)
            if wait is not None:
                return self._too_many(tenant, problem, wait)
        return None

    def _too_many(self, tenant: str, problem: str, wait: float | None) -> Response:
        headers = {"X-Rate-Limit-Problem": problem, **self._remaining(tenant)}
        if wait is not None:
            headers["Retry-After"] = str(max(1, math.ceil(wait)))
        return Response(status_code=429, headers=headers)

    def _remaining(self, tenant: str) -> dict[str, str]:
        if not self.rate_limits:
            return {}
        return {
            "X-DayLimit-Remaining": str(self._day.remaining(tenant)),
            "X-MinLimit-Remaining": str(self._minute.remaining(tenant)),
            "X-AppMinLimit-Remaining": str(self._app_minute.remaining()),
        }

    async def _idempotent(self, request: Request, caller: _Caller, handler: Handler) -> Response:
        key = request.headers.get("idempotency-key")
        if request.method not in ("POST", "PUT") or not key:
            return self._commit(await handler(request, caller))
        if len(key) > IDEMPOTENCY_KEY_MAX:
            return _error(400, f"Idempotency-Key must be at most {IDEMPOTENCY_KEY_MAX} characters")
        body = await request.body()
        fingerprint = hashlib.sha256(
            b"|".join([request.method.encode(), request.url.path.encode(), request.url.query.encode(), body])
        ).hexdigest()
        slot = (caller.client_id, key)
        remembered = self._remembered.get(slot)
        if remembered is not None and self._seconds() - remembered.stored_at < self.idempotency_ttl_s:
            if remembered.fingerprint != fingerprint:
                return _error(400, f"Idempotency key {key} is used with a different request")
            return Response(remembered.body, status_code=remembered.status, media_type=remembered.media_type)
        outcome = await handler(request, caller)
        response = outcome.response
        self._remembered[slot] = _Remembered(
            fingerprint=fingerprint,
            status=response.status_code,
            body=bytes(response.body),
            media_type=response.media_type,
            stored_at=self._seconds(),
        )
        return self._commit(outcome)

    def _commit(self, outcome: _Outcome) -> Response:
        if self.on_commit is not None:
            for kind, stored in outcome.committed:
                self.on_commit(kind, stored)
        return outcome.response

    def _envelope(self, key: str, items: list[Json], pagination: Json | None = None) -> Json:
        body: Json = {
            "Id": str(uuid.uuid4()),
            "Status": "OK",
            "ProviderName": PROVIDER_NAME,
            "DateTimeUTC": f"/Date({int(self._seconds() * 1000)})/",
        }
        if pagination is not None:
            body["pagination"] = pagination
        body[key] = items
        return body

    def _ok(self, key: str, items: list[Json], pagination: Json | None = None) -> _Outcome:
        return _Outcome(_JsonResponse(self._envelope(key, items, pagination)))

    def _stamp(self, obj: Json) -> None:
        now = self.clock().astimezone(UTC)
        obj["UpdatedDateUTC"] = format_xero_datetime(now)

    def _filtered(self, request: Request, items: Iterable[Json], id_field: str) -> tuple[list[Json], Json | None]:
        """Apply where, IDs, If-Modified-Since, order and paging, as GET lists do."""
        params = request.query_params
        selected = list(items)
        if params.get("IDs"):
            wanted = {value.strip().strip('"').lower() for value in params["IDs"].split(",")}
            selected = [item for item in selected if str(item.get(id_field, "")).lower() in wanted]
        if request.headers.get("if-modified-since"):
            since = _since(request.headers["if-modified-since"])
            selected = [item for item in selected if parse_xero_datetime(item["UpdatedDateUTC"]) >= since]
        if params.get("where"):
            predicate = compile_where(params["where"])
            selected = [item for item in selected if predicate(item)]
        if params.get("order"):
            selected = _ordered(selected, params["order"])
        if not params.get("page"):
            return selected, None
        size = min(int(params.get("pageSize") or DEFAULT_PAGE_SIZE), MAX_PAGE_SIZE)
        page = max(int(params["page"]), 1)
        pagination = {
            "page": page,
            "pageSize": size,
            "pageCount": math.ceil(len(selected) / size),
            "itemCount": len(selected),
        }
        return selected[(page - 1) * size : page * size], pagination

    async def _list(self, request: Request, key: str, items: Iterable[Json], id_field: str) -> _Outcome:
        try:
            selected, pagination = self._filtered(request, items, id_field)
        except (WhereError, ValueError, TypeError) as exc:
            return _Outcome(_error(400, f"invalid query: {exc}", "QueryParseException"))
        return self._ok(key, selected, pagination)

    # -- identity -------------------------------------------------------------

    async def _token_endpoint(self, request: Request) -> Response:
        self.calls["token"] += 1
        form = {key: values[0] for key, values in parse_qs((await request.body()).decode("utf-8")).items()}
        client_id, client_secret = _client_auth(request, form)
        if client_id != self.client_id or client_secret != self.client_secret:
            return _JsonResponse({"error": "invalid_client"}, status_code=400)
        grant_type = form.get("grant_type", "")
        self.calls[f"token:{grant_type}"] += 1
        if grant_type == "client_credentials":
            scope = "accounting.invoices accounting.contacts accounting.settings accounting.payments"
            return _JsonResponse(self._issue("client_credentials", scope, refresh=False))
        if grant_type == "authorization_code":
            grant = self._spend(form.get("code", ""), "code")
            if grant is None or grant.redirect_uri != form.get("redirect_uri"):
                return _JsonResponse({"error": "invalid_grant"}, status_code=400)
            return _JsonResponse(self._issue("authorization_code", grant.scope, refresh=True))
        if grant_type == "refresh_token":
            grant = self._spend(form.get("refresh_token", ""), "refresh")
            if grant is None:
                self.calls["token:refresh_token:invalid_grant"] += 1
                return _JsonResponse({"error": "invalid_grant"}, status_code=400)
            return _JsonResponse(self._issue("authorization_code", grant.scope, refresh=True))
        return _JsonResponse({"error": "unsupported_grant_type"}, status_code=400)

    def _spend(self, token: str, kind: str) -> _Grant | None:
        grant = self._grants.get(token)
        if grant is None or grant.kind != kind or grant.spent or grant.expires_at <= self._seconds():
            return None
        grant.spent = True
        return grant

    def _issue(self, flow: str, scope: str, *, refresh: bool) -> Json:
        access = secrets.token_urlsafe(32)
        self._grants[access] = _Grant(f"access:{flow}", scope, self._seconds() + ACCESS_TOKEN_TTL_S)
        answer: Json = {
            "access_token": access,
            "expires_in": ACCESS_TOKEN_TTL_S,
            "token_type": "Bearer",
            "scope": scope,
        }
        if refresh and "offline_access" in scope.split():
            token = secrets.token_urlsafe(32)
            self._grants[token] = _Grant("refresh", scope, self._seconds() + REFRESH_TOKEN_TTL_S)
            answer["refresh_token"] = token
        return answer

    async def _authorize(self, request: Request) -> Response:
        self.calls["authorize"] += 1
        params = request.query_params
        redirect_uri = params.get("redirect_uri", "")
        if params.get("response_type") != "code" or params.get("client_id") != self.client_id or not redirect_uri:
            return _error(400, "response_type=code, a known client_id and a redirect_uri are required")
        code = self.issue_code(redirect_uri=redirect_uri, scope=params.get("scope", ""))
        separator = "&" if "?" in redirect_uri else "?"
        query = urlencode({"code": code, "scope": params.get("scope", ""), "state": params.get("state", "")})
        return RedirectResponse(f"{redirect_uri}{separator}{query}", status_code=302)

    async def _connections(self, request: Request) -> Response:
        self.calls["connections"] += 1
        caller = self._authenticate(request, tenant_required=False)
        if isinstance(caller, Response):
            return caller
        stamp = self._connected_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f0")
        connection = {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"xero-emulator/connection/{self.tenant_id}")),
            "authEventId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"xero-emulator/auth/{self.tenant_id}")),
            "tenantId": self.tenant_id,
            "tenantType": "ORGANISATION",
            "tenantName": "Emulator Demo Company (AU)",
            "createdDateUtc": stamp,
            "updatedDateUtc": stamp,
        }
        return _JsonResponse([connection])

    # -- organisation data ----------------------------------------------------

    async def _organisation(self, request: Request, caller: _Caller) -> _Outcome:
        organisation = {
            "OrganisationID": self.tenant_id,
            "Name": "Emulator Demo Company (AU)",
            "LegalName": "Emulator Demo Company Pty Ltd",
            "PaysTax": True,
            "Version": "AU",
            "OrganisationType": "COMPANY",
            "BaseCurrency": BASE_CURRENCY,
            "CountryCode": "AU",
            "IsDemoCompany": False,
            "OrganisationStatus": "ACTIVE",
            "FinancialYearEndDay": 30,
            "FinancialYearEndMonth": 6,
            "SalesTaxBasis": "ACCRUALS",
            "SalesTaxPeriod": "QUARTERLY1",
            "DefaultSalesTax": "Tax Exclusive",
            "DefaultPurchasesTax": "Tax Exclusive",
            "CreatedDateUTC": format_xero_datetime(self._connected_at),
            "OrganisationEntityType": "COMPANY",
            "Timezone": "AUSEASTERNSTANDARDTIME",
            "ShortCode": "!emu01",
            "Edition": "BUSINESS",
            "Class": "STANDARD",
            "Addresses": [],
            "Phones": [],
            "ExternalLinks": [],
            "PaymentTerms": {},
        }
        for name, day in (("PeriodLockDate", self.period_lock_date), ("EndOfYearLockDate", self.end_of_year_lock_date)):
            if day is not None:
                organisation[name] = format_xero_date(day)  # spec Organisation: "Shown if set"
        return self._ok("Organisations", [organisation])

    async def _accounts(self, request: Request, caller: _Caller) -> _Outcome:
        rows = [
            {
                **row,
                "Status": "ARCHIVED" if row["Code"] in self._archived_accounts else "ACTIVE",
                "EnablePaymentsToAccount": False,
                "ShowInExpenseClaims": False,
                "BankAccountType": "BANK" if row["Type"] == "BANK" else "",
                "HasAttachments": False,
                "UpdatedDateUTC": format_xero_datetime(self._connected_at),
                **(
                    {"BankAccountNumber": "082-123 12345678", "CurrencyCode": BASE_CURRENCY}
                    if row["Type"] == "BANK"
                    else {}
                ),
            }
            for row in _ACCOUNT_ROWS
        ]
        return await self._list(request, "Accounts", rows, "AccountID")

    async def _tax_rates(self, request: Request, caller: _Caller) -> _Outcome:
        rows = [
            {
                "Name": name,
                "TaxType": tax_type,
                "ReportTaxType": tax_type,
                "CanApplyToAssets": True,
                "CanApplyToEquity": True,
                "CanApplyToExpenses": True,
                "CanApplyToLiabilities": True,
                "CanApplyToRevenue": True,
                "DisplayTaxRate": rate,
                "EffectiveRate": rate,
                "Status": "ACTIVE",
                "TaxComponents": [{"Name": "GST", "Rate": rate, "IsCompound": False, "IsNonRecoverable": False}],
            }
            for tax_type, (name, rate) in TAX_RATES.items()
        ]
        return await self._list(request, "TaxRates", rows, "TaxType")

    async def _currencies(self, request: Request, caller: _Caller) -> _Outcome:
        rows = [{"Code": code, "Description": description} for code, description in CURRENCIES.items()]
        return await self._list(request, "Currencies", rows, "Code")

    # -- contacts -------------------------------------------------------------

    async def _list_contacts(self, request: Request, caller: _Caller) -> _Outcome:
        items = list(self._contacts.values())
        if request.query_params.get("includeArchived", "").lower() != "true":
            items = [item for item in items if item["ContactStatus"] == "ACTIVE"]
        term = request.query_params.get("searchTerm", "").lower()
        if term:
            fields = ("Name", "FirstName", "LastName", "ContactNumber", "EmailAddress")
            items = [item for item in items if any(term in str(item.get(name, "")).lower() for name in fields)]
        return await self._list(request, "Contacts", items, "ContactID")

    def _find_contact(self, ident: str) -> Json | None:
        found = self._contacts.get(ident)
        if found is None:
            found = next((c for c in self._contacts.values() if c.get("ContactNumber") == ident), None)
        return found

    async def _get_contact(self, request: Request, caller: _Caller) -> _Outcome:
        contact = self._find_contact(request.path_params["ContactID"])
        if contact is None:
            return _Outcome(_error(404, "The resource you're looking for cannot be found", "NotFound"))
        return self._ok("Contacts", [contact])

    async def _create_contacts(self, request: Request, caller: _Caller) -> _Outcome:
        return await self._write_contacts(request, upsert=False)

    async def _upsert_contacts(self, request: Request, caller: _Caller) -> _Outcome:
        return await self._write_contacts(request, upsert=True)

    async def _update_contact(self, request: Request, caller: _Caller) -> _Outcome:
        contact = self._find_contact(request.path_params["ContactID"])
        if contact is None:
            return _Outcome(_error(404, "The resource you're looking for cannot be found", "NotFound"))
        return await self._write_contacts(request, upsert=True, target=contact)

    async def _write_contacts(self, request: Request, *, upsert: bool, target: Json | None = None) -> _Outcome:
        items = _items(load_json(await request.body() or b"{}"), "Contacts")
        if items is None:
            return _Outcome(_error(400, "the body must be a Contacts object", "PostDataInvalidException"))
        answers: list[tuple[Json, bool]] = []
        staged: dict[str, Json] = {}
        for raw in items:
            existing = target or (self._match_contact(raw) if upsert else None)
            errors = self._contact_errors(raw, existing, staged, upsert=upsert)
            if errors:
                answers.append((_element(raw, errors), False))
                continue
            contact = self._merge_contact(existing, raw) if existing is not None else self._new_contact(raw)
            staged[contact["ContactID"]] = contact
            answers.append((contact, True))
        self._contacts.update(staged)  # the good elements are kept even when others fail (module docstring)
        if not _summarized(request):
            return self._ok("Contacts", _itemised(answers))
        if all(ok for _, ok in answers):
            return self._ok("Contacts", [answer for answer, _ in answers])
        return _Outcome(_validation_error([answer for answer, ok in answers if not ok]))

    def _match_contact(self, raw: Json) -> Json | None:
        if raw.get("ContactID"):
            return self._contacts.get(str(raw["ContactID"]))
        for field_name in ("ContactNumber", "Name"):
            if raw.get(field_name):
                for contact in self._contacts.values():
                    if contact.get(field_name) == raw[field_name] and contact["ContactStatus"] == "ACTIVE":
                        return contact
        return None

    def _contact_errors(self, raw: Json, existing: Json | None, staged: dict[str, Json], *, upsert: bool) -> list[str]:
        errors: list[str] = []
        name = raw.get("Name", existing.get("Name") if existing else None)
        if not name:
            errors.append("The contact name must be specified.")
        if raw.get("ContactID") and existing is None:
            errors.append(f"The contact with ContactID {raw['ContactID']} could not be found.")
        others = [c for c in [*self._contacts.values(), *staged.values()] if existing is None or c is not existing]
        active = [
            c for c in others if c["ContactStatus"] == "ACTIVE" and c["ContactID"] != (existing or {}).get("ContactID")
        ]
        if name and raw.get("Name") and any(c["Name"] == name for c in active):
            # Quoted from the spec's 400 example on PUT /Contacts.
            errors.append(
                f"The contact name {name} is already assigned to another contact. "
                "The contact name must be unique across all active contacts."
            )
        number = raw.get("ContactNumber")
        if number and any(c.get("ContactNumber") == number for c in active):
            errors.append(f"The contact number {number} is already assigned to another contact.")
        errors += _length_errors(raw, {"Name": 255, "ContactNumber": 50, "EmailAddress": 255, "TaxNumber": 50})
        terms = (raw.get("PaymentTerms") or {}).get("Sales") or {}
        if terms and terms.get("Type") not in PAYMENT_TERM_TYPES:
            errors.append(f"PaymentTerms.Sales.Type must be one of {', '.join(PAYMENT_TERM_TYPES)}")
        return errors

    def _new_contact(self, raw: Json) -> Json:
        contact: Json = {
            "ContactID": str(uuid.uuid4()),
            "ContactStatus": "ACTIVE",
            "Name": raw.get("Name", ""),
            "BankAccountDetails": "",
            "Addresses": [{"AddressType": "STREET"}, {"AddressType": "POBOX"}],
            "Phones": [],
            "ContactGroups": [],
            "IsSupplier": False,
            "IsCustomer": False,
            "ContactPersons": [],
            "HasAttachments": False,
            "HasValidationErrors": False,
        }
        return self._merge_contact(contact, raw)

    def _merge_contact(self, contact: Json, raw: Json) -> Json:
        merged = dict(contact)
        for name in ("Name", "ContactNumber", "FirstName", "LastName", "EmailAddress", "TaxNumber", "PaymentTerms"):
            if name in raw:
                merged[name] = raw[name]
        for address in raw.get("Addresses", []):
            kind = address.get("AddressType")
            merged["Addresses"] = [a for a in merged["Addresses"] if a.get("AddressType") != kind] + [address]
        self._stamp(merged)
        return merged

    # -- invoices and credit notes --------------------------------------------

    def _list_documents(self, kind: _Kind) -> Handler:
        async def handler(request: Request, caller: _Caller) -> _Outcome:
            params = request.query_params
            items = list(self._documents[kind.name].values())
            for param, name in (("Statuses", "Status"), ("InvoiceNumbers", kind.number_field)):
                if params.get(param):
                    wanted = {value.strip().strip('"') for value in params[param].split(",")}
                    items = [item for item in items if item.get(name) in wanted]
            if params.get("ContactIDs"):
                wanted = {value.strip().strip('"').lower() for value in params["ContactIDs"].split(",")}
                items = [item for item in items if item["Contact"]["ContactID"].lower() in wanted]
            outcome = await self._list(request, kind.collection, items, kind.id_field)
            return self._render_outcome(outcome, kind, request)

        return handler

    def _rendered(self, kind: _Kind, document: Json, request: Request) -> Json:
        """A stored document as answered: unit amounts rounded to two decimals unless ``unitdp=4``."""
        if request.query_params.get("unitdp") == "4":
            return document
        lines = [
            {**line, "UnitAmount": line["UnitAmount"].quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)}
            for line in document.get("LineItems", [])
        ]
        return {**document, "LineItems": lines}

    def _render_outcome(self, outcome: _Outcome, kind: _Kind, request: Request) -> _Outcome:
        """Unit amounts keep four decimals only for callers asking ``unitdp=4``."""
        if request.query_params.get("unitdp") == "4" or outcome.response.status_code != 200:
            return outcome
        body = load_json(bytes(outcome.response.body))
        for document in body.get(kind.collection, []):
            for line in document.get("LineItems", []):
                line["UnitAmount"] = line["UnitAmount"].quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
        return _Outcome(_JsonResponse(body, status_code=outcome.response.status_code), outcome.committed)

    def _find_document(self, kind: _Kind, ident: str) -> Json | None:
        store = self._documents[kind.name]
        found = store.get(ident) or store.get(ident.lower())
        if found is None:
            found = next((d for d in store.values() if d.get(kind.number_field) == ident), None)
        return found

    def _get_document(self, kind: _Kind) -> Handler:
        async def handler(request: Request, caller: _Caller) -> _Outcome:
            document = self._find_document(kind, request.path_params["ID"])
            if document is None:
                return _Outcome(_error(404, "The resource you're looking for cannot be found", "NotFound"))
            return self._render_outcome(self._ok(kind.collection, [document]), kind, request)

        return handler

    def _create_documents(self, kind: _Kind, *, upsert: bool) -> Handler:
        async def handler(request: Request, caller: _Caller) -> _Outcome:
            items = _items(load_json(await request.body() or b"{}"), kind.collection)
            if items is None:
                return _Outcome(_error(400, f"the body must be a {kind.collection} object", "PostDataInvalidException"))
            unitdp = 4 if request.query_params.get("unitdp") == "4" else 2
            return self._store_documents(kind, items, unitdp, upsert=upsert, request=request)

        return handler

    def _update_document(self, kind: _Kind) -> Handler:
        async def handler(request: Request, caller: _Caller) -> _Outcome:
            document = self._find_document(kind, request.path_params["ID"])
            if document is None:
                return _Outcome(_error(404, "The resource you're looking for cannot be found", "NotFound"))
            items = _items(load_json(await request.body() or b"{}"), kind.collection) or [{}]
            unitdp = 4 if request.query_params.get("unitdp") == "4" else 2
            raw = {**items[0], kind.id_field: document[kind.id_field]}
            return self._store_documents(kind, [raw], unitdp, upsert=True, request=request)

        return handler

    def _store_documents(
        self, kind: _Kind, items: list[Json], unitdp: int, *, upsert: bool, request: Request
    ) -> _Outcome:
        answers: list[tuple[Json, bool]] = []
        for raw in items:
            errors: list[str] = []
            existing = self._find_document(kind, str(raw.get(kind.id_field, ""))) if upsert else None
            if existing is None and upsert and raw.get(kind.number_field):
                existing = self._find_document(kind, str(raw[kind.number_field]))
            if existing is None and raw.get(kind.id_field):
                errors.append(f"{kind.id_field} {raw[kind.id_field]} could not be found")
            document = self._revise(kind, existing, raw, unitdp, errors) if existing else None
            if existing is None and not errors:
                numbers = Counter(self._numbers)  # a failing element uses up no number
                document = self._new_document(kind, raw, unitdp, numbers, errors)
                refusal = self.faults.element_refusal(str(raw.get("Reference") or ""))
                errors += [refusal] if refusal else []
                if not errors:
                    self._numbers = numbers
            if errors or document is None:
                answers.append((_element(_unsaved(kind, raw, document) if existing is None else raw, errors), False))
            else:
                self._keep(kind, document)  # kept even when another element fails (module docstring)
                answers.append((document, True))
        staged = [answer for answer, ok in answers if ok]
        if not _summarized(request):
            # Every element with its StatusAttributeString, even when all are OK (the spec's
            # createInvoices 200 example carries ``StatusAttributeString: OK``).
            rendered = [(self._rendered(kind, answer, request) if ok else answer, ok) for answer, ok in answers]
            outcome = self._ok(kind.collection, _itemised(rendered))
        elif len(staged) == len(answers):
            outcome = self._render_outcome(self._ok(kind.collection, staged), kind, request)
        else:
            outcome = _Outcome(_validation_error([answer for answer, ok in answers if not ok]))
        outcome.committed = [(kind.name, document) for document in staged]
        return outcome

    def _keep(self, kind: _Kind, document: Json) -> None:
        self._documents[kind.name][document[kind.id_field]] = document
        if document["Type"] in ("ACCREC", "ACCRECCREDIT"):
            self._contacts[document["Contact"]["ContactID"]]["IsCustomer"] = True

    def _resolve_contact(self, raw: Any, errors: list[str]) -> Json | None:
        raw = raw if isinstance(raw, dict) else {}
        contact = None
        if raw.get("ContactID"):
            contact = self._contacts.get(str(raw["ContactID"]))
        elif raw.get("ContactNumber"):
            contact = self._find_contact(str(raw["ContactNumber"]))
        elif raw.get("Name"):
            contact = self._match_contact({"Name": raw["Name"]})
            if contact is None:
                contact = self._new_contact({"Name": raw["Name"]})
                self._contacts[contact["ContactID"]] = contact
        else:
            errors.append("A Contact must be specified for this type of transaction")
            return None
        if contact is None:
            errors.append("The contact could not be found")
        elif contact["ContactStatus"] != "ACTIVE":
            errors.append(f"The contact {contact['Name']} is {contact['ContactStatus'].lower()}")
        return contact

    def _new_document(self, kind: _Kind, raw: Json, unitdp: int, numbers: Counter[str], errors: list[str]) -> Json:
        doc_type = raw.get("Type")
        if doc_type not in kind.types:
            errors.append(f"Type must be one of {', '.join(kind.types)}")
        contact = self._resolve_contact(raw.get("Contact"), errors)
        status = raw.get("Status", "DRAFT")
        if status not in ("DRAFT", "SUBMITTED", "AUTHORISED"):
            errors.append(f"{status} is not a valid status for a new document; use DRAFT, SUBMITTED or AUTHORISED")
        currency = raw.get("CurrencyCode", BASE_CURRENCY)
        if currency not in CURRENCIES:
            errors.append(f"Organisation is not subscribed to currency {currency}")  # Xero's wording
        document: Json = {"Type": doc_type, kind.id_field: str(uuid.uuid4())}
        number = raw.get(kind.number_field)
        if doc_type in ("ACCREC", "ACCRECCREDIT") and not number:
            numbers[kind.prefix] += 1
            number = f"{kind.prefix}-{numbers[kind.prefix]:04d}"
        if number and doc_type == "ACCREC" and self._find_document(kind, str(number)):
            errors.append("Invoice # must be unique.")
        document[kind.number_field] = number or ""
        document["Reference"] = raw.get("Reference", "")
        document.update(_empty_links(kind))
        document["Contact"] = _contact_summary(contact) if contact else {}
        document["CurrencyCode"] = currency if currency in CURRENCIES else BASE_CURRENCY
        document["CurrencyRate"] = Decimal("1.000000")
        document["Status"] = status
        self._apply_fields(kind, document, raw, unitdp, errors)
        return document

    def _apply_fields(self, kind: _Kind, document: Json, raw: Json, unitdp: int, errors: list[str]) -> None:
        """Dates, reference and lines (with totals) from ``raw`` onto ``document``."""
        try:
            if "Date" in raw or "Date" not in document:
                issue = parse_xero_date(str(raw["Date"])) if raw.get("Date") else self.clock().date()
                document["DateString"], document["Date"] = f"{issue.isoformat()}T00:00:00", format_xero_date(issue)
            if raw.get("DueDate"):
                due = parse_xero_date(str(raw["DueDate"]))
                document["DueDateString"], document["DueDate"] = f"{due.isoformat()}T00:00:00", format_xero_date(due)
        except ValueError as exc:
            errors.append(f"a date is not valid: {exc}")
        if "Reference" in raw:
            document["Reference"] = raw["Reference"] or ""
        errors += _length_errors(document, {"Reference": REFERENCE_MAX})
        line_amount_types = str(raw.get("LineAmountTypes", document.get("LineAmountTypes", "Exclusive")))
        if line_amount_types not in LINE_AMOUNT_TYPES:
            errors.append(f"LineAmountTypes must be one of {', '.join(LINE_AMOUNT_TYPES)}")
        document["LineAmountTypes"] = line_amount_types
        if "LineItems" in raw or "LineItems" not in document:
            currency = document["CurrencyCode"]
            raw_lines = raw.get("LineItems") or []
            document["LineItems"] = [
                _compute_line(line, line_amount_types, currency, unitdp, errors) for line in raw_lines
            ]
            errors += [error for line in raw_lines for error in self._tracking_errors(line)]
        if document["Status"] == "AUTHORISED" and not document["LineItems"]:
            errors.append("A document must have at least one line item to be approved")
        if document["Status"] in ("SUBMITTED", "AUTHORISED"):
            errors += self._ledger_errors(document)
        if kind is INVOICE and document["Status"] == "AUTHORISED" and "DueDate" not in document:
            errors.append("Due Date is required for an approved invoice")
        self._retotal(kind, document)

    def _ledger_errors(self, document: Json) -> list[str]:
        """What Xero refuses on an approved (or submitted) document: see the module docstring."""
        errors = []
        if any(not line.get("AccountCode") for line in document["LineItems"]):
            errors.append("Account code must be specified")
        issued = parse_xero_date(document["Date"]) if document.get("Date") else None
        for what, day in (("period", self.period_lock_date), ("end of year", self.end_of_year_lock_date)):
            if day is not None and issued is not None and issued <= day:
                errors.append(
                    f"The document date cannot be before the {what} lock date, currently set at {day:%d-%b-%Y}"
                )
        return errors

    def _tracking_errors(self, raw: Json) -> list[str]:
        errors = []
        for tracking in raw.get("Tracking") or []:
            name, option = tracking.get("Name"), tracking.get("Option")
            if name not in self.tracking:
                errors.append(f"Tracking category '{name}' does not exist")
            elif option not in self.tracking[name]:
                errors.append(f"Tracking option '{option}' does not exist in category '{name}'")
        return errors

    async def _tracking_categories(self, request: Request, caller: _Caller) -> _Outcome:
        # Spec schemas TrackingCategory (TrackingCategoryID, Name, Status, Options) and
        # TrackingOption (TrackingOptionID, Name, Status).
        categories = [
            {
                "TrackingCategoryID": str(uuid.uuid5(uuid.NAMESPACE_URL, f"xero-emulator/tracking/{name}")),
                "Name": name,
                "Status": "ACTIVE",
                "Options": [
                    {
                        "TrackingOptionID": str(
                            uuid.uuid5(uuid.NAMESPACE_URL, f"xero-emulator/tracking/{name}/{option}")
                        ),
                        "Name": option,
                        "Status": "ACTIVE",
                    }
                    for option in options
                ],
            }
            for name, options in self.tracking.items()
        ]
        return self._ok("TrackingCategories", categories)

    # -- allocations ------------------------------------------------------------

    async def _create_allocations(self, request: Request, caller: _Caller) -> _Outcome:
        items = _items(load_json(await request.body() or b"{}"), "Allocations")
        if items is None:
            return _Outcome(_error(400, "the body must be an Allocations object", "PostDataInvalidException"))
        credit_note_id = request.path_params["ID"]
        if self._find_document(CREDIT_NOTE, credit_note_id) is None:
            return _Outcome(_error(404, "The resource you're looking for cannot be found", "NotFound"))
        failures = []
        for raw in items:
            errors: list[str] = []
            self._allocation_parts(credit_note_id, raw, errors)
            if errors:
                failures.append(_element(raw, errors))
        if sum((_decimal(raw.get("Amount", 0), "Amount", []) for raw in items), Decimal(0)) > self._credit_left(
            credit_note_id
        ):
            failures.append(
                _element({}, ["Credit Note cannot be allocated as amount is greater than amount outstanding"])
            )
        if failures:
            return _Outcome(_validation_error(failures))
        return self._ok("Allocations", [self._apply_allocation(credit_note_id, raw, []) for raw in items])

    def _credit_left(self, credit_note_id: str) -> Decimal:
        note = self._find_document(CREDIT_NOTE, credit_note_id)
        return Decimal(note["RemainingCredit"]) if note is not None else Decimal(0)

    def _allocation_parts(
        self, credit_note_id: str, raw: Json, errors: list[str]
    ) -> tuple[Json | None, Json | None, Decimal]:
        note = self._find_document(CREDIT_NOTE, credit_note_id)
        ref = raw.get("Invoice") or {}
        invoice = self._find_document(INVOICE, str(ref.get("InvoiceID") or ref.get("InvoiceNumber") or ""))
        amount = _decimal(raw.get("Amount", 0), "Amount", errors)
        if note is None or note["Status"] != "AUTHORISED":
            errors.append("Only an approved (AUTHORISED) credit note with credit remaining can be allocated")
        if invoice is None:
            errors.append("The invoice you are trying to allocate to could not be found")
        elif invoice["Status"] != "AUTHORISED":
            # Xero's wording for a paid invoice, as reported by Bill.com's help centre:
            # https://vendorpayhelp.bill.com/hc/en-us/articles/360007998332
            errors.append("The invoice you are trying to allocate to has already been paid off")
        if note is None or invoice is None or errors:
            return note, invoice, amount
        if note["Contact"].get("ContactID") != invoice["Contact"].get("ContactID"):
            errors.append("The credit note and the invoice must belong to the same contact")
        if note["CurrencyCode"] != invoice["CurrencyCode"]:
            errors.append("The credit note and the invoice must be in the same currency")
        if amount <= 0:
            errors.append("Amount must be greater than zero")
        elif amount > note["RemainingCredit"] or amount > invoice["AmountDue"]:
            errors.append("Credit Note cannot be allocated as amount is greater than amount outstanding")
        return note, invoice, amount

    def _apply_allocation(self, credit_note_id: str, raw: Json, errors: list[str]) -> Json:
        note, invoice, amount = self._allocation_parts(credit_note_id, raw, errors)
        if errors or note is None or invoice is None:
            return {}
        on = parse_xero_date(str(raw["Date"])) if raw.get("Date") else self.clock().date()
        allocation: Json = {
            "AllocationID": str(uuid.uuid4()),
            "Amount": amount,
            "Date": format_xero_date(on),
            "Invoice": {"InvoiceID": invoice["InvoiceID"], "InvoiceNumber": invoice["InvoiceNumber"]},
            "CreditNote": {"CreditNoteID": note["CreditNoteID"], "CreditNoteNumber": note["CreditNoteNumber"]},
        }
        note["Allocations"] = [*note["Allocations"], allocation]
        note["RemainingCredit"] -= amount
        if note["RemainingCredit"] == 0:
            note["Status"] = "PAID"
        invoice["CreditNotes"] = [
            *invoice["CreditNotes"],
            {"CreditNoteID": note["CreditNoteID"], "AppliedAmount": amount},
        ]
        invoice["AmountCredited"] = invoice.get("AmountCredited", Decimal(0)) + amount
        invoice["AmountDue"] -= amount
        if invoice["AmountDue"] == 0:
            invoice["Status"] = "PAID"
        for document in (note, invoice):
            self._stamp(document)
            document["UpdatedDateUTCString"] = self.clock().astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return allocation

    def _retotal(self, kind: _Kind, document: Json) -> None:
        subtotal, tax, total = _totals(document["LineItems"], document["LineAmountTypes"])
        document["SubTotal"], document["TotalTax"], document["Total"] = subtotal, tax, total
        if kind is INVOICE:
            paid = document.get("AmountPaid", Decimal(0))
            document["AmountPaid"], document["AmountDue"] = paid, total - paid - document.get("AmountCredited", 0)
        else:
            allocated = sum((Decimal(item["Amount"]) for item in document.get("Allocations", [])), Decimal(0))
            document["RemainingCredit"] = total - allocated
        self._stamp(document)
        document["UpdatedDateUTCString"] = self.clock().astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def _revise(self, kind: _Kind, existing: Json, raw: Json, unitdp: int, errors: list[str]) -> Json:
        """An update through POST: status transitions and editable fields."""
        document = dict(existing)
        status = raw.get("Status", existing["Status"])
        allowed = _TRANSITIONS.get(existing["Status"], ())
        if status != existing["Status"] and status not in allowed:
            errors.append(f"Cannot change the status of a {existing['Status']} document to {status}")
        if status == "VOIDED" and existing.get("AmountPaid"):
            errors.append("Payments have been applied to this document: remove them before voiding it")
        locked = existing["Status"] in ("PAID", "VOIDED", "DELETED") or bool(existing.get("AmountPaid"))
        if locked and ("LineItems" in raw or "LineAmountTypes" in raw):
            errors.append("This document cannot be edited as it has a payment or credit note allocated to it.")
        document["Status"] = status
        if "SentToContact" in raw:
            document["SentToContact"] = bool(raw["SentToContact"])
        self._apply_fields(kind, document, raw, unitdp, errors)
        return document

    async def _email_invoice(self, request: Request, caller: _Caller) -> _Outcome:
        invoice = self._find_document(INVOICE, request.path_params["ID"])
        if invoice is None:
            return _Outcome(_error(404, "The resource you're looking for cannot be found", "NotFound"))
        errors: list[str] = []
        if invoice["Type"] != "ACCREC" or invoice["Status"] not in ("SUBMITTED", "AUTHORISED", "PAID"):
            errors.append("Only approved sales invoices (ACCREC: SUBMITTED, AUTHORISED or PAID) can be emailed")
        contact = self._contacts.get(invoice["Contact"]["ContactID"], {})
        if not contact.get("EmailAddress"):
            errors.append("The contact has no email address to send the invoice to")
        if errors:
            return _Outcome(_validation_error([_element({"InvoiceID": invoice["InvoiceID"]}, errors)]))
        invoice["SentToContact"] = True
        self._stamp(invoice)
        self.emails.append(invoice["InvoiceID"])
        return _Outcome(Response(status_code=204))  # spec emailInvoice: "204 no content"

    # -- payments -------------------------------------------------------------

    async def _list_payments(self, request: Request, caller: _Caller) -> _Outcome:
        return await self._list(request, "Payments", self._payments.values(), "PaymentID")

    async def _create_payments(self, request: Request, caller: _Caller) -> _Outcome:
        items = _items(load_json(await request.body() or b"{}"), "Payments")
        if items is None:
            return _Outcome(_error(400, "the body must be a Payments object", "PostDataInvalidException"))
        results: list[Json] = []
        failures: list[Json] = []
        for raw in items:
            errors: list[str] = []
            self._payment_parts(raw, errors)
            if errors:
                failures.append(_element(raw, errors))
        if failures:
            return _Outcome(_validation_error(failures))
        for raw in items:
            results.append(self._apply_payment(raw, []))
        return self._ok("Payments", results)

    def _payment_parts(self, raw: Json, errors: list[str]) -> tuple[Json | None, Json | None, Decimal]:
        ref = raw.get("Invoice") or {}
        invoice = self._find_document(INVOICE, str(ref.get("InvoiceID") or ref.get("InvoiceNumber") or ""))
        account_ref = raw.get("Account") or {}
        account = next(
            (
                a
                for a in _ACCOUNT_ROWS
                if a["Code"] == account_ref.get("Code") or a["AccountID"] == account_ref.get("AccountID")
            ),
            None,
        )
        amount = _decimal(raw.get("Amount", 0), "Amount", errors)
        if invoice is None:
            errors.append("The invoice for this payment could not be found")
        elif invoice["Status"] != "AUTHORISED":
            errors.append(f"Payment cannot be applied to an invoice with status {invoice['Status']}")
        elif amount <= 0 or amount > invoice["AmountDue"]:
            errors.append(f"Payment amount must be more than 0 and at most the amount due, {invoice['AmountDue']}")
        if account is None or account["Type"] != "BANK":
            errors.append("Payments must be made to a bank account (or one with EnablePaymentsToAccount)")
        return invoice, account, amount

    def _apply_payment(self, raw: Json, errors: list[str]) -> Json:
        invoice, account, amount = self._payment_parts(raw, errors)
        if errors or invoice is None or account is None:
            return {}
        paid_on = parse_xero_date(str(raw["Date"])) if raw.get("Date") else self.clock().date()
        payment: Json = {
            "PaymentID": str(uuid.uuid4()),
            "Date": format_xero_date(paid_on),
            "Amount": amount,
            "Reference": raw.get("Reference", ""),
            "CurrencyRate": Decimal("1.000000"),
            "PaymentType": "ACCRECPAYMENT" if invoice["Type"] == "ACCREC" else "ACCPAYPAYMENT",
            "Status": "AUTHORISED",
            "IsReconciled": False,
            "HasAccount": True,
            "HasValidationErrors": False,
            "Account": {"AccountID": account["AccountID"], "Code": account["Code"]},
        }
        self._stamp(payment)
        link = ("PaymentID", "Date", "Amount", "Reference", "CurrencyRate", "HasAccount", "HasValidationErrors")
        invoice["Payments"] = [*invoice["Payments"], {name: payment[name] for name in link}]
        invoice["AmountPaid"] += amount
        invoice["AmountDue"] -= amount
        if invoice["AmountDue"] == 0:
            invoice["Status"] = "PAID"
            invoice["FullyPaidOnDate"] = format_xero_date(paid_on)
        self._stamp(invoice)
        invoice["UpdatedDateUTCString"] = self.clock().astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        payment["Invoice"] = {
            "InvoiceID": invoice["InvoiceID"],
            "InvoiceNumber": invoice["InvoiceNumber"],
            "Type": invoice["Type"],
            "Contact": invoice["Contact"],
        }
        self._payments[payment["PaymentID"]] = payment
        return payment


_RESOURCES = {"INVOICE": "Invoices", "CONTACT": "Contacts", "CREDITNOTE": "CreditNotes"}
_TRANSITIONS: dict[str, tuple[str, ...]] = {
    "DRAFT": ("SUBMITTED", "AUTHORISED", "DELETED"),
    "SUBMITTED": ("DRAFT", "AUTHORISED", "DELETED"),
    "AUTHORISED": ("VOIDED",),
}


def _entropy() -> str:
    return "".join(secrets.choice(string.ascii_uppercase) for _ in range(20))


def _client_auth(request: Request, form: Mapping[str, str]) -> tuple[str, str]:
    """Client id and secret from HTTP basic auth, or from the form (client_secret_post)."""
    header = request.headers.get("authorization", "")
    if header.startswith("Basic "):
        try:
            client_id, _, secret = base64.b64decode(header[6:]).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return "", ""
        return client_id, secret
    return form.get("client_id", ""), form.get("client_secret", "")


def _length_errors(raw: Mapping[str, Any], limits: Mapping[str, int]) -> list[str]:
    return [
        f"{name} must be at most {limit} characters"
        for name, limit in limits.items()
        if isinstance(raw.get(name), str) and len(raw[name]) > limit
    ]


def _unsaved(kind: _Kind, raw: Json, document: Json | None) -> Json:
    """A refused new element as Xero answers it: the document as it would have been, unsaved.

    The spec's ``StatusAttributeString: ERROR`` examples show the element in Xero's own
    shape (``/Date(...)/`` dates, computed lines and totals) next to its ``ValidationErrors``;
    it was not stored, so it has the empty id and no number of its own.
    """
    if document is None or document.get(kind.id_field) is None:
        return raw
    return {**document, kind.id_field: UNSAVED_ID, kind.number_field: raw.get(kind.number_field, "")}


def _contact_summary(contact: Json) -> Json:
    summary = {key: contact[key] for key in ("ContactID", "Name", "ContactNumber") if contact.get(key)}
    return {**summary, "HasValidationErrors": False}


def _empty_links(kind: _Kind) -> Json:
    links: Json = {"Payments": [], "HasAttachments": False, "HasErrors": False, "SentToContact": False}
    if kind is INVOICE:
        links.update({"CreditNotes": [], "Prepayments": [], "Overpayments": [], "IsDiscounted": False})
        links.update({"AmountPaid": Decimal(0), "AmountCredited": Decimal(0)})
    else:
        links["Allocations"] = []
    return links


def _ordered(items: list[Json], order: str) -> list[Json]:
    """Sort by the first ``Field [ASC|DESC]`` of an ``order`` parameter."""
    field_name, _, direction = order.split(",")[0].strip().partition(" ")

    def key(item: Json) -> tuple[int, Any]:
        value = item.get(field_name)
        if isinstance(value, str) and value.startswith("/Date("):
            return 1, parse_xero_datetime(value)
        return (0, "") if value is None else (1, value)

    return sorted(items, key=key, reverse=direction.strip().upper() == "DESC")
