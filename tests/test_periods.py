"""Tests of billing periods: the anchor-day grid, due days and issue moments."""

from __future__ import annotations

import calendar
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.core.errors import ValidationFailed
from syncd.core.interfaces import Engagement, EngagementType
from syncd.core.periods import Period, due_day, issued_at, period_at, periods_between


def retainer(**changes: object) -> Engagement:
    """A won monthly retainer starting on 2024-01-31."""
    values: dict[str, object] = {
        "key": "hubspot:deal:1",
        "client_key": "hubspot:company:1",
        "type": EngagementType.RETAINER,
        "name": "Retainer",
        "currency": "USD",
        "won_at": datetime(2024, 1, 2, tzinfo=UTC),
        "start": date(2024, 1, 31),
        "amount": Decimal(1000),
        "cycle": "monthly",
    }
    values.update(changes)
    return Engagement.model_validate(values)


def test_month_end_anchor_bills_on_the_last_day_of_shorter_months() -> None:
    """An anchor on the 31st starts periods on Jan 31, Feb 29 (leap year), Mar 31, Apr 30."""
    starts = [period.start for period in periods_between(retainer(), date(2024, 1, 1), date(2024, 5, 31))]
    assert starts == [date(2024, 1, 31), date(2024, 2, 29), date(2024, 3, 31), date(2024, 4, 30), date(2024, 5, 31)]


def test_month_end_anchor_in_a_common_year() -> None:
    """In a common year the February period starts on the 28th and ends on March 30."""
    periods = periods_between(retainer(start=date(2023, 1, 31)), date(2023, 2, 1), date(2023, 3, 1))
    assert periods == [
        Period(start=date(2023, 1, 31), end=date(2023, 2, 27)),
        Period(start=date(2023, 2, 28), end=date(2023, 3, 30)),
    ]


@pytest.mark.parametrize("anchor", [29, 30])
def test_anchors_on_the_29th_and_30th_clamp_in_february(anchor: int) -> None:
    """Anchors on the 29th and 30th fall on Feb 28 in a common year and return in March."""
    periods = periods_between(
        retainer(start=date(2023, 1, anchor), anchor_day=anchor), date(2023, 2, 1), date(2023, 3, 31)
    )
    assert [period.start for period in periods] == [date(2023, 1, anchor), date(2023, 2, 28), date(2023, 3, anchor)]


def test_quarterly_and_yearly_cycles_count_from_the_start_month() -> None:
    """Quarterly periods step three months and yearly periods twelve from the start's month."""
    quarterly = retainer(start=date(2024, 2, 10), anchor_day=1, cycle="quarterly")
    assert [p.start for p in periods_between(quarterly, date(2024, 1, 1), date(2024, 12, 31))] == [
        date(2024, 2, 1),
        date(2024, 5, 1),
        date(2024, 8, 1),
        date(2024, 11, 1),
    ]
    yearly = retainer(start=date(2024, 2, 29), cycle="yearly")
    assert [p.start for p in periods_between(yearly, date(2024, 1, 1), date(2026, 12, 31))] == [
        date(2024, 2, 29),
        date(2025, 2, 28),
        date(2026, 2, 28),
    ]


def test_a_start_before_the_anchor_day_falls_in_the_previous_months_period() -> None:
    """A start on the 10th with an anchor on the 15th is in the period from the 15th before."""
    periods = periods_between(retainer(start=date(2024, 3, 10), anchor_day=15), date(2024, 3, 1), date(2024, 3, 20))
    assert periods == [
        Period(start=date(2024, 2, 15), end=date(2024, 3, 14)),
        Period(start=date(2024, 3, 15), end=date(2024, 4, 14)),
    ]


def test_periods_stop_at_the_planned_end() -> None:
    """No period starts after the engagement's last day."""
    periods = periods_between(
        retainer(start=date(2024, 1, 1), end=date(2024, 3, 10)), date(2024, 1, 1), date(2024, 12, 31)
    )
    assert [p.start for p in periods] == [date(2024, 1, 1), date(2024, 2, 1), date(2024, 3, 1)]


@settings(max_examples=80, deadline=None)
@given(
    start=st.dates(min_value=date(2020, 1, 1), max_value=date(2030, 12, 31)),
    anchor=st.one_of(st.none(), st.integers(min_value=1, max_value=31)),
    cycle=st.sampled_from(["monthly", "quarterly", "yearly"]),
    length=st.integers(min_value=0, max_value=1200),
)
def test_periods_tile_the_calendar(start: date, anchor: int | None, cycle: str, length: int) -> None:
    """Periods are contiguous, start on the anchor day clamped to the month's end, and cover the range."""
    engagement = retainer(start=start, anchor_day=anchor, cycle=cycle)
    end = start + timedelta(days=length)
    periods = periods_between(engagement, start, end)
    assert periods[0].start <= start
    assert periods[-1].end >= end
    expected_day = anchor if anchor is not None else start.day
    for period, following in pairwise(periods):
        assert following.start == period.end + timedelta(days=1)
    for period in periods:
        assert period.days >= 28
        assert period.start.day == min(expected_day, calendar.monthrange(period.start.year, period.start.month)[1])


@settings(max_examples=60, deadline=None)
@given(
    start=st.dates(min_value=date(2022, 1, 1), max_value=date(2025, 12, 31)),
    anchor=st.integers(min_value=1, max_value=31),
    cuts=st.lists(st.integers(min_value=0, max_value=800), max_size=5),
)
def test_periods_are_the_same_over_one_range_or_many(start: date, anchor: int, cuts: list[int]) -> None:
    """Periods over a range are those of its pieces, with the seams' periods counted once."""
    engagement = retainer(start=start, anchor_day=anchor)
    end = start + timedelta(days=800)
    bounds = sorted({start, end, *(start + timedelta(days=cut) for cut in cuts)})
    pieces: list[Period] = []
    for first, last in pairwise(bounds):
        pieces += [p for p in periods_between(engagement, first, last) if p not in pieces]
    assert pieces == periods_between(engagement, start, end)


def test_period_at_finds_a_period_by_its_occurrence() -> None:
    """A period's occurrence names it; any other date is refused naming the period."""
    engagement = retainer(start=date(2024, 1, 15), anchor_day=1)
    assert period_at(engagement, "2024-01-01") == Period(start=date(2024, 1, 1), end=date(2024, 1, 31))
    with pytest.raises(ValidationFailed, match="not the first day"):
        period_at(engagement, "2024-01-02")
    with pytest.raises(ValidationFailed, match="not an ISO date"):
        period_at(engagement, "soon")
    with pytest.raises(ValidationFailed, match="not the first day"):
        period_at(engagement, "2023-12-01")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"cycle": None}, "cycle"),
        ({"start": None}, "start"),
        ({"anchor_day": 32}, "anchor_day"),
        ({"anchor_day": 0}, "anchor_day"),
    ],
)
def test_an_incomplete_recurring_engagement_is_refused(changes: dict[str, object], field: str) -> None:
    """A recurring engagement without a cycle or start, or with a bad anchor, names the field."""
    with pytest.raises(ValidationFailed) as caught:
        periods_between(retainer(**changes), date(2024, 1, 1), date(2024, 12, 31))
    assert caught.value.place is not None
    assert caught.value.place.endswith(field)


def test_due_day_in_advance_and_in_arrears() -> None:
    """In advance a period is due on its first served day; in arrears the day after its last."""
    engagement = retainer(start=date(2024, 1, 10), anchor_day=1, end=date(2024, 3, 20))
    january = Period(start=date(2024, 1, 1), end=date(2024, 1, 31))
    march = Period(start=date(2024, 3, 1), end=date(2024, 3, 31))
    assert due_day(engagement, january) == date(2024, 1, 10)
    assert due_day(engagement, march) == date(2024, 3, 1)
    arrears = engagement.model_copy(update={"billing_timing": "arrears"})
    assert due_day(arrears, january) == date(2024, 2, 1)
    assert due_day(arrears, march) == date(2024, 3, 21)
    hourly = engagement.model_copy(update={"type": EngagementType.HOURLY})
    assert due_day(hourly, january) == date(2024, 2, 1)


def test_issue_moment_is_midnight_in_the_clients_zone_or_the_win() -> None:
    """A period is issued at midnight of its due day in the client's zone, never before the win."""
    engagement = retainer(start=date(2024, 1, 1), anchor_day=1, won_at=datetime(2024, 2, 10, 15, tzinfo=UTC))
    january = Period(start=date(2024, 1, 1), end=date(2024, 1, 31))
    march = Period(start=date(2024, 3, 1), end=date(2024, 3, 31))
    assert issued_at(engagement, january, "America/New_York") == datetime(2024, 2, 10, 15, tzinfo=UTC)
    assert issued_at(engagement, march, "America/New_York") == datetime(2024, 3, 1, 5, tzinfo=UTC)
    assert issued_at(engagement.model_copy(update={"won_at": None}), march, "UTC") is None
