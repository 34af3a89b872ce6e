"""Billing rules: from canonical models to billing events and invoice drafts. Pure.

Nothing here does I/O or reads a clock: the time a rule needs is a parameter
(DESIGN §3.3). The engine maps a source record to an :class:`~syncd.interfaces.Engagement`
and a :class:`~syncd.interfaces.Client`, asks the rules which billing events are due,
and turns each event into an :class:`~syncd.interfaces.InvoiceDraft`.

Every billing event has a key, :func:`event_key`, derived from the engagement, the kind
and the occurrence (what tells one occurrence of the kind from another) and never from
wall-clock time, so computing the same event twice yields the same key and the invoicing
tool creates at most one invoice for it.

Occurrences by kind:

=====================  ==============================================================
kind                   occurrence
=====================  ==============================================================
deal_won               ``"won"``: a deal is won once; a reopen-and-rewin is no second
                       invoice
deliverable_accepted   ``"accepted"``
=====================  ==============================================================
"""

from __future__ import annotations

import hashlib
import json
from datetime import date, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

from syncd.errors import ValidationFailed
from syncd.interfaces import (
    BillingEvent,
    BillingEventKind,
    Client,
    Engagement,
    EngagementType,
    InvoiceDraft,
    InvoiceLine,
)

WON = "won"
"""Occurrence of the one ``deal_won`` event of an engagement."""


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


def deal_won_event(engagement: Engagement, *, billing_start: datetime) -> BillingEvent | None:
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
    if engagement.won_at is None or engagement.won_at < billing_start:
        return None
    return billing_event(engagement, BillingEventKind.DEAL_WON, WON, engagement.won_at)


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
    """The invoice draft for ``event``.

    The draft bills the engagement's own lines for ``deal_won``. Its due date is
    ``issue_date`` plus the client's payment terms; its reference is the engagement's PO
    number, else the client's; its currency is the engagement's.

    Args:
        event: the billing event; its key becomes the draft's key.
        engagement: the engagement the event belongs to.
        client: the client billed.
        issue_date: the issue date, in the client's time zone (see :func:`issue_date_for`).
        status: create the invoice as a draft, or approved.
        send: email it to the billing contact after creating.
        line_amount_types: whether unit prices include tax.

    Raises:
        ValidationFailed: the draft cannot be valid; the message names the field.
    """
    draft = InvoiceDraft(
        key=event.key,
        client=client,
        engagement_key=engagement.key,
        currency=engagement.currency,
        issue_date=issue_date,
        due_date=issue_date + timedelta(days=client.payment_terms_days),
        reference=engagement.po_number or client.po_number,
        lines=_lines_for(event, engagement),
        line_amount_types=line_amount_types,
        status=status,
        send=send,
    )
    check_draft(draft, event=event, engagement=engagement)
    return draft


def _lines_for(event: BillingEvent, engagement: Engagement) -> tuple[InvoiceLine, ...]:
    if event.kind in (BillingEventKind.DEAL_WON, BillingEventKind.DELIVERABLE_ACCEPTED):
        return engagement.lines
    raise ValidationFailed(
        f"no rule builds the lines of a {event.kind} event from the engagement alone",
        place=f"engagement {engagement.key}: event {event.key}.kind",
    )


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
