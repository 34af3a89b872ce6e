"""Xero Accounting API payloads, and their translation to and from syncd's canonical models.

Everything vendor-shaped lives here, at the edge: the JSON codec (amounts travel as
JSON numbers built from :class:`~decimal.Decimal`, never through ``float``), Xero's
``/Date(ms+0000)/`` date format, the payload models read from responses and webhooks,
and the pure functions that build request bodies from canonical drafts and clients.

References (Xero developer documentation and the published OpenAPI file):

* Field names, types and max lengths: ``specs/xero/xero_accounting.yaml``
  (XeroAPI/Xero-OpenAPI, v16.1.0), schemas ``Invoice``, ``CreditNote``, ``Contact``,
  ``LineItem``, ``Address``, ``PaymentTerm``, ``Error``.
* JSON dates ``/Date(1539993600000+0000)/`` and ``DateString``: the spec's examples, and
  https://developer.xero.com/documentation/api/accounting/requests-and-responses
* Webhook payload: ``specs/xero/xero-webhooks.yaml`` and
  https://developer.xero.com/documentation/webhooks/configuring-your-server
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from datetime import UTC, date, datetime, time
from decimal import ROUND_HALF_UP, Decimal
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from syncd.core.errors import FatalError
from syncd.core.interfaces import (
    Client,
    CreditNoteStatus,
    DraftKind,
    InvoiceDraft,
    InvoiceLine,
    InvoiceState,
    InvoiceStatus,
    LedgerDocument,
    LedgerLine,
)
from syncd.plumbing.http import Rejected

# Xero's documented length limits.
# ContactNumber: "max length = 50" (spec schema Contact.ContactNumber, maxLength: 50).
CONTACT_NUMBER_MAX = 50
# Reference: "Invoice only - additional reference number (max length = 255)", the field
# table of https://developer.xero.com/documentation/api/accounting/invoices as mirrored at
# https://suchimitha.github.io/Xero-API/docs/InvoiceOperations (the official page itself
# was not reachable from here); the OpenAPI file gives no maxLength for Reference.
REFERENCE_MAX = 255
# Idempotency-Key: "128 character max" (spec components.parameters.idempotencyKey).
IDEMPOTENCY_KEY_MAX = 128
STAMP_PREFIX = "syncd:"
_STAMP_SEPARATOR = " · "

# ---------------------------------------------------------------------------
# JSON codec: Decimal in, Decimal out
# ---------------------------------------------------------------------------


def dump_json(value: Any) -> bytes:
    """Serialise ``value`` as JSON, writing every Decimal as a JSON number.

    Floats are refused: money never travels through binary floating point.

    Raises:
        TypeError: for a float, a non-finite Decimal or an unsupported type.
    """
    return _encode(value).encode("utf-8")


def _encode(value: Any) -> str:
    if value is None or isinstance(value, bool | str | int):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise TypeError(f"cannot serialise non-finite Decimal {value!r} as JSON")
        return format(value, "f")
    if isinstance(value, Mapping):
        items = (f"{json.dumps(str(key), ensure_ascii=False)}:{_encode(item)}" for key, item in value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_encode(item) for item in value) + "]"
    raise TypeError(f"cannot serialise {type(value).__name__} as JSON (floats are refused on purpose)")


def load_json(data: bytes | str) -> Any:
    """Parse JSON, reading every non-integer number as a Decimal."""
    return json.loads(data, parse_float=Decimal)


# ---------------------------------------------------------------------------
# Xero dates
# ---------------------------------------------------------------------------

_MS_DATE = re.compile(r"^/Date\((?P<ms>-?\d+)(?P<offset>[+-]\d{4})?\)/$")


def parse_xero_datetime(value: str) -> datetime:
    """An aware UTC datetime from ``/Date(ms+0000)/`` or an ISO-8601 string (naive = UTC).

    The milliseconds in ``/Date(...)/`` count from the Unix epoch in UTC; the offset
    that may follow is informative only (the format of the spec's examples).

    Raises:
        ValueError: the string is neither form.
    """
    match = _MS_DATE.match(value.strip())
    if match:
        return datetime.fromtimestamp(int(match["ms"]) / 1000, tz=UTC)
    parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def parse_xero_date(value: str) -> date:
    """A calendar date from ``/Date(ms+0000)/``, ``YYYY-MM-DD`` or ``YYYY-MM-DDT00:00:00``."""
    text = value.strip()
    if len(text) == 10:
        return date.fromisoformat(text)
    return parse_xero_datetime(text).date()


def format_xero_datetime(moment: datetime) -> str:
    """``/Date(ms+0000)/`` for an aware datetime, as Xero writes ``UpdatedDateUTC``."""
    return f"/Date({int(moment.astimezone(UTC).timestamp() * 1000)}+0000)/"


def format_xero_date(day: date) -> str:
    """``/Date(ms+0000)/`` for a calendar date (midnight UTC), as Xero writes ``Date``."""
    return format_xero_datetime(datetime.combine(day, time(), tzinfo=UTC))


def _optional_datetime(value: Any) -> Any:
    return parse_xero_datetime(value) if isinstance(value, str) and value else None


def _optional_date(value: Any) -> Any:
    return parse_xero_date(value) if isinstance(value, str) and value else None


XeroDateTime = Annotated[datetime | None, BeforeValidator(_optional_datetime)]
XeroDate = Annotated[date | None, BeforeValidator(_optional_date)]

# ---------------------------------------------------------------------------
# Response payloads
# ---------------------------------------------------------------------------


class Payload(BaseModel):
    """Base of the vendor payload models: frozen, populated from Xero's names, extra keys ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


class XeroContact(Payload):
    """A contact as Xero returns it (schema ``Contact``)."""

    contact_id: str = Field(alias="ContactID")
    name: str = Field("", alias="Name")
    contact_number: str | None = Field(None, alias="ContactNumber")
    contact_status: str | None = Field(None, alias="ContactStatus")


class XeroLineItem(Payload):
    """A line as Xero returns it (schema ``LineItem``)."""

    description: str | None = Field(None, alias="Description")
    quantity: Decimal | None = Field(None, alias="Quantity")
    unit_amount: Decimal | None = Field(None, alias="UnitAmount")
    account_code: str | None = Field(None, alias="AccountCode")
    tax_type: str | None = Field(None, alias="TaxType")
    item_code: str | None = Field(None, alias="ItemCode")
    line_amount: Decimal | None = Field(None, alias="LineAmount")
    tax_amount: Decimal | None = Field(None, alias="TaxAmount")


class XeroContactRef(Payload):
    """The ``Contact`` of a document: its ``ContactID`` is what syncd compares."""

    contact_id: str | None = Field(None, alias="ContactID")


class XeroPaymentRef(Payload):
    """A payment as listed on an invoice's ``Payments`` (schema ``Payment``: ``Date``, ``Amount``)."""

    date: XeroDate = Field(None, alias="Date")
    amount: Decimal | None = Field(None, alias="Amount")


class XeroCreditNoteRef(Payload):
    """An entry of an invoice's ``CreditNotes`` (schema ``CreditNote``: "credit notes that have been applied")."""

    credit_note_id: str | None = Field(None, alias="CreditNoteID")


class XeroInvoice(Payload):
    """An invoice as Xero returns it (schema ``Invoice``)."""

    invoice_id: str = Field(alias="InvoiceID")
    invoice_number: str | None = Field(None, alias="InvoiceNumber")
    type: str | None = Field(None, alias="Type")
    status: str = Field(alias="Status")
    reference: str | None = Field(None, alias="Reference")
    currency_code: str = Field(alias="CurrencyCode")
    sub_total: Decimal | None = Field(None, alias="SubTotal")
    total: Decimal = Field(Decimal(0), alias="Total")
    amount_due: Decimal = Field(Decimal(0), alias="AmountDue")
    amount_paid: Decimal = Field(Decimal(0), alias="AmountPaid")
    sent_to_contact: bool = Field(False, alias="SentToContact")
    due_date: XeroDate = Field(None, alias="DueDate")
    updated: XeroDateTime = Field(None, alias="UpdatedDateUTC")
    contact: XeroContactRef | None = Field(None, alias="Contact")
    payments: tuple[XeroPaymentRef, ...] = Field((), alias="Payments")
    date: XeroDate = Field(None, alias="Date")
    line_amount_types: str | None = Field(None, alias="LineAmountTypes")
    line_items: tuple[XeroLineItem, ...] = Field((), alias="LineItems")
    total_tax: Decimal | None = Field(None, alias="TotalTax")
    credit_notes: tuple[XeroCreditNoteRef, ...] = Field((), alias="CreditNotes")
    fully_paid_on: XeroDate = Field(None, alias="FullyPaidOnDate")


class XeroCreditNote(Payload):
    """A credit note as Xero returns it (schema ``CreditNote``)."""

    credit_note_id: str = Field(alias="CreditNoteID")
    credit_note_number: str | None = Field(None, alias="CreditNoteNumber")
    status: str = Field(alias="Status")
    reference: str | None = Field(None, alias="Reference")
    currency_code: str = Field(alias="CurrencyCode")
    sub_total: Decimal | None = Field(None, alias="SubTotal")
    total: Decimal = Field(Decimal(0), alias="Total")
    remaining_credit: Decimal | None = Field(None, alias="RemainingCredit")
    due_date: XeroDate = Field(None, alias="DueDate")
    updated: XeroDateTime = Field(None, alias="UpdatedDateUTC")
    contact: XeroContactRef | None = Field(None, alias="Contact")
    date: XeroDate = Field(None, alias="Date")
    line_amount_types: str | None = Field(None, alias="LineAmountTypes")
    line_items: tuple[XeroLineItem, ...] = Field((), alias="LineItems")
    total_tax: Decimal | None = Field(None, alias="TotalTax")


class XeroPagination(Payload):
    """The ``pagination`` object of a paged list (schema ``Pagination``)."""

    page: int = 1
    page_size: int = Field(100, alias="pageSize")
    page_count: int = Field(1, alias="pageCount")
    item_count: int = Field(0, alias="itemCount")


class XeroInvoices(Payload):
    """The ``Invoices`` envelope."""

    invoices: tuple[XeroInvoice, ...] = Field((), alias="Invoices")
    pagination: XeroPagination | None = None


class XeroCreditNotes(Payload):
    """The ``CreditNotes`` envelope."""

    credit_notes: tuple[XeroCreditNote, ...] = Field((), alias="CreditNotes")
    pagination: XeroPagination | None = None


class XeroContacts(Payload):
    """The ``Contacts`` envelope."""

    contacts: tuple[XeroContact, ...] = Field((), alias="Contacts")


class XeroOrganisation(Payload):
    """The few ``Organisation`` fields syncd reads (``check()`` and the lock dates).

    ``PeriodLockDate`` and ``EndOfYearLockDate``: "Shown if set" (spec schema
    ``Organisation``, ``x-is-msdate``).
    """

    organisation_id: str | None = Field(None, alias="OrganisationID")
    name: str | None = Field(None, alias="Name")
    organisation_status: str | None = Field(None, alias="OrganisationStatus")
    short_code: str | None = Field(None, alias="ShortCode")
    period_lock_date: XeroDate = Field(None, alias="PeriodLockDate")
    end_of_year_lock_date: XeroDate = Field(None, alias="EndOfYearLockDate")


class XeroOrganisations(Payload):
    """The ``Organisations`` envelope."""

    organisations: tuple[XeroOrganisation, ...] = Field((), alias="Organisations")


class XeroValidationMessage(Payload):
    """One entry of ``ValidationErrors`` (schema ``ValidationError``)."""

    message: str = Field("", alias="Message")


class XeroElement(Payload):
    """One rejected element of a ``ValidationException`` (schema ``Element``)."""

    validation_errors: tuple[XeroValidationMessage, ...] = Field((), alias="ValidationErrors")


class XeroError(Payload):
    """Xero's 400 body (schema ``Error``): ``ErrorNumber``, ``Type``, ``Message``, ``Elements``."""

    error_number: int | None = Field(None, alias="ErrorNumber")
    type: str | None = Field(None, alias="Type")
    message: str | None = Field(None, alias="Message")
    elements: tuple[XeroElement, ...] = Field((), alias="Elements")

    def messages(self) -> list[str]:
        """Every validation message, or the top-level message when there are none."""
        found = [error.message for element in self.elements for error in element.validation_errors if error.message]
        return found or ([self.message] if self.message else [])


# Xero's refusal of a record (a 400 ``ValidationException``) is the shared record error,
# raised by :class:`~syncd.plumbing.http.VendorHttp` with every message (``connectors.xero.auth.XeroErrors``).
XeroRejected = Rejected


class XeroWebhookEvent(Payload):
    """One event of a webhook delivery (``xero-webhooks.yaml``, ``WebhookEvent.events[]``)."""

    resource_url: str = Field(alias="resourceUrl")
    resource_id: str = Field(alias="resourceId", min_length=1)
    event_date_utc: str = Field(alias="eventDateUtc", min_length=1)
    event_type: str = Field(alias="eventType", min_length=1)
    event_category: str = Field(alias="eventCategory", min_length=1)
    tenant_id: str = Field(alias="tenantId")
    tenant_type: str = Field(alias="tenantType")

    def occurred_at(self) -> datetime:
        """``eventDateUtc`` as an aware datetime (Xero sends it without a zone; it is UTC)."""
        return parse_xero_datetime(self.event_date_utc)


class XeroWebhookPayload(Payload):
    """A webhook delivery body.

    The sequences are ``minimum: 1`` in the spec, but the intent-to-receive deliveries
    carry ``0`` (https://developer.xero.com/documentation/webhooks/configuring-your-server),
    so 0 is accepted.
    """

    events: tuple[XeroWebhookEvent, ...]
    first_event_sequence: int = Field(alias="firstEventSequence", ge=0)
    last_event_sequence: int = Field(alias="lastEventSequence", ge=0)
    entropy: str


# ---------------------------------------------------------------------------
# Canonical -> Xero request bodies
# ---------------------------------------------------------------------------


def contact_number(client_key: str) -> str:
    """The ``ContactNumber`` syncd stamps on a client's contact.

    The client key itself when it fits Xero's 50-character limit; otherwise the stable
    short form ``syncd-`` + the first 44 hex digits of its SHA-256 (50 characters).
    """
    if len(client_key) <= CONTACT_NUMBER_MAX:
        return client_key
    return "syncd-" + hashlib.sha256(client_key.encode("utf-8")).hexdigest()[: CONTACT_NUMBER_MAX - 6]


def where_literal(value: str) -> str:
    """A string literal for Xero's ``where`` filter, with ``\\`` and ``"`` escaped.

    Xero documents the filter's C#-like syntax (``Name=="Peter"``) but not how a quote
    inside a value is escaped; a backslash escape is used here (unconfirmed, see report).
    """
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def stamp(key: str) -> str:
    """syncd's stamp for billing-event ``key`` as it appears in an invoice ``Reference``."""
    return f"{STAMP_PREFIX}{key}"


def reference(po_number: str | None, key: str) -> str:
    """``"{po} · syncd:{key}"`` (or just the stamp), trimming the PO part to fit 255 characters."""
    mark = stamp(key)
    if not po_number or not po_number.strip():
        return mark
    room = REFERENCE_MAX - len(mark) - len(_STAMP_SEPARATOR)
    po = po_number.strip()[: max(room, 0)].rstrip()
    return f"{po}{_STAMP_SEPARATOR}{mark}" if po else mark


def carries_stamp(reference_text: str | None, key: str) -> bool:
    """Whether a stored ``Reference`` carries exactly the stamp of ``key``."""
    if not reference_text:
        return False
    return re.search(rf"(?:^|\s){re.escape(stamp(key))}(?:\s|$)", reference_text) is not None


_STAMPED = re.compile(rf"(?:^|\s){re.escape(STAMP_PREFIX)}(\S+)(?:\s|$)")


def stamped_key(reference_text: str | None) -> str | None:
    """The billing-event key stamped in a ``Reference`` (:func:`stamp`), or ``None``."""
    found = _STAMPED.search(reference_text or "")
    return found.group(1) if found else None


def _drop_empty(mapping: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in mapping.items() if value not in (None, "", [], {})}


def contact_details(contact: Mapping[str, Any]) -> dict[str, str | None]:
    """A Xero contact's details in :meth:`~syncd.core.interfaces.Client.ledger_details` form.

    The address is the ``POBOX`` one, where :func:`contact_payload` writes it.
    """
    postal: Mapping[str, Any] = next((a for a in contact.get("Addresses") or [] if a.get("AddressType") == "POBOX"), {})
    parts = [postal.get(name) for name in ("AddressLine1", "AddressLine2", "City", "Region", "PostalCode", "Country")]
    return {
        "legal_name": contact.get("Name") or None,
        "first_name": contact.get("FirstName") or None,
        "last_name": contact.get("LastName") or None,
        "email": contact.get("EmailAddress") or None,
        "tax_id": contact.get("TaxNumber") or None,
        "address": ", ".join(str(part) for part in parts if part) or None,
        "payment_terms_days": _sales_terms_days(contact),
    }


def _sales_terms_days(contact: Mapping[str, Any]) -> str | None:
    """The contact's sales payment terms in days after the invoice date, or ``None``.

    Spec schemas ``PaymentTerm`` (``Sales``) and ``Bill`` (``Day``, ``Type``): only
    ``DAYSAFTERBILLDATE`` is a number of days after the invoice date; the other types
    (days after the end of the invoice month, a day of the current or following month)
    cannot be read as days, and neither can a contact with no terms of its own (the
    organisation's default applies, which the contact does not carry).
    """
    terms = contact.get("PaymentTerms")
    sales = terms.get("Sales") if isinstance(terms, Mapping) else None
    if not isinstance(sales, Mapping) or sales.get("Type") != "DAYSAFTERBILLDATE" or sales.get("Day") is None:
        return None
    return str(int(sales["Day"]))


# Which Contact keys hold each detail of :meth:`~syncd.core.interfaces.Client.ledger_details`.
CONTACT_FIELDS: Mapping[str, tuple[str, ...]] = {
    "legal_name": ("Name",),
    "first_name": ("FirstName",),
    "last_name": ("LastName",),
    "email": ("EmailAddress",),
    "tax_id": ("TaxNumber",),
    "address": ("Addresses",),
    "payment_terms_days": ("PaymentTerms",),
}


def contact_payload(client: Client, number: str) -> dict[str, Any]:
    """The ``Contact`` body for a new contact (``PUT /Contacts``).

    ``Addresses`` uses ``POBOX``, Xero's postal/billing address type (spec ``Address.AddressType``
    enum POBOX/STREET; https://developer.xero.com/documentation/api/accounting/types#addresses).
    ``PaymentTerms.Sales`` with ``DAYSAFTERBILLDATE`` sets the client's payment terms
    (spec schemas ``PaymentTerm``/``Bill``/``PaymentTermType``).
    """
    person = client.billing_contact
    body: dict[str, Any] = {
        "Name": client.legal_name,
        "ContactNumber": number,
        "EmailAddress": person.email if person else None,
        "FirstName": person.first_name if person else None,
        "LastName": person.last_name if person else None,
        "TaxNumber": client.tax_id,
        "PaymentTerms": {"Sales": {"Day": client.payment_terms_days, "Type": "DAYSAFTERBILLDATE"}},
    }
    if client.address is not None:
        address = client.address
        postal = _drop_empty(
            {
                "AddressType": "POBOX",
                "AddressLine1": address.line1,
                "AddressLine2": address.line2,
                "City": address.city,
                "Region": address.region,
                "PostalCode": address.postal_code,
                "Country": address.country,
                "AttentionTo": person.name if person else None,
            }
        )
        body["Addresses"] = [postal]
    return _drop_empty(body)


def _unit_amount(price: Decimal, unitdp: int | None) -> Decimal:
    """The unit price at the precision Xero keeps: 2 decimals, or 4 with ``unitdp=4``."""
    return price.quantize(Decimal(1).scaleb(-(unitdp or 2)), rounding=ROUND_HALF_UP)


def line_payload(line: InvoiceLine, unitdp: int | None) -> dict[str, Any]:
    """One ``LineItem`` (Description, Quantity, UnitAmount, AccountCode, TaxType, ItemCode, Tracking).

    ``TaxType`` is left out when the line has none, so the account's default tax rate
    applies. ``Tracking`` is a list of ``{Name, Option}`` (spec schema ``LineItemTracking``).
    """
    return _drop_empty(
        {
            "Description": line.description,
            "Quantity": line.quantity,
            "UnitAmount": _unit_amount(line.unit_price, unitdp),
            "AccountCode": line.account_code,
            "TaxType": line.tax_type,
            "ItemCode": line.item_code,
            "Tracking": [{"Name": item.name, "Option": item.option} for item in line.tracking],
        }
    )


def _document(draft: InvoiceDraft, contact_id: str, unitdp: int | None) -> dict[str, Any]:
    return {
        "Contact": {"ContactID": contact_id},
        "Date": draft.issue_date.isoformat(),
        "LineAmountTypes": draft.line_amount_types,
        "CurrencyCode": draft.currency,
        "Status": "AUTHORISED" if draft.status == "authorised" else "DRAFT",
        "Reference": reference(draft.reference, draft.key),
        "LineItems": [line_payload(line, unitdp) for line in draft.lines],
    }


def invoice_payload(draft: InvoiceDraft, contact_id: str, unitdp: int | None) -> dict[str, Any]:
    """The ``Invoices`` body for an ``ACCREC`` invoice (``PUT /Invoices``).

    Dates are ``YYYY-MM-DD`` as the Invoices page documents for ``Date``/``DueDate``.
    """
    return {
        "Invoices": [{"Type": "ACCREC", **_document(draft, contact_id, unitdp), "DueDate": draft.due_date.isoformat()}]
    }


def credit_note_payload(draft: InvoiceDraft, contact_id: str, unitdp: int | None) -> dict[str, Any]:
    """The ``CreditNotes`` body for an ``ACCRECCREDIT`` credit note (``PUT /CreditNotes``)."""
    return {"CreditNotes": [{"Type": "ACCRECCREDIT", **_document(draft, contact_id, unitdp)}]}


# ---------------------------------------------------------------------------
# Xero -> canonical
# ---------------------------------------------------------------------------

# Invoice status codes: https://developer.xero.com/documentation/api/accounting/types#invoices
# (spec enum DRAFT, SUBMITTED, DELETED, AUTHORISED, PAID, VOIDED). SUBMITTED means
# "awaiting approval", which is still a draft in syncd's words.
_STATES = {
    "DRAFT": InvoiceState.DRAFT,
    "SUBMITTED": InvoiceState.DRAFT,
    "AUTHORISED": InvoiceState.AUTHORISED,
    "PAID": InvoiceState.PAID,
    "VOIDED": InvoiceState.VOIDED,
    "DELETED": InvoiceState.VOIDED,
}


def _state(status: str, amount_paid: Decimal, sent: bool) -> InvoiceState:
    state = _STATES.get(status.upper())
    if state is None:
        raise FatalError(f"xero: unknown invoice status {status!r}; expected one of {', '.join(_STATES)}")
    if state is InvoiceState.AUTHORISED and amount_paid > 0:
        return InvoiceState.PARTIALLY_PAID
    if state is InvoiceState.AUTHORISED and sent:
        return InvoiceState.SENT
    return state


def _lines(items: tuple[XeroLineItem, ...]) -> tuple[LedgerLine, ...]:
    return tuple(
        LedgerLine(
            description=item.description,
            quantity=item.quantity,
            unit_price=item.unit_amount,
            account_code=item.account_code,
            tax_type=item.tax_type,
            item_code=item.item_code,
            line_amount=item.line_amount,
            tax_amount=item.tax_amount,
        )
        for item in items
    )


def invoice_document(invoice: XeroInvoice) -> LedgerDocument:
    """The editable content of a Xero invoice (schema ``Invoice``: Contact, Date, DueDate,
    LineAmountTypes, Reference, LineItems, SubTotal, TotalTax, Total, CreditNotes, FullyPaidOnDate)."""
    return LedgerDocument(
        customer_id=invoice.contact.contact_id if invoice.contact else None,
        issue_date=invoice.date,
        due_date=invoice.due_date,
        currency=invoice.currency_code,
        line_amount_types=invoice.line_amount_types,
        reference=invoice.reference,
        lines=_lines(invoice.line_items),
        subtotal=invoice.sub_total,
        total_tax=invoice.total_tax,
        total=invoice.total,
        credit_note_ids=tuple(note.credit_note_id for note in invoice.credit_notes if note.credit_note_id),
        fully_paid_on=invoice.fully_paid_on,
    )


def credit_note_document(note: XeroCreditNote) -> LedgerDocument:
    """The editable content of a Xero credit note (schema ``CreditNote``)."""
    return LedgerDocument(
        customer_id=note.contact.contact_id if note.contact else None,
        issue_date=note.date,
        due_date=note.due_date,
        currency=note.currency_code,
        line_amount_types=note.line_amount_types,
        reference=note.reference,
        lines=_lines(note.line_items),
        subtotal=note.sub_total,
        total_tax=note.total_tax,
        total=note.total,
    )


def invoice_status(invoice: XeroInvoice) -> InvoiceStatus:
    """The canonical status of a Xero invoice."""
    return InvoiceStatus(
        invoice_id=invoice.invoice_id,
        number=invoice.invoice_number,
        state=_state(invoice.status, invoice.amount_paid, invoice.sent_to_contact),
        currency=invoice.currency_code,
        total=invoice.total,
        subtotal=invoice.sub_total,
        amount_due=invoice.amount_due,
        amount_paid=invoice.amount_paid,
        due_date=invoice.due_date,
        reference=invoice.reference,
        updated_at=invoice.updated,
        kind="invoice",
        customer_id=invoice.contact.contact_id if invoice.contact else None,
        stamped_key=stamped_key(invoice.reference),
        last_payment_date=_last_payment(invoice),
        document=invoice_document(invoice),
    )


def _last_payment(invoice: XeroInvoice) -> date | None:
    """The latest ``Payments[].Date`` (a deleted payment leaves the list), else ``FullyPaidOnDate``."""
    dates = [payment.date for payment in invoice.payments if payment.date is not None]
    return max(dates) if dates else invoice.fully_paid_on


def credit_note_status(note: XeroCreditNote) -> InvoiceStatus:
    """The canonical status of a Xero credit note: what is owed is the credit not yet applied."""
    remaining = note.total if note.remaining_credit is None else note.remaining_credit
    applied = note.total - remaining
    return InvoiceStatus(
        invoice_id=note.credit_note_id,
        number=note.credit_note_number,
        state=_state(note.status, applied, False),
        currency=note.currency_code,
        total=note.total,
        subtotal=note.sub_total,
        amount_due=remaining,
        amount_paid=applied,
        due_date=note.due_date,
        reference=note.reference,
        updated_at=note.updated,
        kind="credit_note",
        customer_id=note.contact.contact_id if note.contact else None,
        stamped_key=stamped_key(note.reference),
        document=credit_note_document(note),
    )


def credit_note_state(note: XeroCreditNote) -> CreditNoteStatus:
    """The canonical status of a Xero credit note, with the credit it has left."""
    remaining = note.total if note.remaining_credit is None else note.remaining_credit
    return CreditNoteStatus(
        credit_note_id=note.credit_note_id,
        number=note.credit_note_number,
        state=_state(note.status, Decimal(0), False),
        currency=note.currency_code,
        total=note.total,
        remaining_credit=remaining,
        reference=note.reference,
        updated_at=note.updated,
    )


def allocation_payload(invoice_id: str, amount: Decimal, on: date) -> dict[str, Any]:
    """The ``Allocations`` body of ``PUT /CreditNotes/{id}/Allocations`` (spec schema ``Allocation``:
    ``Invoice``, ``Amount``, ``Date`` required)."""
    return {"Allocations": [{"Invoice": {"InvoiceID": invoice_id}, "Amount": amount, "Date": on.isoformat()}]}


def draft_endpoint(draft: InvoiceDraft) -> str:
    """The collection a draft is created in: ``/Invoices`` or ``/CreditNotes``."""
    return "/CreditNotes" if draft.kind is DraftKind.CREDIT_NOTE else "/Invoices"
