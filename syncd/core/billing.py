"""Billing rules: from canonical models to billing events and invoice drafts. Pure.

Nothing here does I/O or reads a clock: the time a rule needs is a parameter
(docs/architecture.md), and so is every piece of state (the keys already billed, the time entries
already invoiced). The engine maps a source record to an
:class:`~syncd.core.interfaces.Engagement` and a :class:`~syncd.core.interfaces.Client`, asks
:func:`due_events` (and :func:`cap_events` for hours) which billing events are due, and
turns each into an :class:`~syncd.core.interfaces.InvoiceDraft` with :func:`draft_for_event`
(or :func:`hours_draft` for hourly engagements).

Every billing event has a key, :func:`event_key`, derived from the engagement, the kind
and the occurrence (what tells one occurrence of the kind from another) and never from
wall-clock time, so computing the same event twice yields the same key and the invoicing
tool creates at most one invoice for it.

=====================  ==============================================================
kind                   when, and its occurrence
=====================  ==============================================================
deal_won               a ``one_time`` engagement billed on winning is won;
                       ``"won"`` (a reopen-and-rewin is no second invoice); or an
                       engagement with a deposit is won: ``"deposit"``
deliverable_accepted   a ``one_time`` engagement billed on acceptance is accepted;
                       ``"accepted"``
milestone_done         a milestone is done; the milestone's id
period_due             a period of a recurring engagement is issued
                       (:mod:`syncd.core.periods`); the period's first day, ISO
engagement_changed     an upgrade, downgrade, pause or cancellation is recorded after
                       periods it touches were issued (:mod:`syncd.core.proration`);
                       ``change:<source version>``, ``pause:<start>/<end>`` or
                       ``cancel:<last day>``
hours_cap_reached      logged hours reach another step of the cap; the step's index
                       (``"1"``, ``"2"``, ...)
=====================  ==============================================================

**Credit notes.** A downgrade, pause or cancellation recorded after a period was invoiced
owes the client a credit. :func:`draft_for_event` drafts it as a
:attr:`~syncd.core.interfaces.DraftKind.CREDIT_NOTE`. For an invoicing tool without credit
notes, call :func:`due_events` with ``credit_notes=False``: it leaves those events out,
and :func:`manual_credits` returns them as :class:`ManualCredit` values for the engine to
surface to a person. syncd never issues a negative invoice in place of a credit note.

**Deposits.** A ``milestone`` engagement, or a ``one_time`` engagement billed on
acceptance, with ``deposit_percent`` = *p* invoices a deposit when won (a ``deal_won``
event with occurrence ``"deposit"``, one line). The deposit is the sum of one *share*
per later invoice, each rounded once, half-up, to minor units:

* ``one_time``: one share, ``round(T × p / 100)``, where *T* is the sum of the rounded
  amounts of the engagement's lines; the acceptance invoice deducts it;
* ``milestone``: one share per milestone, ``round(A × p / 100)``, where *A* is the
  milestone's rounded amount; that milestone's invoice deducts it.

A deduction is one line, quantity 1 and a negative unit price (the share); an invoice
deducts only its own share, and every invoice's key is billed once, so the deposit is
credited exactly once and deposit plus later invoices add up to the total exactly. As
``p <= 100``, no share exceeds its invoice. A deposit engagement won before
``billing_start`` gets no deposit invoice (it was billed by other means, like a
``deal_won``) and its later invoices still deduct the shares. A ``one_time`` engagement
billed on winning ignores ``deposit_percent``: its one invoice bills the total.

**Hours.** An hourly engagement bills its billable, not yet invoiced time entries: each
period (when it has a ``cycle``, always in arrears) and each time the logged hours reach
another step of its cap. Lines are grouped by task, person or project
(``group_hours_by``), one line per group and rate; the rate of an entry is the first found
in :attr:`RateCard.precedence`. With ``over_cap="hold"`` entries that would take the
invoiced hours past the cap are held back, whole and in date order.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import ROUND_CEILING, Decimal
from typing import Literal
from zoneinfo import ZoneInfo

from syncd.core.errors import MappingError, ValidationFailed
from syncd.core.interfaces import (
    OVER_CAP_SUFFIX,
    BillingEvent,
    BillingEventKind,
    Client,
    DraftKind,
    Engagement,
    EngagementType,
    InvoiceDraft,
    InvoiceLine,
    TimeEntry,
)
from syncd.core.money import round_money
from syncd.core.periods import Period, is_recurring, issued_at, period_at, periods_between, service_start, start_of_day
from syncd.core.proration import Settlement, billed_spans, settlements, span_line, terms_at

WON = "won"
"""Occurrence of the one ``deal_won`` event of an engagement."""

ACCEPTED = "accepted"
"""Occurrence of the one ``deliverable_accepted`` event of an engagement."""

DEPOSIT = "deposit"
"""Occurrence of the ``deal_won`` event that invoices an engagement's deposit."""

RateSource = Literal["engagement", "project", "task", "person", "entry"]
"""Where an hourly rate can come from: the engagement's ``rate``, the rate card's
project, task or person rates, or the rate the time tracker holds for the entry."""


# ---------------------------------------------------------------------------
# Keys and dates
# ---------------------------------------------------------------------------


def event_key(engagement_key: str, kind: BillingEventKind, occurrence: str) -> str:
    """The idempotency key of one billing event: 32 lowercase hex characters.

    It is the first half of a SHA-256 over a JSON array of the three parts, so no
    two different triples share an encoding (``("a:b", …)`` vs ``("a", "b:…")``).

    Args:
        engagement_key: the engagement's key (``hubspot:deal:8812``).
        kind: the kind of event.
        occurrence: what tells this occurrence from the others of the same kind
            (a period's start date, a milestone id, a cap step, a change version).
    """
    encoded = json.dumps([engagement_key, str(kind), occurrence], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()[:32]


def billing_event(engagement: Engagement, kind: BillingEventKind, occurrence: str, at: datetime) -> BillingEvent:
    """A billing event of ``engagement`` with its key.

    Args:
        engagement: the engagement billed.
        kind: the kind of event.
        occurrence: see :func:`event_key`.
        at: when the reason to invoice arose (timezone-aware).
    """
    return BillingEvent(
        key=event_key(engagement.key, kind, occurrence),
        kind=kind,
        engagement_key=engagement.key,
        occurrence=occurrence,
        occurred_at=at,
    )


def issue_date_for(at: datetime, timezone: str) -> date:
    """The calendar date of ``at`` in the IANA zone ``timezone``.

    Raises:
        ValueError: ``at`` is naive (a naive datetime has no calendar date in a zone).
    """
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"issue_date_for needs a timezone-aware datetime, got {at!r}")
    return at.astimezone(ZoneInfo(timezone)).date()


# ---------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------


def deal_won_event(
    engagement: Engagement, *, billing_start: datetime, timezone: str | None = None
) -> BillingEvent | None:
    """The ``deal_won`` event of a one-time engagement that bills when won.

    Args:
        engagement: the engagement.
        billing_start: when syncd took over billing; a deal won before it was billed
            by other means and is not invoiced again.

    Returns:
        The event (occurrence ``"won"``, occurred at ``won_at``), or ``None`` when the
        engagement is not ``one_time``, bills on acceptance, is not won, or was won
        before ``billing_start``.
    """
    if engagement.type is not EngagementType.ONE_TIME or engagement.bill_on != "won":
        return None
    if engagement.won_at is None or not won_in_scope(engagement, billing_start, timezone):
        return None
    return billing_event(engagement, BillingEventKind.DEAL_WON, WON, engagement.won_recorded_at or engagement.won_at)


def in_scope(moment: datetime, billing_start: datetime, timezone: str | None = None) -> bool:
    """Whether a trigger at ``moment`` is at or after ``billing_start``.

    A trigger read from a date-only value sits at local midnight of the client's zone
    (``timezone``); it is in scope if any part of that local day is at or after
    ``billing_start`` (a milestone marked done "today" on go-live day counts).
    """
    if moment >= billing_start:
        return True
    if timezone is None:
        return False
    local = moment.astimezone(ZoneInfo(timezone))
    if (local.hour, local.minute, local.second, local.microsecond) != (0, 0, 0, 0):
        return False
    return start_of_day(local.date() + timedelta(days=1), timezone) > billing_start


def won_in_scope(engagement: Engagement, billing_start: datetime, timezone: str | None = None) -> bool:
    """Whether the deal was won at or after ``billing_start``.

    Gated on when the source recorded the move into the won stage
    (``won_recorded_at``), never on an editable close date: a deal won on go-live
    morning whose close date reads as local midnight is in scope. Without that history
    the mapped ``won_at`` is used.
    """
    if engagement.won_recorded_at is not None:
        return engagement.won_recorded_at >= billing_start
    return engagement.won_at is not None and in_scope(engagement.won_at, billing_start, timezone)


def accepted_event(
    engagement: Engagement, *, billing_start: datetime, timezone: str | None = None
) -> BillingEvent | None:
    """The ``deliverable_accepted`` event of a one-time engagement billed on acceptance.

    Returns:
        The event (occurrence ``"accepted"``, at ``accepted_at``), or ``None`` when the
        engagement is not ``one_time`` with ``bill_on="accepted"``, is not won or not
        accepted, or was accepted before ``billing_start``.
    """
    if engagement.type is not EngagementType.ONE_TIME or engagement.bill_on != "accepted":
        return None
    accepted = engagement.accepted_at
    if engagement.won_at is None or accepted is None or not in_scope(accepted, billing_start, timezone):
        return None
    return billing_event(engagement, BillingEventKind.DELIVERABLE_ACCEPTED, ACCEPTED, accepted)


def has_deposit(engagement: Engagement) -> bool:
    """Whether the engagement invoices a deposit when won (see the module docstring)."""
    if engagement.deposit_percent is None:
        return False
    accepted = engagement.type is EngagementType.ONE_TIME and engagement.bill_on == "accepted"
    return accepted or engagement.type is EngagementType.MILESTONE


def deposit_shares(engagement: Engagement) -> dict[str, Decimal]:
    """The deposit's shares, by the occurrence of the invoice that deducts each.

    ``{"accepted": share}`` for a ``one_time`` engagement, ``{milestone id: share}`` for a
    ``milestone`` one, empty without a deposit. Each share is rounded once (module
    docstring); the deposit is their sum.

    Raises:
        ValidationFailed: ``deposit_percent`` is not in (0, 100].
    """
    if not has_deposit(engagement) or engagement.deposit_percent is None:
        return {}
    percent = engagement.deposit_percent
    if not Decimal(0) < percent <= Decimal(100):
        raise ValidationFailed(
            f"deposit_percent {percent} is not in (0, 100]", place=f"engagement {engagement.key}: deposit_percent"
        )
    if engagement.type is EngagementType.ONE_TIME:
        total = sum((line.amount(engagement.currency) for line in engagement.lines), Decimal(0))
        return {ACCEPTED: _share(total, percent, engagement.currency)}
    return {
        milestone.id: _share(round_money(milestone.amount, engagement.currency), percent, engagement.currency)
        for milestone in engagement.milestones
    }


def _share(amount: Decimal, percent: Decimal, currency: str) -> Decimal:
    return round_money(amount * percent / 100, currency)


def deposit_event(
    engagement: Engagement, *, billing_start: datetime, timezone: str | None = None
) -> BillingEvent | None:
    """The ``deal_won`` event (occurrence ``"deposit"``) that invoices the deposit.

    Returns:
        The event, at ``won_at``, or ``None`` when the engagement has no deposit, is not
        won, was won before ``billing_start`` or its deposit is zero.

    Raises:
        ValidationFailed: see :func:`deposit_shares`.
    """
    if engagement.won_at is None or not won_in_scope(engagement, billing_start, timezone):
        return None
    if not sum(deposit_shares(engagement).values(), Decimal(0)):
        return None
    return billing_event(engagement, BillingEventKind.DEAL_WON, DEPOSIT, engagement.won_at)


def deposit_lines(engagement: Engagement) -> tuple[InvoiceLine, ...]:
    """The one line of the deposit invoice: the sum of the shares.

    Raises:
        ValidationFailed: see :func:`deposit_shares`.
    """
    deposit = sum(deposit_shares(engagement).values(), Decimal(0))
    return (
        InvoiceLine(
            description=f"{engagement.name}: deposit, {engagement.deposit_percent}%",
            quantity=Decimal(1),
            unit_price=deposit,
            kind="deposit",
        ),
    )


def deduction_lines(engagement: Engagement, occurrence: str) -> tuple[InvoiceLine, ...]:
    """The line deducting the deposit's share from the invoice of ``occurrence``, if any.

    Raises:
        ValidationFailed: see :func:`deposit_shares`.
    """
    share = deposit_shares(engagement).get(occurrence, Decimal(0))
    if not share:
        return ()
    return (
        InvoiceLine(
            description=f"{engagement.name}: less deposit, {engagement.deposit_percent}%",
            quantity=Decimal(1),
            unit_price=-share,
            kind="deduction",
        ),
    )


def milestone_events(
    engagement: Engagement, *, billing_start: datetime, timezone: str | None = None
) -> list[BillingEvent]:
    """One ``milestone_done`` event per milestone done at or after ``billing_start``.

    Only ``milestone`` engagements that are won have them; the occurrence is the
    milestone's id.
    """
    if engagement.type is not EngagementType.MILESTONE or engagement.won_at is None:
        return []
    return [
        billing_event(engagement, BillingEventKind.MILESTONE_DONE, milestone.id, milestone.done_at)
        for milestone in engagement.milestones
        if milestone.done_at is not None and in_scope(milestone.done_at, billing_start, timezone)
    ]


def period_events(
    engagement: Engagement, *, as_of: datetime, timezone: str, billing_start: datetime
) -> list[BillingEvent]:
    """The ``period_due`` events of a recurring engagement issued in ``[billing_start, as_of]``.

    A period is issued at :func:`syncd.core.periods.issued_at`. A retainer or subscription
    period has an event only when it bills a non-zero line under the terms known then (so
    nothing after a known cancellation); an hourly period always has one, and
    :func:`hours_draft` decides whether its hours make an invoice.

    Raises:
        ValidationFailed: the engagement lacks a cycle, start or amount.
    """
    if not is_recurring(engagement) or engagement.won_at is None:
        return []
    first = service_start(engagement)
    today = issue_date_for(as_of, timezone)
    until = max(today, first) if engagement.first_period_on_won else today
    events = []
    for period in periods_between(engagement, first, until):
        issued = issued_at(engagement, period, timezone)
        if issued is None or not billing_start <= issued <= as_of:
            continue
        if engagement.type is EngagementType.HOURLY or period_lines(engagement, period, timezone):
            events.append(billing_event(engagement, BillingEventKind.PERIOD_DUE, period.occurrence, issued))
    return events


def settlement_events(
    engagement: Engagement, *, as_of: datetime, timezone: str, billing_start: datetime, credit_notes: bool = True
) -> list[BillingEvent]:
    """The ``engagement_changed`` events recorded in ``[billing_start, as_of]``.

    Args:
        engagement: a retainer or subscription.
        as_of: now, as the caller sees it.
        timezone: the client's IANA zone.
        billing_start: facts recorded before it were settled by other means.
        credit_notes: whether the invoicing tool has credit notes; without them,
            credits are left out (see :func:`manual_credits`).
    """
    return [
        _settlement_event(engagement, settlement)
        for settlement in _settlements(engagement, as_of=as_of, timezone=timezone, billing_start=billing_start)
        if credit_notes or settlement.direction == "invoice"
    ]


def _settlements(
    engagement: Engagement, *, as_of: datetime, timezone: str, billing_start: datetime
) -> list[Settlement]:
    if engagement.type not in (EngagementType.RETAINER, EngagementType.SUBSCRIPTION) or engagement.won_at is None:
        return []
    return [item for item in settlements(engagement, timezone) if billing_start <= item.fact.recorded_at <= as_of]


def _settlement_event(engagement: Engagement, settlement: Settlement) -> BillingEvent:
    fact = settlement.fact
    return billing_event(engagement, BillingEventKind.ENGAGEMENT_CHANGED, fact.occurrence, fact.recorded_at)


def due_events(
    engagement: Engagement,
    *,
    as_of: datetime,
    timezone: str,
    billing_start: datetime,
    billed: Collection[str] = frozenset(),
    credit_notes: bool = True,
) -> list[BillingEvent]:
    """Every billing event of the engagement due by ``as_of`` whose key is not in ``billed``.

    This covers ``deal_won`` (with deposits), ``deliverable_accepted``, ``milestone_done``,
    ``period_due`` and ``engagement_changed`` (``hours_cap_reached`` needs time entries:
    see :func:`cap_events`). The result depends only on the arguments: the union over
    many runs with growing ``as_of`` (each adding its keys to ``billed``) equals one run
    at the last ``as_of``, with no gaps and no repeats.

    Args:
        engagement: the engagement, with every fact recorded up to ``as_of``.
        as_of: now, as the caller sees it (aware).
        timezone: the client's IANA zone.
        billing_start: when syncd took over billing; earlier reasons are not invoiced.
        billed: keys of the events already handled.
        credit_notes: whether the invoicing tool has credit notes (see
            :func:`settlement_events`).

    Returns:
        The events in the order they arose.

    Raises:
        ValidationFailed: a recurring engagement lacks a cycle, start or amount, or a
            deposit's percentage is out of range.
    """
    single = (
        deal_won_event(engagement, billing_start=billing_start, timezone=timezone),
        deposit_event(engagement, billing_start=billing_start, timezone=timezone),
        accepted_event(engagement, billing_start=billing_start, timezone=timezone),
    )
    events = [event for event in single if event is not None]
    events += milestone_events(engagement, billing_start=billing_start, timezone=timezone)
    events += period_events(engagement, as_of=as_of, timezone=timezone, billing_start=billing_start)
    events += settlement_events(
        engagement, as_of=as_of, timezone=timezone, billing_start=billing_start, credit_notes=credit_notes
    )
    due = [event for event in events if event.occurred_at <= as_of and event.key not in billed]
    return sorted(due, key=lambda event: (event.occurred_at, event.kind, event.occurrence))


# ---------------------------------------------------------------------------
# Drafts
# ---------------------------------------------------------------------------


def draft_for_event(
    event: BillingEvent,
    engagement: Engagement,
    client: Client,
    *,
    issue_date: date,
    status: Literal["draft", "authorised"] = "authorised",
    send: bool = False,
    line_amount_types: Literal["Exclusive", "Inclusive", "NoTax"] = "Exclusive",
) -> InvoiceDraft:
    """The invoice (or credit-note) draft for ``event``.

    Lines by kind: ``deal_won`` and ``deliverable_accepted`` bill the engagement's lines
    (a ``"deposit"`` occurrence the deposit); ``milestone_done`` the milestone's amount
    (both less the deposit's share, if any); ``period_due`` the period's served days,
    prorated (:mod:`syncd.core.proration`); ``engagement_changed`` the settlement of the
    periods issued before the change, as a credit note when it lowers the bill. The due
    date is ``issue_date`` plus the client's payment terms; the reference is the
    engagement's PO number, else the client's; the currency is the engagement's.

    Args:
        event: the billing event; its key becomes the draft's key.
        engagement: the engagement the event belongs to.
        client: the client billed; its time zone is the one periods are computed in.
        issue_date: the issue date, in the client's time zone (see :func:`issue_date_for`).
        status: create the invoice as a draft, or approved.
        send: email it to the billing contact after creating.
        line_amount_types: whether unit prices include tax.

    Raises:
        ValidationFailed: the draft cannot be valid (the message names the field), or
            the event is an hourly one (use :func:`hours_draft`).
    """
    kind, lines = _contents(event, engagement, client.timezone)
    return assemble_draft(
        event,
        engagement,
        client,
        lines,
        kind=kind,
        options=DraftOptions(issue_date=issue_date, status=status, send=send, line_amount_types=line_amount_types),
    )


@dataclass(frozen=True, kw_only=True)
class DraftOptions:
    """How a draft is created at the invoicing tool (see :func:`draft_for_event`)."""

    issue_date: date
    status: Literal["draft", "authorised"] = "authorised"
    send: bool = False
    line_amount_types: Literal["Exclusive", "Inclusive", "NoTax"] = "Exclusive"


def assemble_draft(
    event: BillingEvent,
    engagement: Engagement,
    client: Client,
    lines: Sequence[InvoiceLine],
    *,
    kind: DraftKind = DraftKind.INVOICE,
    options: DraftOptions,
) -> InvoiceDraft:
    """A checked draft of ``lines`` for ``event``, with due date, reference and currency.

    Raises:
        ValidationFailed: see :func:`check_draft`.
    """
    draft = InvoiceDraft(
        key=event.key,
        kind=kind,
        client=client,
        engagement_key=engagement.key,
        engagement_type=engagement.type,
        currency=engagement.currency,
        issue_date=options.issue_date,
        due_date=options.issue_date + timedelta(days=client.payment_terms_days),
        reference=engagement.po_number or client.po_number,
        lines=tuple(_tracked(line, engagement) for line in lines),
        line_amount_types=options.line_amount_types,
        status=options.status,
        send=options.send,
    )
    check_draft(draft, event=event, engagement=engagement)
    return draft


def _tracked(line: InvoiceLine, engagement: Engagement) -> InvoiceLine:
    """``line`` with the engagement's tracking options when it has none of its own."""
    if line.tracking or not engagement.tracking:
        return line
    return line.model_copy(update={"tracking": engagement.tracking})


def _contents(event: BillingEvent, engagement: Engagement, timezone: str) -> tuple[DraftKind, tuple[InvoiceLine, ...]]:
    place = f"engagement {engagement.key}: event {event.kind}:{event.occurrence}"
    if event.kind is BillingEventKind.DEAL_WON and event.occurrence == DEPOSIT:
        return DraftKind.INVOICE, deposit_lines(engagement)
    if event.kind in (BillingEventKind.DEAL_WON, BillingEventKind.DELIVERABLE_ACCEPTED):
        return DraftKind.INVOICE, (*engagement.lines, *deduction_lines(engagement, event.occurrence))
    if event.kind is BillingEventKind.MILESTONE_DONE:
        milestone = _milestone_line(engagement, event.occurrence)
        return DraftKind.INVOICE, (milestone, *deduction_lines(engagement, event.occurrence))
    if engagement.type is EngagementType.HOURLY or event.kind is BillingEventKind.HOURS_CAP_REACHED:
        raise ValidationFailed("hourly events bill time entries: draft them with hours_draft", place=place)
    if event.kind is BillingEventKind.PERIOD_DUE:
        return DraftKind.INVOICE, period_lines(engagement, period_at(engagement, event.occurrence), timezone)
    settlement = _settlement_for(engagement, event.occurrence, timezone, place)
    return (DraftKind.CREDIT_NOTE if settlement.direction == "credit" else DraftKind.INVOICE), settlement.lines


def _milestone_line(engagement: Engagement, milestone_id: str) -> InvoiceLine:
    for milestone in engagement.milestones:
        if milestone.id == milestone_id:
            return InvoiceLine(
                description=milestone.name, quantity=Decimal(1), unit_price=milestone.amount, kind="milestone"
            )
    raise ValidationFailed(
        f"no milestone with id {milestone_id!r}", place=f"engagement {engagement.key}: milestones[{milestone_id}]"
    )


def period_lines(engagement: Engagement, period: Period, timezone: str) -> tuple[InvoiceLine, ...]:
    """The lines of a retainer or subscription period: served days by amount, prorated.

    Raises:
        ValidationFailed: the deal is not won, or see :func:`syncd.core.proration.terms_from`.
    """
    issued = issued_at(engagement, period, timezone)
    if issued is None:
        raise ValidationFailed("the deal is not won", place=f"engagement {engagement.key}: won_at")
    spans = billed_spans(period, terms_at(engagement, issued, timezone))
    lines = (span_line(span, period, name=engagement.name, currency=engagement.currency) for span in spans)
    return tuple(line for line in lines if line.unit_price)


def _settlement_for(engagement: Engagement, occurrence: str, timezone: str, place: str) -> Settlement:
    for settlement in settlements(engagement, timezone):
        if settlement.fact.occurrence == occurrence:
            return settlement
    raise ValidationFailed("the engagement has no change to settle for this occurrence", place=place)


def check_draft(draft: InvoiceDraft, *, event: BillingEvent, engagement: Engagement) -> None:
    """Pre-flight checks of a draft, before any effect of it starts.

    Raises:
        ValidationFailed: naming the first field that makes the draft invalid: the
            event or client does not belong to the engagement, the client's currency
            differs, payment terms are negative, there are no lines, a line has no
            description or a negative quantity, or the total is negative.
    """
    place = f"engagement {engagement.key}"
    if event.engagement_key != engagement.key:
        raise ValidationFailed(f"event belongs to engagement {event.engagement_key!r}", place=f"{place}: event.key")
    if engagement.client_key != draft.client.key:
        raise ValidationFailed(
            f"engagement bills client {engagement.client_key!r}, not {draft.client.key!r}", place=f"{place}: client_key"
        )
    if draft.client.currency != draft.currency:
        raise ValidationFailed(
            f"currency {draft.currency} differs from client {draft.client.key}'s currency {draft.client.currency}",
            place=f"{place}: currency",
        )
    if draft.client.payment_terms_days < 0:
        raise ValidationFailed("payment terms are negative", place=f"client {draft.client.key}: payment_terms_days")
    _check_lines(draft, place)


def _check_lines(draft: InvoiceDraft, place: str) -> None:
    if not draft.lines:
        raise ValidationFailed("the draft has no lines; nothing to invoice", place=f"{place}: lines")
    for index, line in enumerate(draft.lines):
        where = f"{place}: lines[{index}]"
        if not line.description.strip():
            raise ValidationFailed("the line has no description", place=f"{where}.description")
        if line.quantity < 0:
            raise ValidationFailed(f"quantity {line.quantity} is negative", place=f"{where}.quantity")
    if draft.subtotal() < 0:
        raise ValidationFailed(
            f"the total {draft.subtotal()} is negative; a credit is a credit note", place=f"{place}: lines"
        )


# ---------------------------------------------------------------------------
# Ledger codes
# ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class CodeRule:
    """Where one kind of ledger code (an account code, or a tax type) comes from.

    Attributes:
        default: the code when nothing more specific gives one.
        by_line_kind: by :data:`~syncd.core.interfaces.LineKind`.
        by_engagement_type: by :class:`~syncd.core.interfaces.EngagementType` value.
    """

    default: str | None = None
    by_line_kind: Mapping[str, str] = field(default_factory=dict)
    by_engagement_type: Mapping[str, str] = field(default_factory=dict)

    def pick(self, line: InvoiceLine, engagement_type: EngagementType | None) -> str | None:
        """The code for ``line`` by its kind, else the engagement type, else the default."""
        by_type = self.by_engagement_type.get(str(engagement_type)) if engagement_type is not None else None
        return self.by_line_kind.get(line.kind) or by_type or self.default


@dataclass(frozen=True, kw_only=True)
class LedgerRules:
    """How the lines of a pipeline's drafts get their account code and tax type.

    Attributes:
        accounts: account codes (``[accounts]`` in a mapping file).
        tax_types: tax types (``[tax_types]``).
        client_places: ``file:line [client].key`` of the mapping keys that give a
            client's own ``account_code`` and ``tax_type``, to name them when a code
            read from the CRM is unknown to the ledger.
    """

    accounts: CodeRule = field(default_factory=CodeRule)
    tax_types: CodeRule = field(default_factory=CodeRule)
    client_places: Mapping[str, str] = field(default_factory=dict)


KNOWN_CODES = "ledger_codes"
"""Key in :attr:`Runtime.extra <syncd.engine.runtime.Runtime.extra>` holding, by invoicing connection, the
codes the last drift check read (:mod:`syncd.engine.drift`)."""


def known_codes(extra: Mapping[str, object], connection: str) -> Mapping[str, frozenset[str]] | None:
    """The codes the last drift check read from ``connection`` (``None`` before any check)."""
    found = extra.get(KNOWN_CODES)
    codes = found.get(connection) if isinstance(found, Mapping) else None
    return codes if isinstance(codes, Mapping) else None


def with_ledger_codes(
    draft: InvoiceDraft, rules: LedgerRules, *, known: Mapping[str, frozenset[str]] | None = None
) -> InvoiceDraft:
    """``draft`` with every line's account code and tax type resolved, most specific first.

    For each line: its own code (mapped from the CRM line item: product or SKU), else
    the client's (``Client.account_code`` / ``tax_type``), else by the line's kind, else
    by the engagement type, else the default. A tax type that resolves to nothing stays
    ``None``, so the account's default tax rate applies at the tool.

    Args:
        draft: the draft as billed.
        rules: the pipeline's ledger rules.
        known: the ledger's codes in use by kind (``account_code``, ``tax_type``), when
            known; a client's own code missing from them fails the record here, naming
            the mapping key that read it, instead of failing at the tool.

    Raises:
        MappingError: the client's own code is not in ``known``.
    """
    client = draft.client
    _check_client_code(client.account_code, "account_code", client, rules, known)
    _check_client_code(client.tax_type, "tax_type", client, rules, known)
    lines = tuple(_coded(line, draft, rules) for line in draft.lines)
    return draft if lines == draft.lines else draft.model_copy(update={"lines": lines})


def _coded(line: InvoiceLine, draft: InvoiceDraft, rules: LedgerRules) -> InvoiceLine:
    kind = draft.engagement_type
    account = line.account_code or draft.client.account_code or rules.accounts.pick(line, kind)
    tax = line.tax_type or draft.client.tax_type or rules.tax_types.pick(line, kind)
    if account == line.account_code and tax == line.tax_type:
        return line
    return line.model_copy(update={"account_code": account, "tax_type": tax})


def _check_client_code(
    code: str | None,
    name: str,
    client: Client,
    rules: LedgerRules,
    known: Mapping[str, frozenset[str]] | None,
) -> None:
    codes = known.get(name) if known is not None else None
    if code is None or codes is None or code in codes:
        return
    word = name.replace("_", " ")
    raise MappingError(
        f"client {client.key}: {word} {code!r} read from the CRM is not in use at the invoicing tool; "
        f"it has: {', '.join(sorted(codes)[:20]) or 'none'}. Fix the value on the record (or the mapping key), "
        "then replay",
        place=rules.client_places.get(name, f"client {client.key}: {name}"),
    )


# ---------------------------------------------------------------------------
# Credits for tools without credit notes
# ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ManualCredit:
    """A credit owed to a client that the invoicing tool cannot issue as a credit note.

    The engine surfaces it to a person (and remembers ``event.key`` as handled).

    Attributes:
        event: the ``engagement_changed`` event that owes the credit.
        client_key: the client owed.
        currency: ISO 4217 code.
        lines: what is credited, amounts positive.
    """

    event: BillingEvent
    client_key: str
    currency: str
    lines: tuple[InvoiceLine, ...]

    def total(self) -> Decimal:
        """The amount owed: the sum of the rounded lines."""
        return sum((line.amount(self.currency) for line in self.lines), Decimal(0))

    def message(self) -> str:
        """What a person must do, in one line."""
        return (
            f"engagement {self.event.engagement_key}: credit {self.total()} {self.currency} to client "
            f"{self.client_key} ({self.event.occurrence}); the invoicing tool has no credit notes, issue it by hand"
        )


def manual_credits(
    engagement: Engagement,
    *,
    as_of: datetime,
    timezone: str,
    billing_start: datetime,
    handled: Collection[str] = frozenset(),
) -> list[ManualCredit]:
    """The credits owed by ``as_of`` that :func:`due_events` leaves out with ``credit_notes=False``.

    Args:
        engagement: the engagement.
        as_of: now, as the caller sees it.
        timezone: the client's IANA zone.
        billing_start: when syncd took over billing.
        handled: keys of credits already surfaced.
    """
    credits = []
    for settlement in _settlements(engagement, as_of=as_of, timezone=timezone, billing_start=billing_start):
        event = _settlement_event(engagement, settlement)
        if settlement.direction == "credit" and event.key not in handled:
            credits.append(
                ManualCredit(
                    event=event, client_key=engagement.client_key, currency=engagement.currency, lines=settlement.lines
                )
            )
    return credits


# ---------------------------------------------------------------------------
# Hours
# ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RateCard:
    """Hourly rates beside the engagement's, and the order they are looked up in.

    Attributes:
        projects: rate by the tracker's project id (``TimeEntry.project_id``).
        tasks: rate by task name (``TimeEntry.task``).
        people: rate by person name (``TimeEntry.person``).
        precedence: where to look, first match wins; ``entry`` is the rate the tracker
            holds for the entry (``TimeEntry.billable_rate``).
    """

    projects: Mapping[str, Decimal] = field(default_factory=dict)
    tasks: Mapping[str, Decimal] = field(default_factory=dict)
    people: Mapping[str, Decimal] = field(default_factory=dict)
    precedence: tuple[RateSource, ...] = ("engagement", "project", "task", "person", "entry")


def rate_for(entry: TimeEntry, engagement: Engagement, rates: RateCard) -> Decimal:
    """The hourly rate of ``entry``: the first of ``rates.precedence`` that has one.

    Raises:
        ValidationFailed: no source has a rate for the entry.
    """
    lookups: dict[RateSource, Callable[[], Decimal | None]] = {
        "engagement": lambda: engagement.rate_on(entry.spent_date),
        "project": lambda: rates.projects.get(entry.project_id),
        "task": lambda: rates.tasks.get(entry.task) if entry.task is not None else None,
        "person": lambda: rates.people.get(entry.person) if entry.person is not None else None,
        "entry": lambda: entry.billable_rate,
    }
    for source in rates.precedence:
        rate = lookups[source]()
        if rate is not None:
            return rate
    raise ValidationFailed(
        f"no hourly rate for the entry (looked in {', '.join(rates.precedence)})",
        place=f"engagement {engagement.key}: time entry {entry.id}.rate",
    )


def cap_step_hours(engagement: Engagement, index: int) -> Decimal | None:
    """The logged hours at which cap step ``index`` (1, 2, ...) is reached, if it exists.

    Every ``cap_step_percent`` of ``cap_hours`` is a step, the last one at the cap
    itself; with ``over_cap="bill"`` the steps go on past the cap at the same interval.
    Engagements that are not hourly or have no cap have no steps.
    """
    if engagement.type is not EngagementType.HOURLY or not engagement.cap_hours or engagement.cap_step_percent <= 0:
        return None
    cap, percent = engagement.cap_hours, engagement.cap_step_percent
    count = int((Decimal(100) / percent).to_integral_value(rounding=ROUND_CEILING))
    if 1 <= index <= count:
        return min(cap * percent * index / 100, cap)
    if index > count and engagement.over_cap == "bill":
        return cap + cap * percent * (index - count) / 100
    return None


def cap_events(
    engagement: Engagement,
    entries: Iterable[TimeEntry],
    *,
    billing_start: datetime,
    billed: Collection[str] = frozenset(),
) -> list[BillingEvent]:
    """The ``hours_cap_reached`` event for the highest cap step newly reached, if any.

    Billable hours are summed in (``spent_date``, ``id``) order; a step is reached when
    the sum reaches its hours (:func:`cap_step_hours`). Steps reached together are one
    event, for the highest step (its index is the occurrence): an earlier step's invoice
    would have nothing left to bill. Nothing is due when the highest step reached has
    its key in ``billed``. The event occurs at the ``updated_at`` of the entry that
    reached the step.

    Args:
        engagement: an hourly engagement with ``cap_hours``.
        entries: its time entries (all of them, invoiced or not).
        billing_start: steps reached before it are not invoiced.
        billed: keys of the events already handled.
    """
    if engagement.won_at is None:
        return []
    reached = _steps_reached(engagement, entries)
    keys = [
        event_key(engagement.key, BillingEventKind.HOURS_CAP_REACHED, str(index))
        for index in range(1, len(reached) + 1)
    ]
    if not reached or keys[-1] in billed or reached[-1] < billing_start:
        return []
    return [billing_event(engagement, BillingEventKind.HOURS_CAP_REACHED, str(len(reached)), reached[-1])]


def _steps_reached(engagement: Engagement, entries: Iterable[TimeEntry]) -> list[datetime]:
    """For each step reached, in order, the ``updated_at`` of the entry that reached it."""
    total, reached = Decimal(0), list[datetime]()
    for entry in sorted(_billable(entries), key=lambda item: (item.spent_date, item.id)):
        total += entry.hours
        step = cap_step_hours(engagement, len(reached) + 1)
        while step is not None and total >= step:
            reached.append(entry.updated_at)
            step = cap_step_hours(engagement, len(reached) + 1)
    return reached


def split_entries(
    entries: Iterable[TimeEntry], *, billed: Mapping[str, Decimal], released: Collection[str] = ()
) -> list[TimeEntry]:
    """Entries as billing sees them once some were billed only up to a cap.

    An entry with fewer hours in ``billed`` than it has becomes two: the part billed
    (its own id) and the rest (id + :data:`~syncd.core.interfaces.OVER_CAP_SUFFIX`), held
    until the cap is raised or it is ``released``. The daemon (from the store) and
    ``syncd simulate`` (from its own run) both go through here.
    """
    found: list[TimeEntry] = []
    for entry in entries:
        let_go = entry.id in released
        part = billed.get(entry.id)
        if part is None or part >= entry.hours:
            found.append(entry.model_copy(update={"released": True}) if let_go else entry)
            continue
        rest = {"id": entry.id + OVER_CAP_SUFFIX, "hours": entry.hours - part, "released": let_go}
        found += [entry.model_copy(update={"hours": part}), entry.model_copy(update=rest)]
    return found


def _billable(entries: Iterable[TimeEntry]) -> list[TimeEntry]:
    return [entry for entry in entries if entry.billable and entry.hours > 0]


@dataclass(frozen=True, kw_only=True)
class HoursDraft:
    """An hours invoice and the time entries it bills.

    Attributes:
        draft: the invoice draft.
        entry_ids: the ids of the entries it bills; pass them as ``invoiced`` later.
        split: entry id -> the hours billed, for an entry billed only up to the cap
            (the rest is held, see :func:`held_over_cap`).
        held: ids of the billable entries held back by the cap.
    """

    draft: InvoiceDraft
    entry_ids: frozenset[str]
    split: Mapping[str, Decimal] = field(default_factory=dict)
    held: frozenset[str] = frozenset()


def hours_draft(
    event: BillingEvent,
    engagement: Engagement,
    client: Client,
    entries: Iterable[TimeEntry],
    *,
    invoiced: Collection[str],
    options: DraftOptions,
    rates: RateCard | None = None,
) -> HoursDraft | None:
    """The invoice of an hourly ``period_due`` or ``hours_cap_reached`` event.

    It bills the billable entries not invoiced yet (neither in ``invoiced`` nor marked
    invoiced at the tracker): for a period, those spent up to the period's last day
    (late entries of earlier periods included); for a cap step, all of them. With a cap
    and ``over_cap="hold"``, entries that would take the invoiced hours past the cap are
    held back.

    Args:
        event: the event (its engagement must be hourly).
        engagement: the engagement.
        client: the client billed.
        entries: the engagement's time entries.
        invoiced: ids of entries already invoiced.
        options: issue date, status, sending and tax mode.
        rates: where rates come from (default: the engagement's rate only, then the
            entry's).

    Returns:
        The draft and the entry ids it bills, or ``None`` when there is nothing to bill.

    Raises:
        ValidationFailed: the event is not an hourly one, or an entry has no rate.
    """
    place = f"engagement {engagement.key}: event {event.kind}:{event.occurrence}"
    if engagement.type is not EngagementType.HOURLY:
        raise ValidationFailed("only hourly engagements bill time entries", place=f"{place}.type")
    until = _hours_until(event, engagement, place)
    entries = list(entries)
    chosen = _entries_to_bill(engagement, entries, invoiced, until)
    if not chosen:
        return None
    lines = hours_lines(engagement, chosen, rates or RateCard())
    draft = assemble_draft(event, engagement, client, lines, options=options)
    full = {entry.id: entry.hours for entry in entries}
    return HoursDraft(
        draft=draft,
        entry_ids=frozenset(entry.id for entry in chosen),
        split={entry.id: entry.hours for entry in chosen if entry.hours < full[entry.id]},
        held=frozenset(entry.id for entry in held_over_cap(engagement, entries, invoiced, until, chosen)),
    )


def held_over_cap(
    engagement: Engagement,
    entries: Iterable[TimeEntry],
    invoiced: Collection[str],
    until: date | None = None,
    chosen: Iterable[TimeEntry] | None = None,
) -> list[TimeEntry]:
    """The billable entries not invoiced that the cap holds back (``over_cap="hold"``).

    The part of an entry over the cap is held as its own entry once the part under the
    cap is invoiced (id + :data:`~syncd.core.interfaces.OVER_CAP_SUFFIX`); before that the
    whole entry is listed.
    """
    entries = list(entries)
    if engagement.cap_hours is None or engagement.over_cap == "bill":
        return []
    billed = chosen if chosen is not None else _entries_to_bill(engagement, entries, invoiced, until)
    taken = {entry.id: entry.hours for entry in billed}
    pending = [
        entry
        for entry in _billable(entries)
        if not entry.invoiced and entry.id not in invoiced and (until is None or entry.spent_date <= until)
    ]
    return [entry for entry in pending if taken.get(entry.id, Decimal(0)) < entry.hours]


def _hours_until(event: BillingEvent, engagement: Engagement, place: str) -> date | None:
    if event.kind is BillingEventKind.PERIOD_DUE:
        return period_at(engagement, event.occurrence).end
    if event.kind is BillingEventKind.HOURS_CAP_REACHED:
        return None
    raise ValidationFailed("this event does not bill hours", place=f"{place}.kind")


def _entries_to_bill(
    engagement: Engagement, entries: Iterable[TimeEntry], invoiced: Collection[str], until: date | None
) -> list[TimeEntry]:
    billable = sorted(_billable(entries), key=lambda entry: (entry.spent_date, entry.id))
    done = [entry for entry in billable if entry.invoiced or entry.id in invoiced]
    done_ids = {entry.id for entry in done}
    pending = [entry for entry in billable if entry.id not in done_ids and (until is None or entry.spent_date <= until)]
    if engagement.cap_hours is None or engagement.over_cap == "bill":
        return pending
    room = engagement.cap_hours - sum((entry.hours for entry in done), Decimal(0))
    chosen = [entry for entry in pending if entry.released]
    for entry in pending:
        if entry.released:
            continue
        if entry.hours > room:
            if room > 0 and not entry.id.endswith(OVER_CAP_SUFFIX):  # bill the part under the cap; hold the rest
                chosen.append(entry.model_copy(update={"hours": room}))
            break
        chosen.append(entry)
        room -= entry.hours
    return sorted(chosen, key=lambda entry: (entry.spent_date, entry.id))


def hours_lines(engagement: Engagement, entries: Iterable[TimeEntry], rates: RateCard) -> list[InvoiceLine]:
    """Entries grouped by ``group_hours_by`` and rate: one line per group, hours × rate.

    Raises:
        ValidationFailed: an entry has no rate (see :func:`rate_for`).
    """
    groups: dict[tuple[str, Decimal], list[TimeEntry]] = {}
    for entry in entries:
        groups.setdefault((_group_label(engagement, entry), rate_for(entry, engagement, rates)), []).append(entry)
    return [_hours_line(engagement, label, rate, items) for (label, rate), items in sorted(groups.items())]


def _group_label(engagement: Engagement, entry: TimeEntry) -> str:
    if engagement.group_hours_by == "person":
        return entry.person or "(no person)"
    if engagement.group_hours_by == "project":
        return entry.project_id
    return entry.task or "(no task)"


def _hours_line(engagement: Engagement, label: str, rate: Decimal, entries: Sequence[TimeEntry]) -> InvoiceLine:
    first = min(entry.spent_date for entry in entries)
    last = max(entry.spent_date for entry in entries)
    hours = sum((entry.hours for entry in entries), Decimal(0))
    return InvoiceLine(
        description=f"{engagement.name}: {label}, {first.isoformat()} – {last.isoformat()}",
        quantity=hours,
        unit_price=rate,
        kind="hours",
    )
