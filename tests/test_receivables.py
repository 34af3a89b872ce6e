"""The standing of a deal across its documents, and days overdue in the client's zone."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

from syncd.core.receivables import Document, days_overdue, deal_status, today_in


def doc(kind: str = "invoice", state: str = "authorised", due: str = "0", total: str = "100", **kw: object) -> Document:
    values: dict[str, object] = {
        "kind": kind,
        "number": kw.pop("number", "INV-1"),
        "state": state,
        "currency": kw.pop("currency", "USD"),
        "total": Decimal(total),
        "amount_due": Decimal(due),
        "due_date": kw.pop("due_date", date(2026, 12, 10)),
    }
    return Document(**values)  # type: ignore[arg-type]


def test_days_overdue_count_whole_days_in_the_clients_zone() -> None:
    """Due on the 10th: still 0 at 23:30 on the 10th in Auckland, 1 from midnight there."""
    evening = datetime(2026, 12, 10, 10, 30, tzinfo=UTC)  # 23:30 in Auckland (UTC+13)
    after_midnight = datetime(2026, 12, 10, 11, 30, tzinfo=UTC)  # 00:30 on the 11th there
    due = date(2026, 12, 10)
    assert days_overdue(due, Decimal(5), today_in(evening, "Pacific/Auckland")) == 0
    assert days_overdue(due, Decimal(5), today_in(after_midnight, "Pacific/Auckland")) == 1
    assert days_overdue(due, Decimal(5), today_in(after_midnight, "America/New_York")) == 0
    assert days_overdue(due, Decimal(0), date(2027, 1, 1)) == 0


def test_one_overdue_invoice_makes_the_deal_overdue_and_only_open_amounts_count() -> None:
    """A paid month and an overdue month: overdue, amount due of the open one, earliest open due date."""
    status = deal_status(
        [
            doc(state="paid", number="INV-1", due="0", due_date=date(2026, 11, 1)),
            doc(state="authorised", number="INV-2", due="100", due_date=date(2026, 12, 1)),
            doc(state="voided", number="INV-3", due="999"),
        ],
        date(2026, 12, 4),
    )
    assert status is not None
    assert (status.state, status.amount_due, status.days_overdue) == ("overdue", Decimal(100), 3)
    assert status.invoice_number == "INV-1, INV-2"
    assert status.due_date == date(2026, 12, 1)
    assert status.total_invoiced == Decimal(200)


def test_precedence_and_paid_only_when_everything_is_paid() -> None:
    """partially paid > awaiting payment > draft > paid."""
    today = date(2026, 12, 4)
    partial = doc(state="partially_paid", due="40")
    sent = doc(state="sent", due="100")
    paid = doc(state="paid", due="0")
    draft = doc(state="draft", due="100")
    assert deal_status([paid, sent, partial], today).state == "partially_paid"  # type: ignore[union-attr]
    assert deal_status([paid, sent], today).state == "sent"  # type: ignore[union-attr]
    assert deal_status([paid, draft], today).state == "draft"  # type: ignore[union-attr]
    assert deal_status([paid, paid], today).state == "paid"  # type: ignore[union-attr]
    assert deal_status([doc(state="voided")], today).state == "voided"  # type: ignore[union-attr]
    assert deal_status([], today) is None


def test_unallocated_credit_lowers_the_amount_due_and_drafts_owe_nothing() -> None:
    """Σ amount due of approved invoices − unallocated credit; a draft invoice adds nothing owed."""
    status = deal_status(
        [
            doc(state="authorised", due="100"),
            doc(kind="credit_note", state="authorised", due="30", number="CN-1"),
            doc(state="draft", due="50", number="INV-9"),
        ],
        date(2026, 12, 4),
    )
    assert status is not None
    assert status.amount_due == Decimal(70)
    assert status.invoice_number == "INV-1, INV-9"
