"""The standing of a deal across its documents, and days overdue in the client's zone."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from syncd.core.receivables import (
    AtRiskRule,
    Document,
    company_status,
    currency_figures,
    days_overdue,
    deal_status,
    owed,
    today_in,
)


def doc(kind: str = "invoice", state: str = "authorised", due: str = "0", total: str = "100", **kw: object) -> Document:
    values: dict[str, object] = {
        "kind": kind,
        "number": kw.pop("number", "INV-1"),
        "state": state,
        "currency": kw.pop("currency", "USD"),
        "total": Decimal(total),
        "amount_due": Decimal(due),
        "due_date": kw.pop("due_date", date(2026, 12, 10)),
        "last_payment_date": kw.pop("last_payment_date", None),
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


# -- a company's receivables -------------------------------------------------------------

RULE = AtRiskRule(days_overdue=30, overdue_above={"USD": Decimal("5000")})
TODAY = date(2026, 12, 31)


def invoice(due: str, days_ago: int, *, currency: str = "USD", state: str = "authorised", **kw: object) -> Document:
    return doc(state=state, due=due, total=due, currency=currency, due_date=TODAY - timedelta(days=days_ago), **kw)


def test_a_companys_invoices_fall_into_aging_buckets_by_days_overdue() -> None:
    """Not yet due, 1-30, 31-60, 61-90 and 90+ days: each invoice's amount due in its bucket."""
    status = company_status(
        [
            invoice("100", -3),  # due in 3 days
            invoice("10", 0),  # due today: not overdue yet
            invoice("200", 1),
            invoice("300", 30),
            invoice("400", 31),
            invoice("500", 90),
            invoice("600", 91),
            invoice("700", 45, state="paid", number="INV-P"),  # nothing owed
            invoice("800", 45, state="draft"),  # not approved: owes nothing yet
            invoice("900", 45, state="voided"),
        ],
        today=TODAY,
        currency="USD",
        rule=AtRiskRule(days_overdue=None),
    )
    assert (status.aging_current, status.aging_1_30, status.aging_31_60) == (Decimal(110), Decimal(500), Decimal(400))
    assert (status.aging_61_90, status.aging_90_plus) == (Decimal(500), Decimal(600))
    assert status.overdue_balance == Decimal(2000)
    assert status.outstanding_balance == Decimal(2110)
    assert status.oldest_overdue_days == 91
    assert not status.at_risk


def test_unallocated_credit_lowers_the_outstanding_balance_not_the_buckets() -> None:
    """A credit note's unapplied credit is shown on its own and taken off the outstanding balance."""
    status = company_status(
        [invoice("100", 5), doc(kind="credit_note", state="authorised", due="30", number="CN-1")],
        today=TODAY,
        currency="USD",
        rule=RULE,
    )
    assert (status.outstanding_balance, status.overdue_balance) == (Decimal(70), Decimal(100))
    assert status.unallocated_credit == Decimal(30)
    assert status.aging_1_30 == Decimal(100)


def test_other_currencies_are_listed_never_converted() -> None:
    """EUR and GBP documents of a USD company are summed in their own currency, in one line."""
    status = company_status(
        [
            invoice("100", 2),
            invoice("1200", -1, currency="EUR"),
            invoice("300", 12, currency="EUR"),
            invoice("40", 3, currency="GBP", state="paid"),
            doc(kind="credit_note", state="authorised", due="15", currency="GBP", number="CN-2"),
        ],
        today=TODAY,
        currency="USD",
        rule=RULE,
    )
    assert status.outstanding_balance == Decimal(100)
    assert status.other_currencies == (
        "EUR outstanding 1500, overdue 300 (oldest 12 days); GBP outstanding 0, unallocated credit 15"
    )


def test_the_at_risk_rule_flags_days_overdue_or_an_overdue_balance_above_its_currencys_limit() -> None:
    """30+ days overdue in any currency, or USD overdue above 5000: at risk, with the reason."""
    late = company_status([invoice("10", 30, currency="EUR")], today=TODAY, currency="USD", rule=RULE)
    assert late.at_risk
    assert late.at_risk_reason == "EUR: an invoice 30 days overdue"
    large = company_status([invoice("5000.01", 3)], today=TODAY, currency="USD", rule=RULE)
    assert large.at_risk_reason == "USD: overdue 5000.01, above 5000"
    fine = company_status([invoice("5000", 29)], today=TODAY, currency="USD", rule=RULE)
    assert not fine.at_risk
    assert fine.at_risk_reason is None


def test_the_last_payment_date_is_the_latest_across_invoices_and_currencies() -> None:
    """The newest payment on any invoice; none recorded: no date."""
    paid = invoice("0", 3, state="paid", last_payment_date=date(2026, 12, 20))
    part = invoice("50", 1, currency="EUR", state="partially_paid", last_payment_date=date(2026, 12, 28))
    status = company_status([paid, part], today=TODAY, currency="USD", rule=RULE)
    assert status.last_payment_date == date(2026, 12, 28)
    assert company_status([invoice("5", 1)], today=TODAY, currency="USD", rule=RULE).last_payment_date is None


def test_a_company_crosses_into_overdue_at_midnight_in_its_own_zone() -> None:
    """Due on the 10th in Auckland: current at 23:30 there, 1-30 at 00:30 on the 11th (both on the 10th in UTC)."""
    due = [doc(due="250", total="250", due_date=date(2026, 12, 10))]
    evening = company_status(
        due, today=today_in(datetime(2026, 12, 10, 10, 30, tzinfo=UTC), "Pacific/Auckland"), currency="USD", rule=RULE
    )
    after = company_status(
        due, today=today_in(datetime(2026, 12, 10, 11, 30, tzinfo=UTC), "Pacific/Auckland"), currency="USD", rule=RULE
    )
    assert (evening.aging_current, evening.overdue_balance) == (Decimal(250), Decimal(0))
    assert (after.aging_1_30, after.oldest_overdue_days) == (Decimal(250), 1)


amounts = st.decimals(min_value=0, max_value=100_000, places=2, allow_nan=False, allow_infinity=False)
documents = st.lists(
    st.builds(
        Document,
        kind=st.sampled_from(["invoice", "invoice", "credit_note"]),
        number=st.just("X"),
        state=st.sampled_from(["draft", "authorised", "sent", "partially_paid", "paid", "voided"]),
        currency=st.sampled_from(["USD", "EUR"]),
        total=amounts,
        amount_due=amounts,
        due_date=st.dates(min_value=date(2026, 1, 1), max_value=date(2027, 12, 31)),
    ),
    max_size=12,
)


@given(documents=documents, today=st.dates(min_value=date(2026, 1, 1), max_value=date(2027, 12, 31)))
def test_the_buckets_add_up_and_agree_with_the_balances(documents: list[Document], today: date) -> None:
    """Buckets sum to what invoices owe; overdue is all but current; outstanding = owed − credit, ≥ 0."""
    for currency in ("USD", "EUR"):
        found = currency_figures(documents, currency, today)
        owing = sum((d.amount_due for d in documents if d.currency == currency and owed(d)), Decimal(0))
        assert sum(found.aging.values(), Decimal(0)) == owing
        assert found.overdue == owing - found.aging["current"]
        assert found.outstanding == max(Decimal(0), owing - found.unallocated_credit)
        assert (found.oldest_overdue_days > 0) == (found.overdue > 0)
        assert all(value >= 0 for value in found.aging.values())
