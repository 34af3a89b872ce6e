"""Proration of recurring engagements by days, and the settlement of later changes. Pure.

**Formula.** A day of a period costs ``amount / days_in_period``, where ``amount`` is
the recurring amount per cycle in force that day and ``days_in_period`` counts the
period's calendar days in the client's time zone (28 to 366). A line bills ``n`` days at
one amount as::

    unit_price = round_half_up(amount × n / days_in_period, currency's minor units)
    quantity   = 1

so each line is rounded exactly once (docs/architecture.md). A full period is billed at exactly
``amount`` (rounded to minor units). Because each line is rounded once, the prorated parts
of a period add up to the full-period amount within half a minor unit per line.

**Days of service.** A day is served when it lies between ``start`` and the last day
(``end``, or ``cancel_date`` when earlier), and no :class:`~syncd.core.interfaces.Pause`
covers it.

**Facts and what a period knows.** Upgrades and downgrades
(:class:`~syncd.core.interfaces.AmountChange`), pauses and a cancellation are *facts*, each
recorded at a moment (``recorded_at``, by default the start of its first affected day in
the client's zone). Facts are ordered by that moment, then by their place in the
engagement (changes, pauses, cancellation). The amount on a day is that of the change
with the latest ``effective`` date on or before the day (among equal dates, the one
recorded last), else the engagement's ``amount``.

A period invoice prices its days with the facts recorded up to its issue moment
(:func:`syncd.core.periods.issued_at`). Each fact recorded after a period was issued
*settles* that period: it bills the difference its own arrival makes to the period's
days, so a period is always billed, in the end, exactly once per served day at the amount
that day finally carries. The difference of one fact has one sign over all days: an
upgrade invoices the prorated difference for the rest of the period; a downgrade, a pause
or a cancellation credits the unused part.

Consequences: in advance, a mid-period upgrade recorded after the period was invoiced
gives an ``engagement_changed`` invoice for the remaining days, and a cancellation a
credit note for the unused days; in arrears, a change recorded inside the period is simply
priced into that period's invoice. Periods issued before ``billing_start`` are taken to
have been invoiced by other means on the terms known then. Facts are history: removing or
editing a fact already settled is not supported (record a new change instead).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Literal
from zoneinfo import ZoneInfo

from syncd.core.errors import ValidationFailed
from syncd.core.interfaces import AmountChange, Engagement, InvoiceLine, LineKind, Pause
from syncd.core.money import round_money
from syncd.core.periods import Period, grid_of, issued_at, service_start, start_of_day


def prorate(amount: Decimal, days: int, days_in_period: int, currency: str) -> Decimal:
    """``amount × days / days_in_period``, rounded half-up once to ``currency``'s minor units.

    Raises:
        ValueError: ``days`` is negative or more than ``days_in_period``.
    """
    if not 0 <= days <= days_in_period:
        raise ValueError(f"{days} days do not fit in a period of {days_in_period}")
    return round_money(amount * days / days_in_period, currency)


@dataclass(frozen=True, kw_only=True)
class Fact:
    """Something recorded about a recurring engagement that changes what its days cost.

    Attributes:
        recorded_at: when it was recorded at the source.
        rank: its place in the engagement (ties of ``recorded_at`` are broken by it).
        occurrence: the occurrence of its ``engagement_changed`` event:
            ``change:<version>``, ``pause:<start>/<end>`` or ``cancel:<last day>``.
        subject: the change, the pause, or the last day of service of a cancellation.
    """

    recorded_at: datetime
    rank: int
    occurrence: str
    subject: AmountChange | Pause | date


def facts_of(engagement: Engagement, timezone: str) -> tuple[Fact, ...]:
    """The engagement's facts in the order they became known."""
    facts = [
        Fact(
            recorded_at=change.recorded_at or start_of_day(change.effective, timezone),
            rank=rank,
            occurrence=f"change:{change.version}",
            subject=change,
        )
        for rank, change in enumerate(engagement.amount_changes)
    ]
    facts += [
        Fact(
            recorded_at=pause.recorded_at or start_of_day(pause.start, timezone),
            rank=len(facts) + rank,
            occurrence=f"pause:{pause.start.isoformat()}/{pause.end.isoformat()}",
            subject=pause,
        )
        for rank, pause in enumerate(engagement.pauses)
    ]
    if engagement.cancel_date is not None:
        facts.append(
            Fact(
                recorded_at=engagement.cancelled_at or start_of_day(engagement.cancel_date, timezone),
                rank=len(facts),
                occurrence=f"cancel:{engagement.cancel_date.isoformat()}",
                subject=engagement.cancel_date,
            )
        )
    return tuple(sorted(facts, key=lambda fact: (fact.recorded_at, fact.rank)))


@dataclass(frozen=True, kw_only=True)
class Terms:
    """What is known about a recurring engagement at one moment: amounts and served days.

    Attributes:
        base: the amount before any change.
        changes: the known changes, in the order they became known.
        pauses: the known pauses.
        first: first day of service.
        last: last day of service (``None``: open-ended).
    """

    base: Decimal
    changes: tuple[AmountChange, ...]
    pauses: tuple[Pause, ...]
    first: date
    last: date | None

    def amount_on(self, day: date) -> Decimal:
        """The amount per cycle in force on ``day``."""
        applicable = [(change.effective, rank, change.amount) for rank, change in enumerate(self.changes)]
        in_force = [item for item in applicable if item[0] <= day]
        return max(in_force)[2] if in_force else self.base

    def serves(self, day: date) -> bool:
        """Whether ``day`` is a day of service."""
        if day < self.first or (self.last is not None and day > self.last):
            return False
        return not any(pause.start <= day <= pause.end for pause in self.pauses)

    def price_on(self, day: date) -> Decimal:
        """The amount per cycle ``day`` is billed at: 0 when it is not served."""
        return self.amount_on(day) if self.serves(day) else Decimal(0)


def terms_from(engagement: Engagement, facts: Iterable[Fact]) -> Terms:
    """The terms known once ``facts`` (in the order they became known) are.

    Raises:
        ValidationFailed: the engagement has no ``amount`` or no ``start``.
    """
    if engagement.amount is None:
        raise ValidationFailed("a recurring engagement needs an amount", place=f"engagement {engagement.key}: amount")
    known = tuple(facts)
    last = engagement.end
    for fact in known:
        if isinstance(fact.subject, date):
            last = fact.subject if last is None else min(last, fact.subject)
    return Terms(
        base=engagement.amount,
        changes=tuple(fact.subject for fact in known if isinstance(fact.subject, AmountChange)),
        pauses=tuple(fact.subject for fact in known if isinstance(fact.subject, Pause)),
        first=service_start(engagement),
        last=last,
    )


def terms_at(engagement: Engagement, moment: datetime, timezone: str) -> Terms:
    """The terms known at ``moment``: the facts recorded at or before it."""
    return terms_from(engagement, (fact for fact in facts_of(engagement, timezone) if fact.recorded_at <= moment))


@dataclass(frozen=True, kw_only=True)
class Span:
    """Days of one period billed (or settled) at one amount per cycle.

    Attributes:
        amount: the amount per cycle the days are billed at (for a settlement, the
            difference, positive or negative).
        days: how many days.
        first / last: the first and last of them.
        was / now: for a settlement, the amount per cycle before and after.
    """

    amount: Decimal
    days: int
    first: date
    last: date
    was: Decimal = Decimal(0)
    now: Decimal = Decimal(0)


def _spans(pairs: Iterable[tuple[date, Decimal, Decimal]]) -> list[Span]:
    """Days grouped by (was, now), ignoring days whose price did not change."""
    groups: dict[tuple[Decimal, Decimal], list[date]] = {}
    for day, was, now in pairs:
        if was != now:
            groups.setdefault((was, now), []).append(day)
    spans = [
        Span(amount=now - was, days=len(days), first=days[0], last=days[-1], was=was, now=now)
        for (was, now), days in groups.items()
    ]
    return sorted(spans, key=lambda span: (span.first, span.was, span.now))


def billed_spans(period: Period, terms: Terms) -> list[Span]:
    """The spans a period invoice bills under ``terms``: served days grouped by amount."""
    return _spans((day, Decimal(0), terms.price_on(day)) for day in period.dates())


def settled_spans(period: Period, before: Terms, after: Terms) -> list[Span]:
    """What one fact changes in a period: days whose price differs, grouped by (was, now)."""
    return _spans((day, before.price_on(day), after.price_on(day)) for day in period.dates())


def span_line(span: Span, period: Period, *, name: str, currency: str) -> InvoiceLine:
    """The invoice line of a span: one unit at the prorated absolute amount.

    Its kind (:data:`~syncd.core.interfaces.LineKind`) says what it bills: a whole period
    (``period``), part of one (``proration``), the days a pause or cancellation leaves
    unused (``credit``), or an upgrade or downgrade of days already billed
    (``adjustment``).
    """
    price = prorate(abs(span.amount), span.days, period.days, currency)
    return InvoiceLine(
        description=_describe(span, period, name, currency),
        quantity=Decimal(1),
        unit_price=price,
        kind=_kind(span, period),
    )


def _kind(span: Span, period: Period) -> LineKind:
    if span.was == 0:
        return "period" if span.days == period.days else "proration"
    return "credit" if span.now == 0 else "adjustment"


def _describe(span: Span, period: Period, name: str, currency: str) -> str:
    dates = f"{span.first.isoformat()} – {span.last.isoformat()}"
    share = "" if span.days == period.days else f", {span.days} of {period.days} days"
    if span.was == 0:
        return f"{name}: {dates}{share}"
    if span.now == 0:
        return f"{name}: {dates}{share} not used (credit)"
    was, now = round_money(span.was, currency), round_money(span.now, currency)
    change = "upgrade" if span.now > span.was else "downgrade"
    return f"{name}: {change} from {was} to {now} {currency} per period, {dates}{share}"


@dataclass(frozen=True, kw_only=True)
class Settlement:
    """What one fact settles for the periods invoiced before it was recorded.

    Attributes:
        fact: the fact.
        direction: ``invoice`` for more to bill, ``credit`` for less.
        lines: one line per period and span, amounts positive.
    """

    fact: Fact
    direction: Literal["invoice", "credit"]
    lines: tuple[InvoiceLine, ...]


def settlements(engagement: Engagement, timezone: str) -> list[Settlement]:
    """Every fact's settlement of the periods issued before it was recorded (non-zero ones).

    Raises:
        ValidationFailed: see :func:`terms_from` and :func:`syncd.core.periods.grid_of`.
    """
    facts = facts_of(engagement, timezone)
    found = (_settlement(engagement, timezone, facts[:position], fact) for position, fact in enumerate(facts))
    return [settlement for settlement in found if settlement is not None]


def _settlement(engagement: Engagement, timezone: str, before: tuple[Fact, ...], fact: Fact) -> Settlement | None:
    was, now = terms_from(engagement, before), terms_from(engagement, (*before, fact))
    spans = [
        (period, span)
        for period in issued_before(engagement, fact.recorded_at, timezone)
        for span in settled_spans(period, was, now)
    ]
    lines = [span_line(span, period, name=engagement.name, currency=engagement.currency) for period, span in spans]
    if not any(line.unit_price for line in lines):
        return None
    # One fact moves every day's price the same way (see the module docstring), so the
    # first span's sign is the settlement's.
    direction: Literal["invoice", "credit"] = "invoice" if spans[0][1].amount > 0 else "credit"
    return Settlement(fact=fact, direction=direction, lines=tuple(line for line in lines if line.unit_price))


def issued_before(engagement: Engagement, moment: datetime, timezone: str) -> list[Period]:
    """The periods of planned service whose issue moment is before ``moment``, in order."""
    grid = grid_of(engagement)
    last = grid.index_of(moment.astimezone(ZoneInfo(timezone)).date())
    periods = []
    for index in range(grid.index_of(service_start(engagement)), last + 1):
        period = grid.period(index)
        issued = issued_at(engagement, period, timezone)
        if issued is not None and issued < moment and (engagement.end is None or period.start <= engagement.end):
            periods.append(period)
    return periods


def with_history(
    previous: Engagement | None, current: Engagement, *, recorded_at: datetime, effective: date
) -> Engagement:
    """``current`` carrying the amount history of ``previous``, plus the change it makes.

    The mapping yields an engagement's current ``amount``; the amount history that
    proration needs (``amount_changes``) is kept by the caller from one mapping to the
    next. When ``current.amount`` differs from the amount ``previous`` has in force on
    ``effective``, an :class:`~syncd.core.interfaces.AmountChange` is appended whose version is
    ``current.source_version``. A ``current`` that already carries a history (mapped from
    the source) or has no predecessor is returned as it is.

    Args:
        previous: the engagement as last stored, or ``None``.
        current: the engagement as just mapped.
        recorded_at: when the source recorded the change (its modification time).
        effective: first day the new amount applies, in the client's zone.
    """
    if previous is None or previous.amount is None or current.amount is None or current.amount_changes:
        return current
    history = previous.amount_changes
    known = max(
        (
            (change.effective, rank, change.amount)
            for rank, change in enumerate(history)
            if change.effective <= effective
        ),
        default=(effective, -1, previous.amount),
    )[2]
    if known != current.amount:
        change = AmountChange(
            version=current.source_version, effective=effective, amount=current.amount, recorded_at=recorded_at
        )
        history = (*history, change)
    return current.model_copy(update={"amount": previous.amount, "amount_changes": history})
