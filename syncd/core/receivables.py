"""What a client owes: days overdue and the standing of a deal across all its documents.

Pure functions, no I/O and no clock (``today`` is a parameter). The engine writes
:func:`deal_status` onto the CRM deal; company-level figures build on the same
:class:`Document` and :func:`days_overdue`.

**Days overdue** are whole days in the client's time zone from the due date: an
invoice due on the 3rd is 1 day overdue from 00:00 on the 4th in that zone
(:func:`today_in` gives that day), and 0 while nothing is due.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

from syncd.core.interfaces import DealBillingStatus, InvoiceState

OPEN_STATES = frozenset({InvoiceState.AUTHORISED, InvoiceState.SENT, InvoiceState.PARTIALLY_PAID})
"""Approved documents that may still be owed."""

# Overall state of a deal, most urgent first ("paid" only when nothing else applies).
_PRECEDENCE = ("overdue", "partially_paid", "sent", "authorised", "draft", "paid")


@dataclass(frozen=True, kw_only=True)
class Document:
    """One invoice or credit note of a deal, as the ledger last reported it.

    Attributes:
        kind: ``invoice`` or ``credit_note``.
        number: the ledger's number.
        state: its :class:`~syncd.core.interfaces.InvoiceState` value.
        currency: ISO 4217 code.
        total: its total.
        amount_due: for an invoice, what is still owed (the ledger's figure, which
            already reflects payments and allocated credits); for a credit note, the
            credit not yet allocated to an invoice.
        due_date: when an invoice is due.
    """

    kind: str
    number: str | None
    state: str
    currency: str
    total: Decimal
    amount_due: Decimal
    due_date: date | None


def today_in(now: datetime, timezone: str) -> date:
    """The calendar day of ``now`` in the IANA zone ``timezone``."""
    return now.astimezone(ZoneInfo(timezone)).date()


def days_overdue(due_date: date | None, amount_due: Decimal, today: date) -> int:
    """Whole days past ``due_date`` on ``today`` (the client's local day); 0 if nothing is owed."""
    if due_date is None or amount_due <= 0:
        return 0
    return max(0, (today - due_date).days)


def document_state(document: Document, today: date) -> str:
    """The document's state, with ``overdue`` for an open invoice past its due date."""
    if (
        document.kind == "invoice"
        and document.state in OPEN_STATES
        and days_overdue(document.due_date, document.amount_due, today) > 0
    ):
        return "overdue"
    return document.state


def deal_status(documents: Iterable[Document], today: date) -> DealBillingStatus | None:
    """The standing of a deal across its invoices and credit notes, or ``None`` if it has none.

    Voided documents are ignored (a deal whose documents are all voided is ``voided``). The amount due is the sum of the approved invoices'
    amounts due less the unallocated credit of approved credit notes (never below 0);
    figures are in the currency of the deal's first invoice (documents in another
    currency are not converted and are left out of the sums).
    """
    documents = list(documents)
    kept = [doc for doc in documents if doc.state != InvoiceState.VOIDED]
    if not kept:
        if not documents:
            return None
        return DealBillingStatus(
            invoice_number=None, state=InvoiceState.VOIDED, amount_due=Decimal(0), currency=documents[0].currency
        )
    invoices = [doc for doc in kept if doc.kind == "invoice"]
    currency = (invoices or kept)[0].currency
    same = [doc for doc in kept if doc.currency == currency]
    approved = [doc for doc in same if doc.kind == "invoice" and doc.state != InvoiceState.DRAFT]
    credits = [doc for doc in same if doc.kind != "invoice" and doc.state != InvoiceState.DRAFT]
    owed = sum((doc.amount_due for doc in approved), Decimal(0))
    unallocated = sum((doc.amount_due for doc in credits), Decimal(0))
    open_invoices = [doc for doc in approved if doc.state in OPEN_STATES and doc.amount_due > 0]
    due_dates = [doc.due_date for doc in open_invoices if doc.due_date is not None]
    states = {document_state(doc, today) for doc in (invoices or kept)}
    return DealBillingStatus(
        invoice_number=", ".join(doc.number for doc in invoices if doc.number) or None,
        state=next(state for state in _PRECEDENCE if state in states or state == "paid"),
        amount_due=max(Decimal(0), owed - unallocated),
        currency=currency,
        due_date=min(due_dates) if due_dates else None,
        days_overdue=max((days_overdue(doc.due_date, doc.amount_due, today) for doc in open_invoices), default=0),
        total_invoiced=sum((doc.total for doc in approved), Decimal(0)),
    )
