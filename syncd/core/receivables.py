"""What a client owes: days overdue, the standing of a deal, and the receivables of a company.

Pure functions, no I/O and no clock (``today`` is a parameter). The engine writes
:func:`deal_status` onto the CRM deal and :func:`company_status` onto the CRM company
(:mod:`syncd.engine.collection`), both from the same :class:`Document` and :func:`days_overdue`.

**Days overdue** are whole days in the client's time zone from the due date: an
invoice due on the 3rd is 1 day overdue from 00:00 on the 4th in that zone
(:func:`today_in` gives that day), and 0 while nothing is due.

**A company's figures** are per currency and never converted. The company's main
currency (the client's) gets the full set; every other currency it has documents in is
summed the same way and listed in one line (:attr:`CompanyBillingStatus.other_currencies`).
In each currency:

* each approved invoice still owed (authorised, sent or partially paid, amount due > 0)
  falls into one aging bucket by its days overdue: ``current`` (not yet due), 1-30,
  31-60, 61-90, 90+; the buckets hold invoices' amounts due, so they add up to what
  the invoices owe;
* the overdue balance is the sum of the buckets past due, the oldest overdue days the
  largest days overdue;
* the unallocated credit is the credit of approved credit notes not yet applied to an
  invoice; the outstanding balance is what the invoices owe less that credit (never
  below 0), as on the deal.

The last payment date is the latest payment on any of the client's invoices, in any
currency. The company is *at risk* (:class:`AtRiskRule`) when an invoice is at least
``days_overdue`` days overdue, or when the overdue balance in a currency is above that
currency's threshold.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

from syncd.core.interfaces import CompanyBillingStatus, DealBillingStatus, InvoiceState

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
        last_payment_date: the latest payment the ledger reports on it, if any.
    """

    kind: str
    number: str | None
    state: str
    currency: str
    total: Decimal
    amount_due: Decimal
    due_date: date | None
    last_payment_date: date | None = None


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


AGING_BUCKETS = ("current", "1_30", "31_60", "61_90", "90_plus")
"""The aging buckets, by days overdue: not yet due, 1-30, 31-60, 61-90, more than 90."""


def aging_bucket(days: int) -> str:
    """The bucket of an invoice ``days`` overdue (0: ``current``)."""
    if days <= 0:
        return "current"
    if days <= 30:
        return "1_30"
    if days <= 60:
        return "31_60"
    if days <= 90:
        return "61_90"
    return "90_plus"


@dataclass(frozen=True, kw_only=True)
class AtRiskRule:
    """When a company is flagged at risk (``[collections]`` settings).

    Attributes:
        days_overdue: an invoice at least this many days overdue (``None``: not a reason).
        overdue_above: per ISO currency, an overdue balance above this amount.
    """

    days_overdue: int | None = 30
    overdue_above: Mapping[str, Decimal] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class CurrencyFigures:
    """A company's receivables in one currency (see the module docstring).

    Attributes:
        currency: ISO 4217 code.
        outstanding: what the invoices owe less the unallocated credit (never below 0).
        overdue: what the invoices past due owe.
        unallocated_credit: approved credit notes' credit not yet applied.
        oldest_overdue_days: the largest days overdue; 0 when nothing is overdue.
        aging: amount owed per bucket of :data:`AGING_BUCKETS`.
    """

    currency: str
    outstanding: Decimal
    overdue: Decimal
    unallocated_credit: Decimal
    oldest_overdue_days: int
    aging: Mapping[str, Decimal]

    def summary(self) -> str:
        """One line, e.g. ``EUR outstanding 1200.00, overdue 300.00 (oldest 12 days)``."""
        text = f"{self.currency} outstanding {self.outstanding}"
        if self.overdue > 0:
            days = self.oldest_overdue_days
            text += f", overdue {self.overdue} (oldest {days} day{'' if days == 1 else 's'})"
        if self.unallocated_credit > 0:
            text += f", unallocated credit {self.unallocated_credit}"
        return text


def owed(document: Document) -> bool:
    """Whether ``document`` is an approved invoice with something still owed."""
    return document.kind == "invoice" and document.state in OPEN_STATES and document.amount_due > 0


def credit_left(document: Document) -> bool:
    """Whether ``document`` is an approved credit note with credit not yet applied."""
    approved = document.state not in (InvoiceState.DRAFT, InvoiceState.VOIDED)
    return document.kind != "invoice" and approved and document.amount_due > 0


def currency_figures(documents: Iterable[Document], currency: str, today: date) -> CurrencyFigures:
    """The receivables of ``documents`` in ``currency`` on ``today`` (the client's local day)."""
    aging = dict.fromkeys(AGING_BUCKETS, Decimal(0))
    oldest = 0
    credit = Decimal(0)
    for document in documents:
        if document.currency != currency:
            continue
        if credit_left(document):
            credit += document.amount_due
        if not owed(document):
            continue
        days = days_overdue(document.due_date, document.amount_due, today)
        aging[aging_bucket(days)] += document.amount_due
        oldest = max(oldest, days)
    owing = sum(aging.values(), Decimal(0))
    return CurrencyFigures(
        currency=currency,
        outstanding=max(Decimal(0), owing - credit),
        overdue=owing - aging["current"],
        unallocated_credit=credit,
        oldest_overdue_days=oldest,
        aging=aging,
    )


def at_risk_reasons(figures: Iterable[CurrencyFigures], rule: AtRiskRule) -> list[str]:
    """Why the company is at risk under ``rule`` (empty: it is not)."""
    reasons: list[str] = []
    for found in figures:
        if rule.days_overdue is not None and found.oldest_overdue_days >= rule.days_overdue > 0:
            days = found.oldest_overdue_days
            reasons.append(f"{found.currency}: an invoice {days} day{'' if days == 1 else 's'} overdue")
        limit = rule.overdue_above.get(found.currency)
        if limit is not None and found.overdue > limit:
            reasons.append(f"{found.currency}: overdue {found.overdue}, above {limit}")
    return reasons


def company_status(
    documents: Iterable[Document], *, today: date, currency: str, rule: AtRiskRule
) -> CompanyBillingStatus:
    """A company's receivables across the documents of its client (see the module docstring).

    Args:
        documents: every invoice and credit note of the client (syncd's and, when
            tracked, those made by hand at the ledger).
        today: the client's local day.
        currency: the company's main currency (the client's).
        rule: when the company is at risk.
    """
    documents = [doc for doc in documents if doc.state != InvoiceState.VOIDED]
    main = currency_figures(documents, currency, today)
    used = sorted({doc.currency for doc in documents if owed(doc) or credit_left(doc)} - {currency})
    others = [currency_figures(documents, code, today) for code in used]
    reasons = at_risk_reasons([main, *others], rule)
    payments = [doc.last_payment_date for doc in documents if doc.last_payment_date is not None]
    return CompanyBillingStatus(
        currency=currency,
        outstanding_balance=main.outstanding,
        overdue_balance=main.overdue,
        oldest_overdue_days=main.oldest_overdue_days,
        aging_current=main.aging["current"],
        aging_1_30=main.aging["1_30"],
        aging_31_60=main.aging["31_60"],
        aging_61_90=main.aging["61_90"],
        aging_90_plus=main.aging["90_plus"],
        unallocated_credit=main.unallocated_credit,
        last_payment_date=max(payments) if payments else None,
        at_risk=bool(reasons),
        at_risk_reason="; ".join(reasons) or None,
        other_currencies="; ".join(found.summary() for found in others) or None,
    )
