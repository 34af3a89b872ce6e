"""Billing periods of recurring engagements: a calendar grid from an anchor day. Pure.

A recurring engagement (retainer, subscription, or hourly with a cycle) bills in periods
that start on its *anchor day* (``anchor_day``, else the day of ``start``) every month,
every three months or every twelve months, counted from the month of ``start``. The
boundaries are computed with :class:`dateutil.relativedelta.relativedelta`, whose
``day=`` clamps to the month's last day: an anchor on the 31st gives January 31,
February 28 (29 in a leap year), March 31, April 30, ... An anchor on the 29th or 30th
does the same in shorter months.

A period is named by its first day; that ISO date is the occurrence of its
``period_due`` billing event. A period the service starts or ends inside is prorated
(:mod:`syncd.core.proration`).

When a period is invoiced (its *issue moment*):

* in advance: at the start of its first day of service in the client's time zone;
* in arrears (and always for hourly engagements): at the start of the day after its last
  day of planned service;
* never before the deal was won: a period that fell due earlier is invoiced when won;
* with ``first_period_on_won`` (in advance only): the first period is invoiced when the
  deal is won, even if service starts later.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from dateutil.relativedelta import relativedelta

from syncd.core.errors import ValidationFailed
from syncd.core.interfaces import Engagement, EngagementType

MONTHS_PER_CYCLE = {"monthly": 1, "quarterly": 3, "yearly": 12}
"""Months in one period of each cycle."""


@dataclass(frozen=True, kw_only=True)
class Period:
    """One billing period: ``start`` to ``end``, both inclusive, in the client's zone."""

    start: date
    end: date

    @property
    def days(self) -> int:
        """Calendar days in the period."""
        return (self.end - self.start).days + 1

    @property
    def occurrence(self) -> str:
        """The occurrence of the period's ``period_due`` event: its first day, ISO."""
        return self.start.isoformat()

    def dates(self) -> list[date]:
        """Every day of the period, in order."""
        return [self.start + timedelta(days=offset) for offset in range(self.days)]


@dataclass(frozen=True, kw_only=True)
class Grid:
    """The period boundaries of one engagement.

    Boundary ``k`` is ``origin + relativedelta(months=k * step, day=anchor)``; boundary 0
    is in the month of the engagement's start.
    """

    origin: date
    step: int
    anchor: int

    def boundary(self, index: int) -> date:
        """The first day of period ``index`` (0 is the one in the start's month)."""
        return self.origin + relativedelta(months=index * self.step, day=self.anchor)

    def index_of(self, day: date) -> int:
        """The index of the period that contains ``day``."""
        months = (day.year - self.origin.year) * 12 + day.month - self.origin.month
        index = months // self.step
        while self.boundary(index) > day:
            index -= 1
        while self.boundary(index + 1) <= day:
            index += 1
        return index

    def period(self, index: int) -> Period:
        """Period ``index``."""
        return Period(start=self.boundary(index), end=self.boundary(index + 1) - timedelta(days=1))


def is_recurring(engagement: Engagement) -> bool:
    """Whether the engagement bills in periods: a retainer, a subscription, or hourly with a cycle."""
    if engagement.type in (EngagementType.RETAINER, EngagementType.SUBSCRIPTION):
        return True
    return engagement.type is EngagementType.HOURLY and engagement.cycle is not None


def grid_of(engagement: Engagement) -> Grid:
    """The period grid of a recurring engagement.

    Raises:
        ValidationFailed: ``cycle`` or ``start`` is missing, or ``anchor_day`` is not 1-31.
    """
    place = f"engagement {engagement.key}"
    if engagement.cycle is None:
        raise ValidationFailed("a recurring engagement needs a billing cycle", place=f"{place}: cycle")
    first = service_start(engagement)
    anchor = engagement.anchor_day if engagement.anchor_day is not None else first.day
    if not 1 <= anchor <= 31:
        raise ValidationFailed(f"anchor day {anchor} is not between 1 and 31", place=f"{place}: anchor_day")
    return Grid(origin=first.replace(day=1), step=MONTHS_PER_CYCLE[engagement.cycle], anchor=anchor)


def service_start(engagement: Engagement) -> date:
    """The first day of service.

    Raises:
        ValidationFailed: the engagement has no ``start``.
    """
    if engagement.start is None:
        raise ValidationFailed("a recurring engagement needs a start date", place=f"engagement {engagement.key}: start")
    return engagement.start


def periods_between(engagement: Engagement, start: date, end: date) -> list[Period]:
    """The engagement's periods that overlap both ``start``-``end`` and its planned service.

    Planned service runs from ``engagement.start`` to ``engagement.end`` (open-ended
    without one); a cancellation is not applied here (see :mod:`syncd.core.proration`).

    Args:
        engagement: a recurring engagement.
        start: first day of the range (inclusive).
        end: last day of the range (inclusive).

    Raises:
        ValidationFailed: see :func:`grid_of`.
    """
    grid = grid_of(engagement)
    first = max(start, service_start(engagement))
    last = end if engagement.end is None else min(end, engagement.end)
    if first > last:
        return []
    return [grid.period(index) for index in range(grid.index_of(first), grid.index_of(last) + 1)]


def period_at(engagement: Engagement, occurrence: str) -> Period:
    """The period named by a ``period_due`` occurrence (its first day, ISO).

    Raises:
        ValidationFailed: the occurrence is no period start of this engagement.
    """
    place = f"engagement {engagement.key}: period {occurrence!r}"
    try:
        day = date.fromisoformat(occurrence)
    except ValueError as exc:
        raise ValidationFailed("the occurrence is not an ISO date", place=place) from exc
    grid = grid_of(engagement)
    period = grid.period(grid.index_of(day))
    if period.start != day or period not in periods_between(engagement, period.start, period.end):
        raise ValidationFailed("the occurrence is not the first day of one of the engagement's periods", place=place)
    return period


def in_arrears(engagement: Engagement) -> bool:
    """Whether periods are invoiced after they end (hourly ones always are)."""
    return engagement.type is EngagementType.HOURLY or engagement.billing_timing == "arrears"


def due_day(engagement: Engagement, period: Period) -> date:
    """The day a period falls due, in the client's zone (ignoring when the deal was won)."""
    if in_arrears(engagement):
        last = period.end if engagement.end is None else min(period.end, engagement.end)
        return last + timedelta(days=1)
    return max(period.start, service_start(engagement))


def start_of_day(day: date, timezone: str) -> datetime:
    """Midnight at the start of ``day`` in the IANA zone ``timezone``, as an aware datetime."""
    return datetime.combine(day, time(0), tzinfo=ZoneInfo(timezone))


def issued_at(engagement: Engagement, period: Period, timezone: str) -> datetime | None:
    """The issue moment of a period: its due day's start, or the win if that is later.

    With ``first_period_on_won``, an in-advance engagement's first period (the one its
    service starts in) is issued at the win. Returns ``None`` while the deal is not won.
    """
    if engagement.won_at is None:
        return None
    if engagement.first_period_on_won and not in_arrears(engagement) and period.start <= service_start(engagement):
        return engagement.won_at
    return max(start_of_day(due_day(engagement, period), timezone), engagement.won_at)
