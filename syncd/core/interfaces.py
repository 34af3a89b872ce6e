"""Roles a connector plays, and the canonical models they exchange.

A connector is registered under the entry-point group ``syncd.connectors`` as a
:class:`ConnectorSpec`. Its factory builds one object per configured connection; that
object implements one or more role Protocols (:class:`Crm`, :class:`Invoicing`,
:class:`TimeTracker`). The engine only ever talks to these Protocols and these models:
vendor payloads are translated at the edge, inside the connector.

Every model here is a frozen, keyword-only value. Money is :class:`~decimal.Decimal`
with an ISO 4217 currency; datetimes carry a time zone.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Literal, Protocol, get_args, runtime_checkable

from pydantic import AwareDatetime, BaseModel, ConfigDict, field_validator

from syncd.core.errors import SyncdError
from syncd.core.money import check_currency, round_money


class Model(BaseModel):
    """Base of every canonical value: frozen, no unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


# ---------------------------------------------------------------------------
# Source records and change hints
# ---------------------------------------------------------------------------


class ChangeHint(Model):
    """A hint that something changed at a vendor (from a webhook or a poll).

    A hint is not the truth: processing re-reads the record from the source API.

    Attributes:
        connection: the configured connection name (``hubspot``).
        object_type: canonical kind of object: ``deal``, ``invoice``, ``time_entry`` ...
        object_id: the vendor's id of the object.
        event_id: dedupe key: the vendor's event id, else one built from the event's
            own fields (never from the time syncd received it).
        occurred_at: when the vendor says the change happened.
        kind: the vendor's event type, for logs (``deal.propertyChange``).
        version: the record's version the hint reports, when it says (a poll reads it:
            the same value as :attr:`SourceRecord.version`); a hint of a version already
            read is not read again.
    """

    connection: str
    object_type: str
    object_id: str
    event_id: str
    occurred_at: AwareDatetime
    kind: str = ""
    version: str | None = None


class SourceRecord(Model):
    """A record as re-read from its source, in a vendor-neutral nested shape.

    ``data`` is what mapping paths address. For a CRM deal it is::

        {"deal": {"id": "8812", "properties": {...}},
         "company": {"id": "...", "properties": {...}} | None,
         "contacts": [{"id": "...", "properties": {...}, "primary": bool, "labels": [...]}, ...],
         "line_items": [{"id": "...", "properties": {...}}, ...]}

    Attributes:
        connection: the connection it was read from.
        object_type: ``deal``, ``time_entry``, ``project`` ...
        object_id: vendor id.
        version: the source's modification stamp (or version), used in billing keys
            that must tell one change from another.
        modified_at: the source's last-modified time.
        data: the nested record.
        stage_changed_at: when the source recorded the move into the record's current
            stage (HubSpot: the newest entry of the ``dealstage`` property history), or
            ``None`` where the source keeps no such history.
    """

    connection: str
    object_type: str
    object_id: str
    version: str
    modified_at: AwareDatetime
    data: Mapping[str, Any]
    stage_changed_at: AwareDatetime | None = None


class ChangePage(Model):
    """One page of changes from a poll: the hints, and the cursor to resume from."""

    hints: tuple[ChangeHint, ...]
    cursor: str
    more: bool = False


# ---------------------------------------------------------------------------
# Canonical billing models
# ---------------------------------------------------------------------------


class Address(Model):
    """A postal address; every part optional because CRMs keep them loosely."""

    line1: str | None = None
    line2: str | None = None
    city: str | None = None
    region: str | None = None
    postal_code: str | None = None
    country: str | None = None


class Contact(Model):
    """A person to send invoices to."""

    name: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    email: str | None = None


class Client(Model):
    """The one billing record of a customer company.

    Attributes:
        key: syncd's stable key for the client (``hubspot:company:123``); stamped into
            each invoicing tool's customer record so it can be found again.
        legal_name: the name invoices are addressed to.
        currency: ISO 4217 code.
        payment_terms_days: days from issue to due date.
        po_number: default purchase-order number for this client's invoices.
        timezone: IANA zone the client's dates are computed in.
        external_ids: each connection's id for this client.
        account_code: revenue account at the invoicing tool for this client's lines that
            carry none of their own (see :func:`syncd.core.billing.with_ledger_codes`).
        tax_type: tax code at the invoicing tool for this client's lines, likewise.
    """

    key: str
    legal_name: str
    billing_contact: Contact | None = None
    address: Address | None = None
    tax_id: str | None = None
    currency: str
    payment_terms_days: int = 30
    po_number: str | None = None
    timezone: str = "UTC"
    external_ids: Mapping[str, str] = {}
    account_code: str | None = None
    tax_type: str | None = None

    def ledger_details(self) -> dict[str, str | None]:
        """The details the CRM owns on the ledger's customer record, in a comparable form.

        Legal name, billing contact (first and last name, email), tax id, the postal
        address as one line and the payment terms in days; a connector's
        :meth:`UpdatesCustomers.customer_details` reports the ledger's copy in the same form.
        """
        person = self.billing_contact or Contact()
        return {
            "legal_name": self.legal_name,
            "first_name": person.first_name,
            "last_name": person.last_name,
            "email": person.email,
            "tax_id": self.tax_id,
            "address": self.address_line(),
            "payment_terms_days": str(self.payment_terms_days),
        }

    def address_line(self) -> str | None:
        """The postal address as one line (its parts joined by ``", "``), or ``None``."""
        parts = (self.address or Address()).model_dump().values()
        return ", ".join(str(part) for part in parts if part) or None

    @field_validator("currency")
    @classmethod
    def _currency(cls, value: str) -> str:
        return check_currency(value)


class EngagementType(enum.StrEnum):
    """How a deal bills. A fixed-fee deal is ``one_time``."""

    RETAINER = "retainer"
    SUBSCRIPTION = "subscription"
    HOURLY = "hourly"
    MILESTONE = "milestone"
    ONE_TIME = "one_time"


LineKind = Literal[
    "item", "deal", "period", "proration", "adjustment", "credit", "hours", "milestone", "deposit", "deduction"
]
"""What made an invoice line, set by the code that makes it:

``item``: a CRM line item mapped by ``[engagement.lines]``; ``deal``: the one line mapped
from the deal itself when it has no line items; ``period``: a whole retainer or
subscription period; ``proration``: part of a period; ``adjustment``: an upgrade or
downgrade settling periods already invoiced; ``credit``: unused days credited after a
pause or cancellation; ``hours``: logged hours; ``milestone``: a milestone's amount;
``deposit``: a deposit invoiced when won; ``deduction``: a deposit's share deducted later.
"""

LINE_KINDS: tuple[LineKind, ...] = get_args(LineKind)
"""Every :data:`LineKind`, in the order above."""


class TrackingOption(Model):
    """A tracking category option on an invoice line (Xero's ``LineItemTracking``).

    Attributes:
        name: the tracking category's name (``Region``).
        option: the option's name within it (``North``).
    """

    name: str
    option: str


class InvoiceLine(Model):
    """One invoice line. ``amount`` is rounded once, here, half-up to minor units.

    Attributes:
        description: the line text.
        quantity: how many units.
        unit_price: price per unit, in the draft's currency, unrounded.
        account_code: revenue account at the invoicing tool.
        tax_type: tax code at the invoicing tool (``None``: the account's default applies).
        item_code: product/item code at the invoicing tool.
        kind: what made the line (:data:`LineKind`); the ledger codes of a line without
            its own are chosen by it (:func:`syncd.core.billing.with_ledger_codes`).
        tracking: tracking category options of the line.
    """

    description: str
    quantity: Decimal
    unit_price: Decimal
    account_code: str | None = None
    tax_type: str | None = None
    item_code: str | None = None
    kind: LineKind = "item"
    tracking: tuple[TrackingOption, ...] = ()

    def amount(self, currency: str) -> Decimal:
        """The line amount in ``currency``'s minor units, rounded half-up once."""
        return round_money(self.quantity * self.unit_price, currency)


class AmountChange(Model):
    """A change of a recurring engagement's amount (an upgrade or a downgrade).

    Attributes:
        version: the source's change sequence (modification stamp) that made the
            change; it tells this change from others in billing keys.
        effective: first day (in the client's zone) the new amount applies.
        amount: the recurring amount per cycle from ``effective`` on.
        recorded_at: when the change was recorded at the source; periods invoiced
            before it are settled by an ``engagement_changed`` invoice or credit note.
            ``None`` means at the start of ``effective`` in the client's zone.
    """

    version: str
    effective: date
    amount: Decimal
    recorded_at: AwareDatetime | None = None


class RateChange(Model):
    """A change of an hourly engagement's rate, made at the source.

    Attributes:
        effective: first day (in the client's zone) the new rate applies to time entries
            (by their ``spent_date``); entries dated before it keep the rate in force then.
        rate: the hourly rate from ``effective`` on.
        recorded_at: when the source recorded the change.
    """

    effective: date
    rate: Decimal
    recorded_at: AwareDatetime | None = None


class Pause(Model):
    """Days a recurring engagement is paused and not billed.

    Attributes:
        start / end: first and last paused day (inclusive), in the client's zone.
        recorded_at: when the pause was recorded at the source (``None``: at the
            start of ``start`` in the client's zone).
    """

    start: date
    end: date
    recorded_at: AwareDatetime | None = None


class Milestone(Model):
    """A billable milestone of a ``milestone`` engagement.

    Attributes:
        id: the source's id of the milestone; it tells one milestone invoice from another.
        name: the line text.
        amount: the fixed amount invoiced when the milestone is done.
        done_at: when it was done (``None`` while open).
        tracker_task_id: the time tracker's id of a task on the engagement's project
            (:attr:`Engagement.time_project_id`). With it the milestone is done when the
            time tracker says so, not when the source does (see ``tracker_done_when``).
        tracker_done_when: what done means at the time tracker: the task deactivated
            on the project (``task_inactive``, with ``tracker_task_id``) or the whole
            project archived (``project_archived``, any task ignored). The engine reads
            it into ``done_at`` (:func:`syncd.engine.hours.with_tracker_milestones`).
    """

    id: str
    name: str
    amount: Decimal
    done_at: AwareDatetime | None = None
    tracker_task_id: str | None = None
    tracker_done_when: Literal["task_inactive", "project_archived"] = "task_inactive"

    @property
    def from_tracker(self) -> bool:
        """Whether ``done_at`` is read from the time tracker rather than the source."""
        return self.tracker_task_id is not None or self.tracker_done_when == "project_archived"


class Engagement(Model):
    """How one deal bills.

    Attributes:
        key: syncd's key (``hubspot:deal:8812``).
        client_key: the :class:`Client` it bills.
        type: the :class:`EngagementType`.
        name: a readable name (the deal name).
        currency: ISO 4217 code.
        po_number: PO number for its invoices; ``None`` means the client's.
        won_at: when the deal was won (``None`` while it is open), as the mapping
            reads it (e.g. the close date); it dates the invoice and anchors periods.
        won_recorded_at: when the source recorded the move into the won stage (HubSpot:
            the ``dealstage`` property history), set by the engine; ``billing_start`` is
            compared with it, never with an editable close date.
        start: first day of service; end: last day (inclusive), both in the client's zone.
        lines: the deal's line items, for ``one_time`` invoices.
        amount: recurring amount per cycle (retainer/subscription).
        rate: hourly rate (hourly); with ``rate_changes``, the rate before the first of them.
        cycle: billing cycle of recurring engagements.
        anchor_day: day of month periods start on (1-31; 31 means month end).
        cap_hours: hours cap for hourly engagements.
        source_version: the source's modification stamp when this was mapped.
        billing_timing: recurring periods are invoiced at their start (``advance``) or
            the day after they end (``arrears``). Hourly periods are always in arrears.
        cancel_date: last day of service of a cancelled engagement (inclusive, in the
            client's zone); nothing is billed after it.
        cancelled_at: when the cancellation was recorded at the source (``None``: at
            the start of ``cancel_date`` in the client's zone).
        pauses: paused spans of a recurring engagement, not billed.
        amount_changes: upgrades and downgrades of a recurring engagement; ``amount``
            is the amount before the first of them.
        milestones: the milestones of a ``milestone`` engagement.
        bill_on: a ``one_time`` engagement invoices when the deal is won (``won``) or
            when the deliverable is accepted (``accepted``).
        accepted_at: when the deliverable was accepted (``None`` until then).
        cap_step_percent: an hourly engagement with ``cap_hours`` invoices each time the
            logged billable hours reach another multiple of this percentage of the cap.
        over_cap: hours beyond the cap are invoiced (``bill``) or held back (``hold``).
        group_hours_by: hourly invoice lines are one per task, person or project.
        amount_effective: first day (in the client's zone) the current ``amount``
            applies, read from the source with the amount; when the amount changes,
            the engine records an :class:`AmountChange` effective that day (``None``:
            the day the source recorded the change).
        time_project_id: the time tracker's id of the project whose hours this
            (hourly) engagement bills.
        cap_from_tracker: take ``cap_hours`` from the time tracker project's budget in
            hours instead of the source.
        deposit_percent: a ``milestone`` engagement, or a ``one_time`` one billed on
            acceptance, invoices this percentage (0 < p <= 100) of its total when won;
            later invoices deduct it (see :mod:`syncd.core.billing`). ``None``: no deposit.
        first_period_on_won: a retainer or subscription billed in advance invoices its
            first period when the deal is won, even if service starts later.
        tracking: tracking category options of every line of its invoices that has none
            of its own (mapped in a mapping's ``[tracking]`` table).
        rate_changes: rate changes made at the source since the deal was won, oldest
            first (kept by the engine: :func:`syncd.engine.recurring.keep_history`); a time entry
            is billed at the rate in force on its day (:meth:`rate_on`).
    """

    key: str
    client_key: str
    type: EngagementType
    name: str
    currency: str
    po_number: str | None = None
    won_at: AwareDatetime | None = None
    won_recorded_at: AwareDatetime | None = None
    start: date | None = None
    end: date | None = None
    lines: tuple[InvoiceLine, ...] = ()
    amount: Decimal | None = None
    rate: Decimal | None = None
    cycle: Literal["monthly", "quarterly", "yearly"] | None = None
    anchor_day: int | None = None
    cap_hours: Decimal | None = None
    source_version: str = ""
    billing_timing: Literal["advance", "arrears"] = "advance"
    cancel_date: date | None = None
    cancelled_at: AwareDatetime | None = None
    pauses: tuple[Pause, ...] = ()
    amount_changes: tuple[AmountChange, ...] = ()
    milestones: tuple[Milestone, ...] = ()
    bill_on: Literal["won", "accepted"] = "won"
    accepted_at: AwareDatetime | None = None
    cap_step_percent: Decimal = Decimal(100)
    over_cap: Literal["bill", "hold"] = "hold"
    group_hours_by: Literal["task", "person", "project"] = "task"
    amount_effective: date | None = None
    time_project_id: str | None = None
    cap_from_tracker: bool = False
    deposit_percent: Decimal | None = None
    first_period_on_won: bool = False
    tracking: tuple[TrackingOption, ...] = ()
    rate_changes: tuple[RateChange, ...] = ()

    @field_validator("currency")
    @classmethod
    def _currency(cls, value: str) -> str:
        return check_currency(value)

    def rate_on(self, day: date) -> Decimal | None:
        """The hourly rate in force on ``day``: the latest change effective by then, else ``rate``."""
        found = [change for change in self.rate_changes if change.effective <= day]
        return found[-1].rate if found else self.rate

    def current_rate(self) -> Decimal | None:
        """The hourly rate in force now (the latest change, else ``rate``)."""
        return self.rate_changes[-1].rate if self.rate_changes else self.rate


class TimeEntry(Model):
    """Hours logged at a time tracker.

    Attributes:
        id: the tracker's id.
        project_id / client_id: the tracker's ids.
        task / person: names, for grouping lines.
        spent_date: the day worked.
        hours: hours logged, as Decimal.
        billable: whether the hours are billable.
        billable_rate: the rate the tracker holds for the entry, if any.
        invoiced: whether the tracker already marks it invoiced.
        updated_at: last change at the tracker.
        released: an admin released these hours past the engagement's cap
            (``syncd hours release``): they are billed although the cap is reached.
    """

    id: str
    project_id: str
    client_id: str | None = None
    task: str | None = None
    person: str | None = None
    spent_date: date
    hours: Decimal
    billable: bool = True
    billable_rate: Decimal | None = None
    invoiced: bool = False
    updated_at: AwareDatetime
    released: bool = False


OVER_CAP_SUFFIX = ":over-cap"
"""Id suffix of the part of a time entry held over an hours cap (the part under the cap
keeps the entry's own id); see :func:`syncd.engine.hours.project_hours`."""


class BillingEventKind(enum.StrEnum):
    """One reason to invoice (docs/architecture.md)."""

    DEAL_WON = "deal_won"
    PERIOD_DUE = "period_due"
    MILESTONE_DONE = "milestone_done"
    HOURS_CAP_REACHED = "hours_cap_reached"
    DELIVERABLE_ACCEPTED = "deliverable_accepted"
    ENGAGEMENT_CHANGED = "engagement_changed"


class BillingEvent(Model):
    """One reason to invoice, with its idempotency key.

    The key is derived from the engagement, the kind, and what tells one occurrence
    from another (period, milestone id, cap step, or the source's change sequence),
    never from wall-clock time. See :func:`syncd.core.billing.event_key`.
    """

    key: str
    kind: BillingEventKind
    engagement_key: str
    occurrence: str
    occurred_at: AwareDatetime


class DraftKind(enum.StrEnum):
    """What a draft becomes at the invoicing tool."""

    INVOICE = "invoice"
    CREDIT_NOTE = "credit_note"


class InvoiceDraft(Model):
    """The invoice (or credit note) syncd computed for a billing event.

    Attributes:
        key: the billing event key; sent as the idempotency key and stamped on the
            invoice so it can be found again after a lost response.
        kind: invoice or credit note.
        client: the client billed.
        engagement_key: the engagement it bills.
        currency: ISO 4217 code.
        issue_date / due_date: in the client's time zone.
        reference: the PO number (or ``None``).
        lines: the lines; at least one.
        line_amount_types: whether unit prices include tax.
        status: create as a draft, or approved (authorised) at the tool.
        send: email it to the billing contact after creating.
        engagement_type: the type of the engagement billed (ledger codes may depend on it).
    """

    key: str
    kind: DraftKind = DraftKind.INVOICE
    client: Client
    engagement_key: str
    engagement_type: EngagementType | None = None
    currency: str
    issue_date: date
    due_date: date
    reference: str | None = None
    lines: tuple[InvoiceLine, ...]
    line_amount_types: Literal["Exclusive", "Inclusive", "NoTax"] = "Exclusive"
    status: Literal["draft", "authorised"] = "authorised"
    send: bool = False

    @field_validator("currency")
    @classmethod
    def _currency(cls, value: str) -> str:
        return check_currency(value)

    def subtotal(self) -> Decimal:
        """Sum of the rounded line amounts (before tax)."""
        return sum((line.amount(self.currency) for line in self.lines), Decimal(0))


class InvoiceState(enum.StrEnum):
    """Where an invoice stands at the invoicing tool, in syncd's words."""

    DRAFT = "draft"
    AUTHORISED = "authorised"
    SENT = "sent"
    PARTIALLY_PAID = "partially_paid"
    PAID = "paid"
    VOIDED = "voided"


class LedgerLine(Model):
    """One line of a document as the ledger holds it (every part optional: the ledger may omit any).

    Attributes:
        description / quantity / unit_price / account_code / tax_type / item_code: as on
            :class:`InvoiceLine`, in the ledger's precision.
        line_amount: the line's amount as the ledger computed it.
        tax_amount: the line's tax as the ledger computed it.
    """

    description: str | None = None
    quantity: Decimal | None = None
    unit_price: Decimal | None = None
    account_code: str | None = None
    tax_type: str | None = None
    item_code: str | None = None
    line_amount: Decimal | None = None
    tax_amount: Decimal | None = None


class LedgerDocument(Model):
    """What a ledger holds on an invoice or credit note, beyond its status: the part a person may edit.

    The engine keeps the copy the ledger answered when syncd created the document and
    compares each later read with the one before (:mod:`syncd.store.trail`): a change syncd did
    not make is a hand correction.

    Attributes:
        customer_id: the ledger's id of the customer billed.
        issue_date / due_date: the document's dates.
        currency: ISO 4217 code.
        line_amount_types: whether amounts include tax (``Exclusive``, ``Inclusive``, ``NoTax``).
        reference: the reference (PO number and syncd's stamp).
        lines: the lines, in the ledger's order.
        subtotal / total_tax / total: the ledger's totals.
        credit_note_ids: the credit notes applied to it (an invoice).
        fully_paid_on: the day it was fully paid, when it is.
    """

    customer_id: str | None = None
    issue_date: date | None = None
    due_date: date | None = None
    currency: str | None = None
    line_amount_types: str | None = None
    reference: str | None = None
    lines: tuple[LedgerLine, ...] = ()
    subtotal: Decimal | None = None
    total_tax: Decimal | None = None
    total: Decimal | None = None
    credit_note_ids: tuple[str, ...] = ()
    fully_paid_on: date | None = None


class InvoiceStatus(Model):
    """An invoice as the invoicing tool reports it.

    Attributes:
        invoice_id: the tool's id.
        number: the human invoice number.
        state: see :class:`InvoiceState`.
        currency: ISO 4217 code.
        total / amount_due / amount_paid: Decimal in ``currency``.
        subtotal: total before tax, when the tool reports it (checked against the draft).
        due_date: due date.
        reference: the reference as stored at the tool (holds our stamp).
        updated_at: last change at the tool.
        kind: ``invoice`` or ``credit_note``.
        customer_id: the tool's id of the customer it is addressed to, when it says.
        stamped_key: the billing-event key syncd stamped on it (``None``: not one of
            syncd's, e.g. made by hand at the tool).
        last_payment_date: the date of its latest payment, when it has any.
        document: the document's editable content, where the tool reports it (the
            trail compares it to find hand corrections); ``None`` when it does not.
    """

    invoice_id: str
    number: str | None
    state: InvoiceState
    currency: str
    total: Decimal
    subtotal: Decimal | None = None
    amount_due: Decimal
    amount_paid: Decimal
    due_date: date | None = None
    reference: str | None = None
    updated_at: AwareDatetime | None = None
    kind: str = "invoice"
    customer_id: str | None = None
    stamped_key: str | None = None
    last_payment_date: date | None = None
    document: LedgerDocument | None = None


class DealBillingStatus(Model):
    """What syncd writes back onto a CRM deal: the truth across all its documents.

    Built by :func:`syncd.core.receivables.deal_status` from every invoice and credit note
    of the deal (voided and deleted ones ignored).

    Attributes:
        invoice_number: the invoice numbers, oldest first, comma-separated.
        state: the overall state, by precedence overdue > partially paid > awaiting
            payment (sent, authorised) > draft > paid; paid only when all is paid.
        amount_due: what is still owed across the deal's approved invoices, less the
            unallocated credit of its credit notes, in ``currency``.
        currency: ISO 4217 code.
        due_date: the earliest due date among the invoices still open.
        days_overdue: the largest days overdue among them; 0 when none is overdue.
        total_invoiced: the sum of the approved invoices' totals.
    """

    invoice_number: str | None
    state: str
    amount_due: Decimal
    currency: str
    due_date: date | None = None
    days_overdue: int = 0
    total_invoiced: Decimal | None = None


class CompanyBillingStatus(Model):
    """What syncd writes onto a CRM company: its client's receivables, per currency.

    Built by :func:`syncd.core.receivables.company_status` from every invoice and credit note
    of the client (voided ones ignored). Amounts are in ``currency``, the company's main
    currency; other currencies are never converted into it but summed on their own in
    ``other_currencies``.

    Attributes:
        currency: ISO 4217 code of the figures.
        outstanding_balance: what the approved invoices owe, less unallocated credit.
        overdue_balance: what the invoices past due owe.
        oldest_overdue_days: the largest days overdue (0: nothing overdue).
        aging_current / aging_1_30 / aging_31_60 / aging_61_90 / aging_90_plus: what the
            invoices owe, by days overdue (current: not yet due).
        unallocated_credit: credit of approved credit notes not yet applied.
        last_payment_date: the latest payment on any invoice of the client.
        at_risk: whether the configured at-risk rule holds.
        at_risk_reason: why, when it does.
        other_currencies: the same figures in each other currency, one line
            (``EUR outstanding 1200.00, overdue 300.00 (oldest 12 days)``).
    """

    currency: str
    outstanding_balance: Decimal
    overdue_balance: Decimal
    oldest_overdue_days: int = 0
    aging_current: Decimal = Decimal(0)
    aging_1_30: Decimal = Decimal(0)
    aging_31_60: Decimal = Decimal(0)
    aging_61_90: Decimal = Decimal(0)
    aging_90_plus: Decimal = Decimal(0)
    unallocated_credit: Decimal = Decimal(0)
    last_payment_date: date | None = None
    at_risk: bool = False
    at_risk_reason: str | None = None
    other_currencies: str | None = None


class FollowUpTask(Model):
    """A CRM task asking a person to collect an overdue invoice (:mod:`syncd.engine.collection`).

    Attributes:
        key: syncd's key for it (one per invoice and step); stamped in the body so a
            retry can find a task whose creation answer was lost.
        subject: the task's title.
        body: the notes: invoice number, amount due, days overdue, a link to the invoice.
        due_at: when the task is due.
        owner_id: the CRM user it is assigned to (``None``: unassigned).
        deal_id / company_id: the CRM records it is associated with.
    """

    key: str
    subject: str
    body: str
    due_at: AwareDatetime
    owner_id: str | None = None
    deal_id: str | None = None
    company_id: str | None = None


# ---------------------------------------------------------------------------
# Roles
# ---------------------------------------------------------------------------


class Capability(enum.StrEnum):
    """Optional features a connector declares, so the engine can plan around a gap."""

    CREDIT_NOTES = "credit_notes"
    SEND_INVOICE = "send_invoice"
    IDEMPOTENCY_KEYS = "idempotency_keys"
    WEBHOOKS = "webhooks"
    MARK_INVOICED = "mark_invoiced"
    CREDIT_ALLOCATION = "credit_allocation"
    LOCK_DATES = "lock_dates"


@runtime_checkable
class Crm(Protocol):
    """A CRM holding deals, companies and contacts.

    Errors: every method raises :class:`~syncd.core.errors.NotFound` for an unknown id,
    :class:`~syncd.core.errors.AuthError` when credentials are rejected,
    :class:`~syncd.core.errors.RetriableError` for transient failures (after the shared
    retries are spent), and :class:`~syncd.core.errors.FatalError` for a request the vendor
    will never accept.
    """

    capabilities: frozenset[Capability]

    async def fetch_deal(self, deal_id: str, properties: Mapping[str, Sequence[str]] | None = None) -> SourceRecord:
        """Re-read one deal with its primary company, contacts and line items.

        Args:
            deal_id: the CRM's deal id.
            properties: per object type (``deal``, ``company``, ``contact``,
                ``line_item``), the properties to read beside the connector's own
                defaults (the mapping names what it reads).
        """
        ...

    async def poll_changes(self, cursor: str | None, *, since: datetime | None = None) -> ChangePage:
        """Deals changed since ``cursor`` (opaque, from the last page).

        Without a cursor (a fresh connection) the feed starts at ``since`` (the engine
        passes ``billing_start``, so a deal won between start and the first poll is
        found), else now. Returns a page; call again with its cursor while ``more``
        is true.
        """
        ...

    def iter_deals(self) -> AsyncIterator[SourceRecord]:
        """Every deal, for a full sync (uses the list endpoint, not search)."""
        ...

    async def write_billing_status(self, deal_id: str, status: DealBillingStatus) -> None:
        """Write the invoice number, state and amount due onto the deal."""
        ...

    async def check(self) -> list[str]:
        """Problems with the credentials or account, without rotating any token."""
        ...


@runtime_checkable
class ReadsDealsInBatches(Protocol):
    """A CRM that reads many deals, with their companies, contacts and line items, in a few calls.

    The engine's batcher (:mod:`syncd.engine.batching`) sends the deals several workers
    want at once through this instead of one :meth:`Crm.fetch_deal` each.
    """

    async def fetch_deals(
        self, deal_ids: Sequence[str], properties: Mapping[str, Sequence[str]] | None = None
    ) -> Mapping[str, SourceRecord | SyncdError]:
        """Each deal as :meth:`Crm.fetch_deal` would return it, by deal id.

        A deal the CRM does not have maps to :class:`~syncd.core.errors.NotFound`; a deal
        that alone cannot be read maps to its own error. An error of the whole request
        (auth, rate limit spent, CRM down) is raised: every deal of the batch fails alike.
        """
        ...


@runtime_checkable
class WritesStatusInBatches(Protocol):
    """A CRM that writes the billing standing of many deals in one call."""

    async def write_billing_statuses(
        self, statuses: Mapping[str, DealBillingStatus]
    ) -> Mapping[str, SyncdError | None]:
        """Write each deal's standing (as :meth:`Crm.write_billing_status`); per deal id ``None`` or its error.

        A vendor that refuses a whole batch for one bad element is split and retried by
        the connector until the bad one is alone: only it maps to an error.
        """
        ...


@runtime_checkable
class CreatesInvoicesInBatches(Protocol):
    """An invoicing tool that looks up customers and creates invoices many per request.

    Same guarantees as :class:`Invoicing`, per element: each draft still carries its own
    key (found again by :meth:`find_invoices`), and one rejected element fails alone.
    """

    async def upsert_customers(self, clients: Sequence[Client]) -> Mapping[str, str | SyncdError]:
        """Per ``client.key``: its customer id (found, adopted or created, as :meth:`Invoicing.upsert_customer`), or its error."""
        ...

    async def find_invoices(self, keys: Sequence[str], *, kind: DraftKind) -> Mapping[str, InvoiceStatus]:
        """The documents stamped with these keys that exist, by key (missing keys are absent)."""
        ...

    async def create_invoices(
        self, items: Sequence[tuple[InvoiceDraft, str]]
    ) -> Mapping[str, InvoiceStatus | SyncdError]:
        """Create each ``(draft, customer_id)`` (invoices and credit notes may be mixed), by ``draft.key``.

        Each element's result is what :meth:`Invoicing.create_invoice` would return or raise
        for it alone. A request retried, or refused as a whole, is never simply sent again:
        its members are looked up by their keys first and only the missing ones are sent.
        """
        ...


@runtime_checkable
class ReadsCustomersInBatches(Protocol):
    """An invoicing tool that reads many customer records in one call (the client record's ledger side)."""

    async def customers_details(self, customer_ids: Sequence[str]) -> Mapping[str, dict[str, str | None] | SyncdError]:
        """Per customer id: what :meth:`UpdatesCustomers.customer_details` returns for it, or its error
        (:class:`~syncd.core.errors.NotFound` for an id the tool does not have)."""
        ...


@runtime_checkable
class Invoicing(Protocol):
    """An accounting or billing tool that holds customers and invoices.

    ``create_invoice`` must be idempotent on ``draft.key``: it sends the key as the
    vendor's idempotency key where the vendor has one (declare
    :attr:`Capability.IDEMPOTENCY_KEYS`) and stamps it into the invoice so that
    :meth:`find_invoice` finds it again after a lost response.

    Errors: as for :class:`Crm`; a draft the tool rejects raises
    :class:`~syncd.core.errors.FatalError` naming the field.
    """

    capabilities: frozenset[Capability]

    async def upsert_customer(self, client: Client) -> str:
        """Find the customer stamped with ``client.key`` (else adopt or create it); its id."""
        ...

    async def find_invoice(self, key: str, *, kind: DraftKind) -> InvoiceStatus | None:
        """The document of ``kind`` (invoice or credit note) stamped with billing-event ``key``, if any.

        Only documents of that kind are searched: the engine passes its draft's kind, so
        an invoice's key is never looked up among credit notes or the other way round.
        Nothing found, including the vendor answering 404 to the look-up, is ``None``,
        never an error.
        """
        ...

    async def create_invoice(self, draft: InvoiceDraft, customer_id: str) -> InvoiceStatus:
        """Create (and, if ``draft.send``, email) the invoice or credit note."""
        ...

    async def get_invoice(self, invoice_id: str) -> InvoiceStatus:
        """Re-read one invoice."""
        ...

    async def poll_changes(self, cursor: str | None, *, since: datetime | None = None) -> ChangePage:
        """Invoices changed since ``cursor`` (hints with ``object_type='invoice'``); see :meth:`Crm.poll_changes`."""
        ...

    async def check(self) -> list[str]:
        """Problems with the credentials or account, without rotating any token."""
        ...


@runtime_checkable
class TimeTracker(Protocol):
    """A time tracker holding projects and logged hours.

    Errors: as for :class:`Crm`.
    """

    capabilities: frozenset[Capability]

    def time_entries(self, updated_since: datetime | None) -> AsyncIterator[TimeEntry]:
        """Time entries changed since ``updated_since`` (all when ``None``)."""
        ...

    async def poll_changes(self, cursor: str | None, *, since: datetime | None = None) -> ChangePage:
        """Time entries changed since ``cursor`` (hints with ``object_type='time_entry'``); see :meth:`Crm.poll_changes`."""
        ...

    async def check(self) -> list[str]:
        """Problems with the credentials or account."""
        ...


CRM_OBJECT_TYPES = ("deal", "company", "contact", "line_item")
"""The CRM object types a mapping reads properties of (see :class:`CrmSchema`)."""

CodeKind = Literal["account_code", "tax_type", "currency", "item_code", "tracking"]
"""A kind of code an invoice line or draft names at the invoicing tool (see :class:`InvoicingCodes`)."""


@runtime_checkable
class CrmSchema(Protocol):
    """Optional for a :class:`Crm`: the live property names of each object type.

    The drift guard (:mod:`syncd.engine.drift`) compares them with the properties a mapping
    reads, so a property deleted or renamed at the CRM is reported by name before a
    record fails on it. A CRM without it is simply not checked.

    Errors: :class:`~syncd.core.errors.AuthError`, :class:`~syncd.core.errors.RetriableError`
    and :class:`~syncd.core.errors.FatalError` as for :class:`Crm`.
    """

    async def properties(self, object_type: str) -> frozenset[str]:
        """The internal names of the properties ``object_type`` has now (archived ones excluded).

        Args:
            object_type: one of :data:`CRM_OBJECT_TYPES`.

        Raises:
            ValueError: ``object_type`` is not one of :data:`CRM_OBJECT_TYPES`.
        """
        ...


@runtime_checkable
class SendsInvoices(Protocol):
    """An invoicing tool that can email an approved invoice to its contact (``Capability.SEND_INVOICE``).

    Errors: as for :class:`Invoicing`.
    """

    async def send_invoice(self, invoice_id: str, key: str) -> None:
        """Email invoice ``invoice_id``; ``key`` is the billing event key (for idempotency)."""
        ...


class CreditNoteStatus(Model):
    """A credit note as the invoicing tool reports it.

    Attributes:
        credit_note_id: the tool's id.
        number: the human credit note number.
        state: see :class:`InvoiceState` (``paid`` once all credit is used).
        currency: ISO 4217 code.
        total: the credit note's total.
        remaining_credit: what is not yet allocated to invoices or refunded.
        reference: the reference as stored at the tool.
        updated_at: last change at the tool.
    """

    credit_note_id: str
    number: str | None
    state: InvoiceState
    currency: str
    total: Decimal
    remaining_credit: Decimal
    reference: str | None = None
    updated_at: AwareDatetime | None = None


class Allocation(Model):
    """Part of a credit note applied to an invoice, as the tool recorded it.

    Attributes:
        credit_note_id / invoice_id: the two documents.
        amount: the amount applied, in the documents' currency.
        remaining_credit: the credit note's credit left after it.
        invoice_amount_due: the invoice's amount due after it.
    """

    credit_note_id: str
    invoice_id: str
    amount: Decimal
    remaining_credit: Decimal
    invoice_amount_due: Decimal


class LockDates(Model):
    """The dates up to which the ledger is closed: nothing may be dated on or before them.

    Attributes:
        period_lock: closes the ledger to everyone but advisers (``None``: not set).
        end_of_year_lock: closes it to everyone (``None``: not set).
    """

    period_lock: date | None = None
    end_of_year_lock: date | None = None

    def closed_until(self) -> date | None:
        """The later of the two dates: a document dated on or before it is refused."""
        dates = [day for day in (self.period_lock, self.end_of_year_lock) if day is not None]
        return max(dates) if dates else None


@runtime_checkable
class AllocatesCredit(Protocol):
    """An invoicing tool that can apply a credit note to an invoice.

    Errors: as for :class:`Invoicing`; an allocation the tool refuses (more than the
    credit left or the invoice's amount due, another contact or currency) raises
    :class:`~syncd.core.errors.FatalError` with the tool's message.
    """

    async def allocate_credit_note(self, credit_note_id: str, invoice_id: str, amount: Decimal, key: str) -> Allocation:
        """Apply ``amount`` of credit note ``credit_note_id`` to invoice ``invoice_id``.

        ``key`` identifies this allocation: calling again with the same key (after a lost
        answer) applies nothing twice.
        """
        ...


@runtime_checkable
class ReadsCreditNotes(Protocol):
    """An invoicing tool whose credit notes can be read one by one.

    Its :meth:`Invoicing.poll_changes` reports changed credit notes too, as hints with
    ``object_type='credit_note'``. Errors: as for :class:`Invoicing`
    (:class:`~syncd.core.errors.NotFound` for an unknown id).
    """

    async def get_credit_note(self, credit_note_id: str) -> CreditNoteStatus:
        """Re-read one credit note, with the credit it has left."""
        ...


@runtime_checkable
class HasLockDates(Protocol):
    """An invoicing tool whose ledger can be closed up to a date.

    An invoice dated on or before :meth:`LockDates.closed_until` is refused by the tool;
    the engine dates such invoices after it. Errors: as for :class:`Invoicing`.
    """

    async def lock_dates(self) -> LockDates:
        """The ledger's lock dates now."""
        ...


@runtime_checkable
class UpdatesCustomers(Protocol):
    """An invoicing tool whose customer records syncd keeps in step with the CRM.

    Errors: as for :class:`Invoicing`.
    """

    async def customer_details(self, customer_id: str) -> dict[str, str | None]:
        """The customer's details as the tool holds them, in :meth:`Client.ledger_details` form.

        A detail the tool holds in a form syncd cannot read (payment terms that are not
        a number of days after the invoice date) is ``None``.
        """
        ...

    async def update_customer(
        self, customer_id: str, client: Client, key: str, *, fields: Collection[str] | None = None
    ) -> None:
        """Write ``client``'s details onto customer ``customer_id``; ``key`` makes it idempotent.

        Args:
            fields: only these :meth:`Client.ledger_details` keys are written (``None``:
                all); the tool's other details are left as they are.
        """
        ...


@runtime_checkable
class UpdatesCompanies(Protocol):
    """A CRM whose company records syncd writes client details onto (the client record's flows).

    Errors: as for :class:`Crm` (:class:`~syncd.core.errors.NotFound` for an unknown company).
    """

    async def update_company(self, company_id: str, properties: Mapping[str, str | None]) -> None:
        """Set ``properties`` (internal names) on company ``company_id``; others are left as they are."""
        ...


@runtime_checkable
class VoidsInvoices(Protocol):
    """An invoicing tool that can void an approved invoice that has no payments.

    Errors: as for :class:`Invoicing`; a tool that refuses (a payment was applied
    meanwhile) raises :class:`~syncd.core.errors.RecordError` with its message.
    """

    async def void_invoice(self, invoice_id: str, key: str) -> InvoiceStatus:
        """Void invoice ``invoice_id``; ``key`` makes the call idempotent. Returns its new status."""
        ...


@runtime_checkable
class LinksInvoices(Protocol):
    """An invoicing tool whose invoices can be opened by a link in its web app.

    Errors: as for :class:`Invoicing`.
    """

    async def invoice_url(self, invoice_id: str) -> str:
        """A link to invoice ``invoice_id`` in the tool's web app."""
        ...


@runtime_checkable
class WritesCompanyStatus(Protocol):
    """A CRM that shows a client's receivables on the company record (:class:`CompanyBillingStatus`).

    Errors: as for :class:`Crm`.
    """

    async def ensure_company_properties(self) -> Any:
        """Create the company properties it writes, if missing (idempotent)."""
        ...

    async def write_company_status(self, company_id: str, status: CompanyBillingStatus) -> None:
        """Write ``status`` onto company ``company_id``."""
        ...


@runtime_checkable
class ManagesTasks(Protocol):
    """A CRM that holds tasks for its users (:class:`FollowUpTask`).

    Errors: as for :class:`Crm`.
    """

    async def record_owner(self, object_type: str, object_id: str) -> str | None:
        """The user who owns a ``deal`` or ``company`` (``None``: nobody)."""
        ...

    async def create_task(self, task: FollowUpTask) -> str:
        """Create ``task``, associated with its deal and company; the task's id.

        Not idempotent: after a lost answer, call :meth:`find_task` before creating again.
        """
        ...

    async def find_task(self, task: FollowUpTask) -> str | None:
        """The id of the task created earlier for ``task.key``, if the CRM shows it."""
        ...

    async def close_task(self, task_id: str, body: str, *, complete: bool) -> None:
        """Replace the task's notes with ``body`` and, if ``complete``, mark it completed."""
        ...


@runtime_checkable
class InvoicingCodes(Protocol):
    """Optional for an :class:`Invoicing`: the codes an invoice may name there.

    The drift guard compares them with the codes a mapping can produce (constants,
    defaults and lookup-table values), so a deleted account or tax rate is reported
    before an invoice is attempted. An invoicing tool without it is not checked.

    Errors: as for :class:`Invoicing`.
    """

    async def codes(self) -> Mapping[CodeKind, frozenset[str]]:
        """The codes in use now, by kind (see :data:`CodeKind`).

        A kind the tool has no list of is left out (and not checked); an empty set
        means the tool has that kind of code but none are in use. Archived or deleted
        codes are left out.
        """
        ...


# ---------------------------------------------------------------------------
# Webhooks
# ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class WebhookRequest:
    """A webhook delivery as received, before any parsing.

    Attributes:
        method: HTTP method.
        url: the full public URL the vendor called (``public_url`` + path + query),
            which is what signatures are computed over.
        headers: lower-cased header names.
        body: the raw body bytes.
        received_at: when syncd received it.
    """

    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes
    received_at: datetime


class WebhookVerifier(Protocol):
    """Checks a delivery's signature and turns it into change hints. Pure: no I/O.

    Raises:
        AuthError: the signature is missing, wrong or stale (answered 401).
        RecordError: the body is signed correctly but malformed (answered 400).
    """

    def verify(self, request: WebhookRequest) -> list[ChangeHint]:
        """Verify and parse; an empty list is a valid delivery with nothing in it."""
        ...
