"""Tests of proration by days and of the settlement of upgrades, downgrades, pauses and cancellations."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.core.billing import draft_for_event, due_events, issue_date_for, manual_credits
from syncd.core.interfaces import AmountChange, Client, DraftKind, Engagement, EngagementType, Pause
from syncd.core.periods import issued_at, periods_between
from syncd.core.proration import prorate, with_history

ZONE = "America/New_York"
EARLY = datetime(2000, 1, 1, tzinfo=UTC)


def client(zone: str = ZONE) -> Client:
    """The client the retainers bill."""
    return Client(key="hubspot:company:1", legal_name="Acme Ltd", currency="USD", payment_terms_days=30, timezone=zone)


def retainer(**changes: object) -> Engagement:
    """A monthly retainer of 3000 USD in advance from 2024-01-01, won in December."""
    values: dict[str, object] = {
        "key": "hubspot:deal:7",
        "client_key": "hubspot:company:1",
        "type": EngagementType.RETAINER,
        "name": "Retainer",
        "currency": "USD",
        "won_at": datetime(2023, 12, 20, 12, tzinfo=UTC),
        "start": date(2024, 1, 1),
        "amount": Decimal("3000.00"),
        "cycle": "monthly",
        "anchor_day": 1,
    }
    values.update(changes)
    return Engagement.model_validate(values)


def at(day: date, hour: int = 12) -> datetime:
    """Noon (or ``hour``) UTC on ``day``."""
    return datetime(day.year, day.month, day.day, hour, tzinfo=UTC)


@dataclass(frozen=True, kw_only=True)
class Row:
    """One expected invoice or credit note."""

    occurrence: str
    issued: date
    kind: DraftKind
    total: str


def ledger(engagement: Engagement, as_of: datetime, *, zone: str = ZONE) -> list[Row]:
    """Every draft due by ``as_of``, as rows."""
    rows = []
    for event in due_events(engagement, as_of=as_of, timezone=zone, billing_start=EARLY):
        draft = draft_for_event(event, engagement, client(zone), issue_date=issue_date_for(event.occurred_at, zone))
        rows.append(
            Row(occurrence=event.occurrence, issued=draft.issue_date, kind=draft.kind, total=str(draft.subtotal()))
        )
    return rows


def signed_total(engagement: Engagement, as_of: datetime, zone: str) -> tuple[Decimal, int]:
    """Invoices minus credit notes due by ``as_of``, and how many lines they have."""
    total, lines = Decimal(0), 0
    for event in due_events(engagement, as_of=as_of, timezone=zone, billing_start=EARLY):
        draft = draft_for_event(event, engagement, client(zone), issue_date=issue_date_for(event.occurred_at, zone))
        total += draft.subtotal() if draft.kind is DraftKind.INVOICE else -draft.subtotal()
        lines += len(draft.lines)
    return total, lines


INVOICE, CREDIT = DraftKind.INVOICE, DraftKind.CREDIT_NOTE


# ---------------------------------------------------------------------------
# The formula
# ---------------------------------------------------------------------------


def test_prorate_rounds_half_up_once() -> None:
    """amount × days / days_in_period is rounded half-up to minor units."""
    assert prorate(Decimal("3100"), 17, 31, "USD") == Decimal("1700.00")
    assert prorate(Decimal("1000"), 1, 3, "USD") == Decimal("333.33")
    assert prorate(Decimal("0.10"), 1, 4, "USD") == Decimal("0.03")
    assert prorate(Decimal("1000"), 1, 3, "JPY") == Decimal("333")
    assert prorate(Decimal("10"), 1, 3, "KWD") == Decimal("3.333")
    assert prorate(Decimal("3000"), 30, 30, "USD") == Decimal("3000.00")


def test_prorate_refuses_more_days_than_the_period() -> None:
    """Days outside 0..days_in_period are refused."""
    with pytest.raises(ValueError, match="do not fit"):
        prorate(Decimal(100), 32, 31, "USD")
    with pytest.raises(ValueError, match="do not fit"):
        prorate(Decimal(100), -1, 31, "USD")


@settings(max_examples=150, deadline=None)
@given(
    cents=st.integers(min_value=0, max_value=10**9),
    days=st.integers(min_value=28, max_value=366),
    cuts=st.lists(st.integers(min_value=1, max_value=365), max_size=8),
    currency=st.sampled_from(["USD", "JPY", "KWD", "EUR"]),
)
def test_prorated_parts_add_up_to_the_full_period(cents: int, days: int, cuts: list[int], currency: str) -> None:
    """Prorated parts of a period add up to the full-period amount within one minor unit per line."""
    amount = Decimal(cents).scaleb(-2)
    bounds = sorted({0, days, *(cut for cut in cuts if cut < days)})
    parts = [prorate(amount, last - first, days, currency) for first, last in pairwise(bounds)]
    whole = prorate(amount, days, days, currency)
    unit = Decimal(1).scaleb(-{"USD": 2, "JPY": 0, "KWD": 3, "EUR": 2}[currency])
    assert abs(sum(parts) - whole) <= unit * len(parts)


# ---------------------------------------------------------------------------
# Proration of periods
# ---------------------------------------------------------------------------


def test_a_mid_period_start_is_prorated() -> None:
    """A start on Jan 15 bills 17 of January's 31 days, then full months."""
    rows = ledger(retainer(start=date(2024, 1, 15), amount=Decimal(3100)), at(date(2024, 2, 15)))
    assert rows == [
        Row(occurrence="2024-01-01", issued=date(2024, 1, 15), kind=INVOICE, total="1700.00"),
        Row(occurrence="2024-02-01", issued=date(2024, 2, 1), kind=INVOICE, total="3100.00"),
    ]


def test_an_end_date_is_prorated_and_nothing_follows() -> None:
    """A planned end on Mar 10 bills 10 of March's 31 days and no later period."""
    rows = ledger(retainer(end=date(2024, 3, 10), amount=Decimal(3100)), at(date(2024, 12, 31)))
    assert [row.total for row in rows] == ["3100.00", "3100.00", "1000.00"]


def test_arrears_bill_after_the_period_and_include_changes_made_in_it() -> None:
    """In arrears a mid-period upgrade is priced into that period's invoice, with no extra event."""
    engagement = retainer(
        billing_timing="arrears",
        amount_changes=(AmountChange(version="v2", effective=date(2024, 2, 16), amount=Decimal(4500)),),
    )
    rows = ledger(engagement, at(date(2024, 3, 2)))
    # February 2024 has 29 days: 15 at 3000 (1551.72) and 14 at 4500 (2172.41).
    assert rows == [
        Row(occurrence="2024-01-01", issued=date(2024, 2, 1), kind=INVOICE, total="3000.00"),
        Row(occurrence="2024-02-01", issued=date(2024, 3, 1), kind=INVOICE, total="3724.13"),
    ]


def test_a_pause_known_in_advance_is_prorated_out() -> None:
    """A pause recorded before its period is issued removes its days from that invoice."""
    pause = Pause(start=date(2024, 2, 10), end=date(2024, 2, 19), recorded_at=at(date(2024, 1, 20)))
    rows = ledger(retainer(pauses=(pause,), amount=Decimal(2900)), at(date(2024, 2, 25)))
    assert rows[-1] == Row(occurrence="2024-02-01", issued=date(2024, 2, 1), kind=INVOICE, total="1900.00")


def test_a_pause_after_invoicing_credits_the_paused_days() -> None:
    """A pause recorded after an in-advance period was invoiced yields a credit note for its days."""
    pause = Pause(start=date(2024, 2, 10), end=date(2024, 2, 19))
    rows = ledger(retainer(pauses=(pause,), amount=Decimal(2900)), at(date(2024, 2, 25)))
    assert rows[-2:] == [
        Row(occurrence="2024-02-01", issued=date(2024, 2, 1), kind=INVOICE, total="2900.00"),
        Row(occurrence="pause:2024-02-10/2024-02-19", issued=date(2024, 2, 10), kind=CREDIT, total="1000.00"),
    ]


def test_a_downgrade_in_advance_credits_the_unused_part() -> None:
    """A mid-period downgrade after invoicing yields a credit note for the rest of the period."""
    change = AmountChange(
        version="v5", effective=date(2024, 1, 17), amount=Decimal(1450), recorded_at=at(date(2024, 1, 20))
    )
    rows = ledger(retainer(amount=Decimal(3100), amount_changes=(change,)), at(date(2024, 1, 31)))
    # Jan 17-31: 15 of 31 days at -1650 = -798.387...
    assert rows == [
        Row(occurrence="2024-01-01", issued=date(2024, 1, 1), kind=INVOICE, total="3100.00"),
        Row(occurrence="change:v5", issued=date(2024, 1, 20), kind=CREDIT, total="798.39"),
    ]


def test_cancellation_prorates_the_last_period_when_known_first() -> None:
    """A cancellation recorded before the last period is issued prorates it; nothing is billed after."""
    engagement = retainer(amount=Decimal(3100), cancel_date=date(2024, 3, 10), cancelled_at=at(date(2024, 2, 20)))
    rows = ledger(engagement, at(date(2025, 1, 1)))
    assert [row.total for row in rows] == ["3100.00", "3100.00", "1000.00"]


def test_credits_become_manual_actions_without_credit_notes() -> None:
    """Without credit notes, credits are left out of the events and returned as manual credits."""
    engagement = retainer(amount=Decimal(3100), cancel_date=date(2024, 3, 10))
    as_of = at(date(2024, 4, 1))
    events = due_events(engagement, as_of=as_of, timezone=ZONE, billing_start=EARLY, credit_notes=False)
    assert [event.occurrence for event in events] == ["2024-01-01", "2024-02-01", "2024-03-01"]
    credits = manual_credits(engagement, as_of=as_of, timezone=ZONE, billing_start=EARLY)
    assert [(credit.event.occurrence, credit.total()) for credit in credits] == [
        ("cancel:2024-03-10", Decimal("2100.00"))
    ]
    assert "issue it by hand" in credits[0].message()
    assert (
        manual_credits(engagement, as_of=as_of, timezone=ZONE, billing_start=EARLY, handled={credits[0].event.key})
        == []
    )


def test_a_change_recorded_at_the_issue_moment_is_priced_not_settled() -> None:
    """A change recorded exactly when a period is issued is priced into it and not settled again."""
    change = AmountChange(version="v3", effective=date(2024, 3, 1), amount=Decimal(4000))
    engagement = retainer(amount_changes=(change,))
    rows = ledger(engagement, at(date(2024, 3, 31)))
    assert [row.occurrence for row in rows] == ["2024-01-01", "2024-02-01", "2024-03-01"]
    assert rows[-1].total == "4000.00"


def test_a_fact_before_billing_start_is_not_settled() -> None:
    """An upgrade recorded before syncd took over billing yields no engagement_changed event."""
    change = AmountChange(version="v1", effective=date(2024, 1, 16), amount=Decimal(6000))
    events = due_events(
        retainer(amount_changes=(change,)),
        as_of=at(date(2024, 1, 31)),
        timezone=ZONE,
        billing_start=at(date(2024, 1, 20)),
    )
    assert events == []


# ---------------------------------------------------------------------------
# A year of a retainer, by hand
# ---------------------------------------------------------------------------


def test_a_year_of_a_retainer_matches_the_hand_written_ledger() -> None:
    """A year with an upgrade, a retroactive downgrade and a cancellation bills exactly this ledger."""
    engagement = retainer(
        amount_changes=(
            # Upgrade to 4500 from Apr 16, recorded Apr 10 (April was invoiced Apr 1).
            AmountChange(
                version="v7", effective=date(2024, 4, 16), amount=Decimal(4500), recorded_at=at(date(2024, 4, 10))
            ),
            # Downgrade to 3600 from Aug 1, recorded Aug 20 (August was invoiced at 4500).
            AmountChange(
                version="v9", effective=date(2024, 8, 1), amount=Decimal(3600), recorded_at=at(date(2024, 8, 20))
            ),
        ),
        # Last day Oct 20, recorded Oct 5 (October was invoiced Oct 1).
        cancel_date=date(2024, 10, 20),
        cancelled_at=at(date(2024, 10, 5)),
    )
    expected = [
        Row(occurrence="2024-01-01", issued=date(2024, 1, 1), kind=INVOICE, total="3000.00"),
        Row(occurrence="2024-02-01", issued=date(2024, 2, 1), kind=INVOICE, total="3000.00"),
        Row(occurrence="2024-03-01", issued=date(2024, 3, 1), kind=INVOICE, total="3000.00"),
        Row(occurrence="2024-04-01", issued=date(2024, 4, 1), kind=INVOICE, total="3000.00"),
        # 15 of April's 30 days at +1500.
        Row(occurrence="change:v7", issued=date(2024, 4, 10), kind=INVOICE, total="750.00"),
        Row(occurrence="2024-05-01", issued=date(2024, 5, 1), kind=INVOICE, total="4500.00"),
        Row(occurrence="2024-06-01", issued=date(2024, 6, 1), kind=INVOICE, total="4500.00"),
        Row(occurrence="2024-07-01", issued=date(2024, 7, 1), kind=INVOICE, total="4500.00"),
        Row(occurrence="2024-08-01", issued=date(2024, 8, 1), kind=INVOICE, total="4500.00"),
        # All 31 August days at -900.
        Row(occurrence="change:v9", issued=date(2024, 8, 20), kind=CREDIT, total="900.00"),
        Row(occurrence="2024-09-01", issued=date(2024, 9, 1), kind=INVOICE, total="3600.00"),
        Row(occurrence="2024-10-01", issued=date(2024, 10, 1), kind=INVOICE, total="3600.00"),
        # Oct 21-31: 11 of 31 days of 3600 = 1277.419...
        Row(occurrence="cancel:2024-10-20", issued=date(2024, 10, 5), kind=CREDIT, total="1277.42"),
    ]
    assert ledger(engagement, at(date(2025, 3, 1))) == expected
    total, _ = signed_total(engagement, at(date(2025, 3, 1)), ZONE)
    # What the days cost: Jan-Mar 9000, April 1500 + 2250, May-Jul 13500, Aug 3600, Sep 3600, Oct 1-20 2322.58.
    assert total == Decimal("35772.58")


# ---------------------------------------------------------------------------
# Properties: every served day is billed once, at its final price
# ---------------------------------------------------------------------------

ZONES = ["UTC", "America/New_York", "Pacific/Auckland"]
BASE = date(2024, 1, 1)


@st.composite
def engagements(draw: st.DrawFn) -> Engagement:
    """Recurring engagements with random cycles, anchors, changes, a pause and a cancellation."""
    start = BASE + timedelta(days=draw(st.integers(0, 60)))
    offset = st.integers(-40, 40)

    def recorded(day: date) -> datetime | None:
        shift = draw(st.one_of(st.none(), offset))
        return None if shift is None else at(day + timedelta(days=shift), draw(st.sampled_from([0, 0, 5, 13, 23])))

    def some_day(low: int, high: int) -> date:
        day = start + timedelta(days=draw(st.integers(low, high)))
        return day.replace(day=1) if draw(st.booleans()) else day

    changes = []
    for index in range(draw(st.integers(0, 3))):
        effective = some_day(-10, 300)
        amount = Decimal(draw(st.integers(0, 10**7))).scaleb(-2)
        changes.append(
            AmountChange(version=f"v{index}", effective=effective, amount=amount, recorded_at=recorded(effective))
        )
    pauses = []
    if draw(st.booleans()):
        first = some_day(0, 300)
        pauses.append(
            Pause(start=first, end=first + timedelta(days=draw(st.integers(0, 40))), recorded_at=recorded(first))
        )
    cancel = start + timedelta(days=draw(st.integers(0, 330))) if draw(st.booleans()) else None
    return retainer(
        start=start,
        anchor_day=draw(st.one_of(st.none(), st.integers(1, 31))),
        cycle=draw(st.sampled_from(["monthly", "monthly", "quarterly"])),
        billing_timing=draw(st.sampled_from(["advance", "arrears"])),
        amount=Decimal(draw(st.integers(0, 10**7))).scaleb(-2),
        won_at=at(start + timedelta(days=draw(st.integers(-30, 45)))),
        end=start + timedelta(days=draw(st.integers(30, 360))) if draw(st.booleans()) else None,
        amount_changes=tuple(changes),
        pauses=tuple(pauses),
        cancel_date=cancel,
        cancelled_at=recorded(cancel) if cancel is not None else None,
    )


def final_price(engagement: Engagement, day: date) -> Decimal:
    """What ``day`` finally costs per period, from the engagement's facts, computed independently."""
    last = min(d for d in (engagement.end, engagement.cancel_date, date.max) if d is not None)
    assert engagement.start is not None
    assert engagement.amount is not None
    if not engagement.start <= day <= last or any(p.start <= day <= p.end for p in engagement.pauses):
        return Decimal(0)

    def known(change: AmountChange) -> datetime:
        return change.recorded_at or datetime.combine(change.effective, datetime.min.time(), tzinfo=UTC)

    # The latest effective date wins; among equal dates the one recorded last, then the later in the tuple.
    in_force = [(c.effective, known(c), index, c.amount) for index, c in enumerate(engagement.amount_changes)]
    in_force = [item for item in in_force if item[0] <= day]
    return max(in_force)[3] if in_force else engagement.amount


@settings(max_examples=40, deadline=None)
@given(engagement=engagements())
def test_every_served_day_is_billed_once_at_its_final_price(engagement: Engagement) -> None:
    """Invoices minus credit notes equal what the served days finally cost, within rounding.

    Each line is off by at most half a minor unit; so is each line left out because it
    rounds to zero, of which a period has at most one per amount it knows and one per
    fact that settles it.
    """
    zone = "UTC"
    as_of = at(date(2026, 1, 1))
    total, lines = signed_total(engagement, as_of, zone)
    truth, periods = Decimal(0), 0
    for period in periods_between(engagement, BASE, as_of.date()):
        issued = issued_at(engagement, period, zone)
        if issued is not None and issued <= as_of:
            periods += 1
            truth += sum((final_price(engagement, day) for day in period.dates()), Decimal(0)) / period.days
    facts = len(engagement.amount_changes) + len(engagement.pauses) + (engagement.cancel_date is not None)
    assert abs(total - truth) <= Decimal("0.005") * (lines + periods * (1 + 2 * facts))


@settings(max_examples=25, deadline=None)
@given(
    engagement=engagements(),
    zone=st.sampled_from(ZONES),
    cuts=st.lists(st.integers(min_value=0, max_value=24 * 600), max_size=6),
)
def test_events_are_the_same_in_one_run_or_many(engagement: Engagement, zone: str, cuts: list[int]) -> None:
    """Billing events over a range are the same computed once or in many small runs: no gaps, no repeats."""
    end = at(BASE + timedelta(days=600))
    single = due_events(engagement, as_of=end, timezone=zone, billing_start=EARLY)
    billed: list[str] = []
    for hours in [*sorted(cuts), 24 * 600]:
        as_of = at(BASE) + timedelta(hours=hours)
        billed += [
            e.key for e in due_events(engagement, as_of=as_of, timezone=zone, billing_start=EARLY, billed=billed)
        ]
    assert len(billed) == len(set(billed))
    assert sorted(billed) == sorted(event.key for event in single)


def test_with_history_records_an_amount_change_between_mappings() -> None:
    """A new mapped amount becomes an AmountChange on top of the stored history; the same amount adds none."""
    stored = retainer(source_version="v1")
    mapped = retainer(amount=Decimal(4500), source_version="v2")
    merged = with_history(stored, mapped, recorded_at=at(date(2024, 4, 10)), effective=date(2024, 4, 16))
    assert merged.amount == Decimal("3000.00")
    assert merged.amount_changes == (
        AmountChange(
            version="v2", effective=date(2024, 4, 16), amount=Decimal(4500), recorded_at=at(date(2024, 4, 10))
        ),
    )
    again = with_history(
        merged,
        retainer(amount=Decimal(4500), source_version="v3"),
        recorded_at=at(date(2024, 5, 2)),
        effective=date(2024, 5, 2),
    )
    assert again.amount_changes == merged.amount_changes
    assert with_history(None, mapped, recorded_at=at(date(2024, 4, 10)), effective=date(2024, 4, 16)) == mapped
    rows = ledger(merged, at(date(2024, 4, 30)))
    assert rows[-1] == Row(occurrence="change:v2", issued=date(2024, 4, 10), kind=INVOICE, total="750.00")
