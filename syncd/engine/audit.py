"""The monthly audit: late invoices, hand corrections, the overdue share, and how fast syncd issues.

A month is a calendar month in the company's zone (``[daemon].timezone``). For month M:

* **late invoices**: of the invoices *issued* in M (the first time the ledger held them
  approved, ``invoices.issued_at``: at once for an invoice created approved, when a poll
  or webhook first reads a draft approved), those issued more than
  ``[audit].late_after_h`` hours after their trigger (``invoices.triggered_at``: when the
  deal was won, the period fell due ...). A pipeline's ``invoice_delay_s`` counts toward
  the hours and is shown beside each late invoice. The worst ones are listed with their
  deal and delay.
* **hand corrections**: of the invoices issued in M, those changed at the ledger by hand
  since syncd sent them (:mod:`syncd.store.trail`), counted once per invoice, and per class of
  change (lines, amounts, terms, contact, tax, reference, credit_note, void).
* **overdue share**: of the invoices whose due date falls in M (voided ones and drafts
  left out), those not fully paid by their due date (``invoices.paid_on`` after it, or
  not paid), by count and, per currency, by amount (their totals).
* **latency**: trigger → issued for the invoices issued in M, median and 95th
  percentile (nearest rank: the smallest value with at least 95 % of them at or below it).

Credit notes are not invoices and are left out of every number. The months before M are
shown beside it (``[audit].months`` in all); each of the three shares (late, corrected,
overdue by count) is flagged **rising** when Share(M-2) < Share(M-1) < Share(M); when one of
those months has nothing to count, the flag says **not enough history**.

``syncd audit --month 2026-11`` prints it (table, JSON or CSV; the table with a text plot
of the months' shares, :func:`plot_lines`, on a terminal or with ``--plot``); ``/metrics``
has the numbers of the last complete month (:func:`gauges`); the scheduler runs it once
after each month closes (:func:`run_monthly`), logs it (``audit_report``), records an
alert (the ``pending_alerts`` hook) for each rising share, and queues the whole report
for the alerts webhook as one message (:func:`report_message`). docs/operations.md, "Audit".
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
import structlog

from syncd.core.interfaces import BillingEventKind, InvoiceState
from syncd.engine.alerts import SECTION_MAX, clip, escape, record
from syncd.store.db import BillingEventRow, InvoiceRow, InvoiceTrailRow, Store, table_of
from syncd.store.trail import CLASSES

if TYPE_CHECKING:
    from syncd.engine.runtime import Runtime
    from syncd.plumbing.settings import Config

log = structlog.get_logger("syncd.engine.audit")

NUMBERS = ("late", "corrected", "overdue")
"""The shares whose trend is flagged."""
RISING = "rising"
STEADY = "not rising"
NO_HISTORY = "not enough history"
DELAYED_KINDS = frozenset({str(BillingEventKind.DEAL_WON), str(BillingEventKind.DELIVERABLE_ACCEPTED)})
METRICS_TTL_S = 300  # /metrics recomputes the audit at most every 5 minutes


# ---------------------------------------------------------------------------
# Months
# ---------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Month:
    """A calendar month (``2026-11``)."""

    year: int
    month: int

    @classmethod
    def parse(cls, text: str) -> Month:
        """``YYYY-MM`` as a month.

        Raises:
            ValueError: not a month.
        """
        try:
            year, month = (int(part) for part in text.strip().split("-"))
            return cls(year, month) if 1 <= month <= 12 and 1970 <= year <= 9999 else cls._bad(text)
        except ValueError:
            return cls._bad(text)

    @staticmethod
    def _bad(text: str) -> Month:
        raise ValueError(f"{text!r} is not a month; expected YYYY-MM, e.g. 2026-11")

    @classmethod
    def of(cls, day: date) -> Month:
        """The month ``day`` falls in."""
        return cls(day.year, day.month)

    @classmethod
    def last_complete(cls, now: datetime, zone: str) -> Month:
        """The month before the one ``now`` falls in, in ``zone``."""
        return cls.of(now.astimezone(ZoneInfo(zone)).date()).before()

    def before(self, months: int = 1) -> Month:
        """The month ``months`` before this one."""
        index = self.year * 12 + self.month - 1 - months
        return Month(index // 12, index % 12 + 1)

    def first_day(self) -> date:
        """Its first day."""
        return date(self.year, self.month, 1)

    def start(self, zone: str) -> datetime:
        """Its first instant in ``zone`` (aware)."""
        return datetime.combine(self.first_day(), datetime.min.time(), tzinfo=ZoneInfo(zone))

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"


def _month_in(moment: datetime, zone: str) -> Month:
    return Month.of(moment.astimezone(ZoneInfo(zone)).date())


# ---------------------------------------------------------------------------
# The numbers of one month (pure)
# ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Issued:
    """What the audit needs of one invoice.

    Attributes:
        key: the billing event key.
        number: the ledger's number.
        deal: the CRM deal id.
        client_key: the client.
        state: its state now.
        currency / total: its currency and total.
        triggered_at / issued_at: its trigger and first approved time (``None``: never issued).
        due_date / paid_on: when it was due and fully paid.
        configured_delay_s: the pipeline's ``invoice_delay_s`` that applied to it (0 if none).
        corrections: the classes of its hand corrections (empty: none).
    """

    key: str
    number: str | None
    deal: str
    client_key: str
    state: str
    currency: str
    total: Decimal
    triggered_at: datetime
    issued_at: datetime | None
    due_date: date | None
    paid_on: date | None
    configured_delay_s: int = 0
    corrections: frozenset[str] = frozenset()

    @property
    def delay_s(self) -> float | None:
        """Seconds from trigger to issue."""
        return None if self.issued_at is None else (self.issued_at - self.triggered_at).total_seconds()


@dataclass(frozen=True, kw_only=True)
class Currency:
    """The overdue share of one currency, by amount."""

    due: int
    overdue: int
    due_amount: Decimal
    overdue_amount: Decimal

    @property
    def amount_share(self) -> Decimal | None:
        """The overdue amount over the amount due (``None`` when nothing was due)."""
        return self.overdue_amount / self.due_amount if self.due_amount else None


@dataclass(frozen=True, kw_only=True)
class MonthNumbers:
    """The audit's numbers for one month.

    Attributes:
        month: the month.
        issued: invoices issued in it.
        late: how many of them were late; worst: the latest, worst first.
        corrected: how many of them were corrected by hand; classes: per class, how many.
        due: invoices due in it; overdue: how many were not fully paid by their due date;
        currencies: the same per currency, with amounts.
        latency_median_s / latency_p95_s: trigger → issued of the invoices issued in it.
    """

    month: Month
    issued: int
    late: int
    worst: tuple[Issued, ...]
    corrected: int
    classes: Mapping[str, int]
    due: int
    overdue: int
    currencies: Mapping[str, Currency]
    latency_median_s: float | None
    latency_p95_s: float | None

    def share(self, number: str) -> Decimal | None:
        """The share of ``number`` (``late``, ``corrected`` or ``overdue``); ``None`` with nothing to count."""
        part, whole = {
            "late": (self.late, self.issued),
            "corrected": (self.corrected, self.issued),
            "overdue": (self.overdue, self.due),
        }[number]
        return Decimal(part) / Decimal(whole) if whole else None


def p95(values: Sequence[float]) -> float | None:
    """The nearest-rank 95th percentile: the ``ceil(0.95·n)``-th smallest value."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[math.ceil(0.95 * len(ordered)) - 1]


def month_numbers(
    invoices: Iterable[Issued], month: Month, *, zone: str, late_after_s: float, worst: int
) -> MonthNumbers:
    """The numbers of ``month`` over ``invoices`` (every invoice that may count; the rest are ignored)."""
    rows = list(invoices)
    issued = [i for i in rows if i.issued_at is not None and _month_in(i.issued_at, zone) == month]
    late = sorted((i for i in issued if (i.delay_s or 0) > late_after_s), key=lambda i: (-(i.delay_s or 0), i.key))
    corrected = [i for i in issued if i.corrections]
    due = [
        i
        for i in rows
        if i.due_date is not None
        and Month.of(i.due_date) == month
        and i.issued_at is not None
        and i.state != str(InvoiceState.VOIDED)
    ]
    overdue = [i for i in due if i.paid_on is None or (i.due_date is not None and i.paid_on > i.due_date)]
    currencies = {
        code: Currency(
            due=sum(1 for i in due if i.currency == code),
            overdue=sum(1 for i in overdue if i.currency == code),
            due_amount=sum((i.total for i in due if i.currency == code), Decimal(0)),
            overdue_amount=sum((i.total for i in overdue if i.currency == code), Decimal(0)),
        )
        for code in sorted({i.currency for i in due})
    }
    delays = [i.delay_s for i in issued if i.delay_s is not None]
    return MonthNumbers(
        month=month,
        issued=len(issued),
        late=len(late),
        worst=tuple(late[:worst]),
        corrected=len(corrected),
        classes={kind: sum(1 for i in corrected if kind in i.corrections) for kind in CLASSES},
        due=len(due),
        overdue=len(overdue),
        currencies=currencies,
        latency_median_s=statistics.median(delays) if delays else None,
        latency_p95_s=p95(delays),
    )


def trend(history: Sequence[MonthNumbers], number: str) -> str:
    """``rising`` when the share grew over the last three months, ``not rising``, or ``not enough history``."""
    if len(history) < 3:
        return NO_HISTORY
    shares = [share for month in history[-3:] if (share := month.share(number)) is not None]
    if len(shares) < 3:
        return NO_HISTORY
    two, one, now = shares
    return RISING if two < one < now else STEADY


@dataclass(frozen=True, kw_only=True)
class Report:
    """The audit of one month, with the months before it.

    Attributes:
        month: the month audited.
        zone: the company's zone its months are counted in.
        late_after_h: the lateness threshold.
        delays: each pipeline's configured ``invoice_delay_s`` (``crm→invoicing``).
        history: the months shown, oldest first; the last is ``month``.
        trends: per number of :data:`NUMBERS`, its flag.
    """

    month: Month
    zone: str
    late_after_h: float
    delays: Mapping[str, int]
    history: tuple[MonthNumbers, ...]
    trends: Mapping[str, str] = field(default_factory=dict)

    @property
    def current(self) -> MonthNumbers:
        """The numbers of the month audited."""
        return self.history[-1]

    def as_json(self) -> dict[str, Any]:
        """The report as a JSON object (shares as decimal text, seconds as numbers)."""
        return {
            "month": str(self.month),
            "timezone": self.zone,
            "late_after_h": self.late_after_h,
            "invoice_delay_s": dict(self.delays),
            "months": [_month_json(numbers) for numbers in self.history],
            "trends": dict(self.trends),
        }


def _share_text(share: Decimal | None) -> str | None:
    return None if share is None else str(share.quantize(Decimal("0.0001")))


def _month_json(numbers: MonthNumbers) -> dict[str, Any]:
    return {
        "month": str(numbers.month),
        "issued": numbers.issued,
        "late": numbers.late,
        "late_share": _share_text(numbers.share("late")),
        "worst": [
            {
                "invoice": item.number,
                "deal": item.deal,
                "client": item.client_key,
                "triggered_at": item.triggered_at.isoformat(),
                "issued_at": item.issued_at.isoformat() if item.issued_at else None,
                "delay_s": item.delay_s,
                "configured_delay_s": item.configured_delay_s,
            }
            for item in numbers.worst
        ],
        "corrected": numbers.corrected,
        "corrected_share": _share_text(numbers.share("corrected")),
        "corrections": dict(numbers.classes),
        "due": numbers.due,
        "overdue": numbers.overdue,
        "overdue_share": _share_text(numbers.share("overdue")),
        "currencies": {
            code: {
                "due": c.due,
                "overdue": c.overdue,
                "due_amount": str(c.due_amount),
                "overdue_amount": str(c.overdue_amount),
                "amount_share": _share_text(c.amount_share),
            }
            for code, c in numbers.currencies.items()
        },
        "latency_median_s": numbers.latency_median_s,
        "latency_p95_s": numbers.latency_p95_s,
    }


# ---------------------------------------------------------------------------
# From the database
# ---------------------------------------------------------------------------


async def load_invoices(store: Store, config: Config, since: datetime) -> list[Issued]:
    """Every invoice issued, or due, from ``since`` on, with its corrections and configured delay."""
    table = table_of(InvoiceRow)
    rows: list[InvoiceRow] = await store.select(
        InvoiceRow,
        table.c.kind == "invoice",
        sa.or_(table.c.issued_at >= since, table.c.due_date >= since.date()),
    )
    keys = [row.key for row in rows]
    trails = table_of(InvoiceTrailRow)
    events = table_of(BillingEventRow)
    corrections: dict[str, set[str]] = {}
    kinds: dict[str, str] = {}
    async with store.connect() as conn:
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            found = await conn.execute(
                sa.select(trails.c.invoice_key, trails.c.classes).where(
                    trails.c.kind == "correction", trails.c.invoice_key.in_(chunk)
                )
            )
            for key, classes in found:
                corrections.setdefault(str(key), set()).update(str(classes or "").split(","))
            found = await conn.execute(sa.select(events.c.key, events.c.kind).where(events.c.key.in_(chunk)))
            kinds.update({str(key): str(kind) for key, kind in found})
    delays = {(p.crm, p.invoicing): p.invoice_delay_s for p in config.settings.pipelines}
    return [
        Issued(
            key=row.key,
            number=row.number,
            deal=row.crm_object_id,
            client_key=row.client_key,
            state=row.state,
            currency=row.currency,
            total=Decimal(row.total),
            triggered_at=row.triggered_at,
            issued_at=row.issued_at,
            due_date=row.due_date,
            paid_on=row.paid_on,
            configured_delay_s=delays.get((row.crm_connection, row.invoicing_connection), 0)
            if kinds.get(row.key) in DELAYED_KINDS
            else 0,
            corrections=frozenset(kind for kind in corrections.get(row.key, ()) if kind),
        )
        for row in rows
    ]


async def build_report(store: Store, config: Config, month: Month) -> Report:
    """The audit of ``month``, with the ``[audit].months`` before it."""
    settings, zone = config.settings.audit, config.daemon.timezone
    months = [month.before(back) for back in range(settings.months - 1, -1, -1)]
    invoices = await load_invoices(store, config, months[0].start(zone))
    history = tuple(
        month_numbers(invoices, one, zone=zone, late_after_s=settings.late_after_h * 3600, worst=settings.worst)
        for one in months
    )
    return Report(
        month=month,
        zone=zone,
        late_after_h=settings.late_after_h,
        delays={f"{p.crm}→{p.invoicing}": p.invoice_delay_s for p in config.settings.pipelines},
        history=history,
        trends={number: trend(history, number) for number in NUMBERS},
    )


# ---------------------------------------------------------------------------
# Rendering: table rows and CSV
# ---------------------------------------------------------------------------


def _percent(share: Decimal | None) -> str:
    return "-" if share is None else f"{(share * 100).quantize(Decimal('0.1'))} %"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min"


def summary_rows(report: Report) -> list[list[str]]:
    """The table of the report: one row per number, one column per month, then the trend."""
    history = report.history

    def row(label: str, cells: Iterable[str], flag: str = "") -> list[str]:
        return [label, *cells, flag]

    rows = [
        row("invoices issued", (str(m.issued) for m in history)),
        row(
            f"late (> {report.late_after_h:g} h)",
            (f"{m.late} ({_percent(m.share('late'))})" for m in history),
            report.trends.get("late", ""),
        ),
        row(
            "corrected by hand",
            (f"{m.corrected} ({_percent(m.share('corrected'))})" for m in history),
            report.trends.get("corrected", ""),
        ),
    ]
    rows += [
        row(f"  {kind}", (str(m.classes.get(kind, 0)) for m in history))
        for kind in CLASSES
        if any(m.classes.get(kind) for m in history)
    ]
    rows.append(
        row(
            "overdue (of invoices due)",
            (f"{m.overdue}/{m.due} ({_percent(m.share('overdue'))})" for m in history),
            report.trends.get("overdue", ""),
        )
    )
    for code in sorted({code for m in history for code in m.currencies}):
        rows.append(
            row(
                f"  {code} by amount",
                (
                    f"{c.overdue_amount}/{c.due_amount} ({_percent(c.amount_share)})"
                    if (c := m.currencies.get(code)) is not None
                    else "-"
                    for m in history
                ),
            )
        )
    rows.append(row("trigger → issued, median", (_duration(m.latency_median_s) for m in history)))
    rows.append(row("trigger → issued, p95", (_duration(m.latency_p95_s) for m in history)))
    return rows


def worst_rows(report: Report) -> list[list[str]]:
    """The latest invoices of the month audited: invoice, deal, client, trigger, delay, configured delay."""
    return [
        [
            item.number or item.key,
            item.deal,
            item.client_key,
            item.triggered_at.astimezone(ZoneInfo(report.zone)).isoformat(timespec="minutes"),
            _duration(item.delay_s),
            f"{item.configured_delay_s} s",
        ]
        for item in report.current.worst
    ]


def as_csv(report: Report) -> str:
    """The report as CSV, one value a row: ``month,metric,key,value``."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["month", "metric", "key", "value"])
    for numbers in report.history:
        data = _month_json(numbers)
        for name in ("issued", "late", "late_share", "corrected", "corrected_share", "due", "overdue", "overdue_share"):
            writer.writerow([data["month"], name, "", _cell(data[name])])
        for kind, count in numbers.classes.items():
            writer.writerow([data["month"], "corrections", kind, count])
        for code, values in data["currencies"].items():
            for name, value in values.items():
                writer.writerow([data["month"], f"currency_{name}", code, _cell(value)])
        writer.writerow([data["month"], "latency_median_s", "", _cell(numbers.latency_median_s)])
        writer.writerow([data["month"], "latency_p95_s", "", _cell(numbers.latency_p95_s)])
    for item in report.current.worst:
        writer.writerow([str(report.month), "late_invoice", item.number or item.key, _cell(item.delay_s)])
    for number, flag in report.trends.items():
        writer.writerow([str(report.month), "trend", number, flag])
    return out.getvalue()


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


# ---------------------------------------------------------------------------
# The plot of the months, and the report as text
# ---------------------------------------------------------------------------

PLOT_WIDTH = 24  # characters of the longest bar
EIGHTHS = " ▏▎▍▌▋▊▉"  # a cell filled by 0/8 .. 7/8 (Unicode block elements U+258F..U+2589)
FULL = "█"
PLOT_LABELS = {"late": "late", "corrected": "corrected", "overdue": "overdue"}


def bar(share: Decimal, scale: Decimal, width: int = PLOT_WIDTH) -> str:
    """``share`` as a bar of ``width`` cells for ``scale`` (the longest bar), in eighths of a cell, rounded half-up."""
    if scale <= 0:
        return ""
    eighths = int((share / scale * width * 8).to_integral_value(rounding=ROUND_HALF_UP))
    full, rest = divmod(eighths, 8)
    return FULL * full + (EIGHTHS[rest] if rest else "")


def plot_lines(report: Report, width: int = PLOT_WIDTH) -> list[str]:
    """A text plot of the months' three shares: a bar per number and month, all to one scale.

    The longest bar is the largest share shown; each bar is followed by its percentage,
    and each number's last month by its trend flag. A month with nothing to count shows
    ``-``.
    """
    shares = [m.share(number) for number in NUMBERS for m in report.history]
    scale = max((share for share in shares if share is not None), default=Decimal(0))
    label_width = max(len(label) for label in PLOT_LABELS.values())
    lines = [f"shares by month (bars to one scale: full = {_percent(scale) if scale else '0 %'})"]
    for number in NUMBERS:
        for index, numbers in enumerate(report.history):
            share = numbers.share(number)
            label = PLOT_LABELS[number] if index == 0 else ""
            drawn = "-" if share is None else bar(share, scale, width) if scale else ""
            flag = f"  {report.trends.get(number, '')}" if index == len(report.history) - 1 else ""
            lines.append(
                f"{label:<{label_width}}  {numbers.month}  {drawn:<{width}}  {_percent(share):>7}{flag}".rstrip()
            )
    return lines


def text_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Rows as fixed-width text columns (the first left-aligned, the others right-aligned)."""
    table = [list(header), *(list(row) for row in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)).rstrip()
        for row in table
    ]


def summary_text(report: Report) -> str:
    """One line: the month's three shares and latency, with their trends (a notification's text)."""
    now = report.current
    parts = [
        f"late {now.late}/{now.issued} ({_percent(now.share('late'))}) {report.trends.get('late', '')}",
        f"corrected {now.corrected}/{now.issued} ({_percent(now.share('corrected'))}) "
        f"{report.trends.get('corrected', '')}",
        f"overdue {now.overdue}/{now.due} ({_percent(now.share('overdue'))}) {report.trends.get('overdue', '')}",
        f"trigger → issued median {_duration(now.latency_median_s)}, p95 {_duration(now.latency_p95_s)}",
    ]
    return f"Audit {report.month}: " + "; ".join(parts)


def report_message(report: Report) -> dict[str, Any]:
    """The whole report as one Slack incoming-webhook message (:mod:`syncd.engine.alerts` has the format's limits).

    A header, the summary line, the table of the months (a code block, as ``syncd audit``
    prints it), the plot of the three shares, the latest invoices, and where to look further.
    """
    delays = ", ".join(f"{name} {delay} s" for name, delay in report.delays.items()) or "-"
    header = ["", *(str(m.month) for m in report.history), "trend"]
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": f"syncd: audit of {report.month}"}},
        _section(f"{summary_text(report)}\nMonths in {report.zone}; invoice_delay_s: {delays}."),
        _section(_code(text_table(header, summary_rows(report)))),
        _section(_code(plot_lines(report))),
    ]
    worst = worst_rows(report)
    if worst:
        late = text_table(["late invoice", "deal", "client", "triggered", "delay", "invoice_delay_s"], worst)
        blocks.append(_section("*Latest invoices*\n" + _code(late)))
    hint = f"`syncd audit --month {report.month}` (`--format csv` exports it); `syncd invoice show NUMBER`"
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": hint}]})
    return {"text": summary_text(report), "blocks": blocks}


def _code(lines: Sequence[str]) -> str:
    return "```\n" + "\n".join(lines) + "\n```"


def _section(text: str) -> dict[str, Any]:
    """A Block Kit section of mrkdwn text, escaped and within its 3000 characters."""
    return {"type": "section", "text": {"type": "mrkdwn", "text": clip(escape(text), SECTION_MAX)}}


# ---------------------------------------------------------------------------
# /metrics and the monthly run
# ---------------------------------------------------------------------------


def gauges(report: Report) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The report's numbers as gauge values, by (name, labels)."""
    now = report.current
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {
        ("syncd_audit_invoices", (("what", what),)): float(count)
        for what, count in (
            ("issued", now.issued),
            ("late", now.late),
            ("corrected", now.corrected),
            ("due", now.due),
            ("overdue", now.overdue),
        )
    }
    values[("syncd_audit_month_info", (("month", str(report.month)),))] = 1.0
    for number in NUMBERS:
        share = now.share(number)
        if share is not None:
            values[("syncd_audit_share", (("number", number),))] = float(share)
        values[("syncd_audit_trend_rising", (("number", number),))] = 1.0 if report.trends[number] == RISING else 0.0
        values[("syncd_audit_history_complete", (("number", number),))] = (
            0.0 if report.trends[number] == NO_HISTORY else 1.0
        )
    for code, currency in now.currencies.items():
        if currency.amount_share is not None:
            values[("syncd_audit_overdue_amount_share", (("currency", code),))] = float(currency.amount_share)
    for quantile, seconds in (("0.5", now.latency_median_s), ("0.95", now.latency_p95_s)):
        if seconds is not None:
            values[("syncd_audit_latency_seconds", (("quantile", quantile),))] = seconds
    return values


async def latest(runtime: Runtime) -> Report:
    """The audit of the last complete month, recomputed at most every :data:`METRICS_TTL_S` (for ``/metrics``)."""
    now = runtime.clock()
    month = Month.last_complete(now, runtime.config.daemon.timezone)
    cached = runtime.extra.get("audit_report")
    if isinstance(cached, tuple) and cached[1].month == month and (now - cached[0]).total_seconds() < METRICS_TTL_S:
        report: Report = cached[1]
        return report
    report = await build_report(runtime.store, runtime.config, month)
    runtime.extra["audit_report"] = (now, report)
    return report


async def run_monthly(runtime: Runtime) -> Report | None:
    """Once per month across replicas, after the month closes: log its audit, raise alerts for rising
    shares, and queue the whole report for the alerts webhook (one message of its own, key
    ``audit_report:YYYY-MM``; :class:`syncd.engine.alerts.AlertSender` posts it, retried, never blocking).

    Returns:
        the report, or ``None`` when another replica (or an earlier run) had the month.
    """
    now = runtime.clock()
    month = Month.last_complete(now, runtime.config.daemon.timezone)
    if not await runtime.store.claim_tick("audit", str(month), owner=runtime.owner, now=now):
        return None
    report = await build_report(runtime.store, runtime.config, month)
    numbers = report.current
    log.info(
        "audit_report",
        month=str(month),
        issued=numbers.issued,
        late=numbers.late,
        late_share=_share_text(numbers.share("late")),
        corrected=numbers.corrected,
        corrected_share=_share_text(numbers.share("corrected")),
        due=numbers.due,
        overdue=numbers.overdue,
        overdue_share=_share_text(numbers.share("overdue")),
        latency_median_s=numbers.latency_median_s,
        latency_p95_s=numbers.latency_p95_s,
        trends=dict(report.trends),
    )
    for number, flag in report.trends.items():
        if flag != RISING:
            continue
        shares = [_percent(m.share(number)) for m in report.history[-3:]]
        await runtime.store.add_alert(
            key=f"audit:{month}:{number}",
            source="audit",
            title=f"Audit {month}: the {number} share rose two months running",
            text=f"The share of {number} invoices rose from {shares[0]} to {shares[1]} to {shares[2]} "
            f"({', '.join(str(m.month) for m in report.history[-3:])}); `syncd audit --month {month}` has the details.",
            fields={"month": str(month), "number": number, "shares": shares},
            now=now,
        )
        log.warning("audit_trend_rising", month=str(month), number=number, shares=shares)
    await record(
        runtime.store,
        kind="audit_report",
        key=f"audit_report:{month}",
        title=f"Audit {month}",
        detail=summary_text(report),
        now=now,
        body=report_message(report),
    )
    return report
