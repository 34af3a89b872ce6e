"""The invoice trail, hand corrections and the monthly audit, end to end against the emulators.

A hand edit is made at the Xero emulator as a user would (``XeroEmulator.edit_invoice``,
or Xero's own API for documents a person creates); syncd learns of it from the signed
webhook. The audit over a seeded history of several months is checked against numbers
the test computes from its own plan, not from syncd's tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import logging
import math
import os
import pty
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import structlog
from click.testing import Result
from typer.testing import CliRunner

from syncd.cli.main import app
from syncd.engine import audit, scheduler
from syncd.engine.audit import Month
from syncd.store.db import InvoiceRow, InvoiceTrailRow, PendingAlertRow, table_of
from syncd.store.trail import invoice_trail
from tests.harness import MAPPING, Stack, seed_company, seed_deal, stack

NEW_YORK = ZoneInfo("America/New_York")  # the harness's [daemon].timezone


class Clock:
    """One clock for the daemon and the emulators; the test moves it."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


START = 'billing_start = "2026-07-01T00:00:00+00:00"'


def _invoke(*args: str) -> Result:
    saved, handlers = structlog.get_config(), logging.root.handlers[:]
    try:
        return CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})
    finally:
        structlog.configure(**saved)
        logging.root.handlers[:] = handlers


async def cli(*args: str) -> Result:
    """``syncd ARGS`` in a thread (the command runs its own event loop), 250 columns wide."""
    return await asyncio.to_thread(_invoke, *args)


async def win(s: Stack, deal: str) -> None:
    await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
    await s.drain()


def xero_invoice(s: Stack, number: str) -> dict[str, Any]:
    return next(invoice for invoice in s.xero.invoices() if invoice["InvoiceNumber"] == number)


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime(2026, 11, 3, 15, 0, tzinfo=UTC))


async def test_an_invoice_edited_by_hand_at_xero_is_a_correction_classified_by_what_changed(
    tmp_path: Path, db_url: str, clock: Clock
) -> None:
    """A line's price and the due date changed at Xero are one correction (amounts, terms); a payment is not."""
    async with stack(tmp_path, db_url, clock=clock, daemon_extra=START) as s:
        await win(s, seed_deal(s.hub))
        (sent,) = s.xero.invoices()
        lines = [dict(line) for line in sent["LineItems"]]
        lines[1]["UnitAmount"] = Decimal("2300.00")
        clock.at += timedelta(hours=3)
        await s.xero.edit_invoice(sent["InvoiceID"], {"LineItems": lines, "DueDate": "2026-11-30"})
        await s.drain()
        clock.at += timedelta(hours=1)
        await s.xero.pay_invoice(sent["InvoiceID"], Decimal(str(xero_invoice(s, "INV-0001")["AmountDue"])))
        await s.drain()

        store = s.daemon.runtime.store
        found = await invoice_trail(store, "INV-0001")
        steps = [(step.what, step.actor) for step in found.steps]
        assert steps[:4] == [("trigger", "source"), ("billing_event", "syncd"), ("queued", "syncd"), ("sent", "syncd")]
        (correction,) = [step for step in found.steps if step.what == "correction"]
        assert correction.actor == "person"
        assert "(amounts, terms)" in correction.summary
        assert "line 2 unit_price 2500.0000 → 2300.0000" in correction.summary
        assert "due_date 2026-11-17 → 2026-11-30" in correction.summary
        assert [step.summary.split(";")[0] for step in found.steps if step.what == "status"] == ["authorised → paid"]
        assert found.invoice.paid_on == clock.at.astimezone(NEW_YORK).date()
        sent_step = next(step for step in found.steps if step.what == "sent")
        assert sent_step.detail["sent"]["draft"]["lines"][1]["unit_price"] == "2500.00"

        result = await cli("audit", "--month", "2026-11", "--format", "json", "--config", str(s.config.path))
        assert result.exit_code == 0, result.output
        november = json.loads(result.output)["months"][-1]
        assert (november["issued"], november["corrected"], november["corrected_share"]) == (1, 1, "1.0000")
        assert {k: v for k, v in november["corrections"].items() if v} == {"amounts": 1, "terms": 1}

        shown = await cli("invoice", "show", "INV-0001", "--config", str(s.config.path))
        assert shown.exit_code == 0, shown.output
        assert "corrected at the ledger (amounts, terms)" in shown.output


@contextlib.asynccontextmanager
async def _xero_api(s: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """Xero's Accounting API as another app of the organisation would call it (a person's edits)."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=s.xero.app), base_url="http://xero.test") as raw:
        token = await raw.post(
            "/connect/token",
            data={"grant_type": "client_credentials"},
            auth=(s.xero.client_id, s.xero.client_secret),
        )
        token.raise_for_status()
        headers = {"Authorization": f"Bearer {token.json()['access_token']}", "Accept": "application/json"}
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=s.xero.app), base_url="http://xero.test/api.xro/2.0", headers=headers
        ) as api:
            yield api


async def test_a_hand_void_with_a_reissue_and_a_hand_credit_note_are_corrections_of_the_original(
    tmp_path: Path, db_url: str, clock: Clock
) -> None:
    """Voided at Xero by a person and issued again: a correction (void) with its reissue linked; a credit note
    a person applies to another syncd invoice is a correction (credit_note) of that invoice."""
    async with stack(tmp_path, db_url, clock=clock, daemon_extra=START) as s:
        company = seed_company(s.hub)
        await win(s, seed_deal(s.hub, company=company))
        await win(s, seed_deal(s.hub, company=company))
        first, second = s.xero.invoices()
        contact = first["Contact"]["ContactID"]
        lines = [{"Description": "Website rebuild", "Quantity": 1, "UnitAmount": 12000, "AccountCode": "200"}]
        clock.at += timedelta(days=1)
        await s.xero.edit_invoice(first["InvoiceID"], {"Status": "VOIDED"})
        await s.drain()
        async with _xero_api(s) as api:
            made = await api.put(
                "/Invoices",
                json={
                    "Invoices": [
                        {
                            "Type": "ACCREC",
                            "Contact": {"ContactID": contact},
                            "CurrencyCode": "USD",
                            "Status": "AUTHORISED",
                            "Date": "2026-11-04",
                            "DueDate": "2026-11-18",
                            "LineItems": lines,
                        }
                    ]
                },
            )
            made.raise_for_status()
            reissue = made.json()["Invoices"][0]
            note = await api.put(
                "/CreditNotes",
                json={
                    "CreditNotes": [
                        {
                            "Type": "ACCRECCREDIT",
                            "Contact": {"ContactID": contact},
                            "CurrencyCode": "USD",
                            "Status": "AUTHORISED",
                            "Date": "2026-11-04",
                            "LineItems": [{**lines[0], "UnitAmount": 500}],
                        }
                    ]
                },
            )
            note.raise_for_status()
            credit = note.json()["CreditNotes"][0]
            allocated = await api.put(
                f"/CreditNotes/{credit['CreditNoteID']}/Allocations",
                json={
                    "Allocations": [
                        {"Invoice": {"InvoiceID": second["InvoiceID"]}, "Amount": 550, "Date": "2026-11-04"}
                    ]
                },
            )
            allocated.raise_for_status()
        await s.xero.send_event("INVOICE", "CREATE", reissue["InvoiceID"])
        await s.xero.send_event("INVOICE", "UPDATE", second["InvoiceID"])
        await s.drain()

        voided = await invoice_trail(s.daemon.runtime.store, first["InvoiceNumber"])
        assert [(step.what, step.summary) for step in voided.steps if step.what in ("correction", "reissue")] == [
            ("correction", "voided at the ledger by hand"),
            ("reissue", f"reissued by hand as {reissue['InvoiceNumber']} (13200.00 USD) after the hand void"),
        ]
        credited = await invoice_trail(s.daemon.runtime.store, second["InvoiceNumber"])
        (correction,) = [step for step in credited.steps if step.what == "correction"]
        assert correction.summary.startswith("corrected at the ledger (credit_note)")
        rows = await s.daemon.runtime.store.select(InvoiceTrailRow, table_of(InvoiceTrailRow).c.kind == "correction")
        assert sorted(row.classes for row in rows) == ["credit_note", "void"]


async def test_syncd_s_own_changes_are_no_corrections(tmp_path: Path, db_url: str, clock: Clock) -> None:
    """syncd's void of an unwon deal's invoice and its customer update before the next invoice are no corrections."""
    async with stack(tmp_path, db_url, clock=clock, daemon_extra=START, extra='on_unwon = "void"') as s:
        company = seed_company(s.hub)
        deal = seed_deal(s.hub, company=company)
        await win(s, deal)
        await s.hub.set_deal_properties(deal, {"dealstage": "closedlost"})
        await s.drain()
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=s.hub.app), base_url="http://hubspot.test"
        ) as api:
            response = await api.patch(
                f"/crm/v3/objects/companies/{company[0]}",
                json={"properties": {"legal_name": "Northwind Holdings Inc"}},
                headers={"Authorization": f"Bearer {s.hub.token}"},
            )
            response.raise_for_status()
        await win(s, seed_deal(s.hub, company=company))
        assert [i["Status"] for i in s.xero.invoices()] == ["VOIDED", "AUTHORISED"]
        store = s.daemon.runtime.store
        assert await store.count(InvoiceTrailRow, table_of(InvoiceTrailRow).c.kind == "correction") == 0
        voided = await invoice_trail(store, "INV-0001")
        assert [(step.what, step.actor) for step in voided.steps if step.what == "status"] == [("status", "syncd")]


# ---------------------------------------------------------------------------
# The audit over a seeded history
# ---------------------------------------------------------------------------


@dataclass
class Planned:
    """One invoice of the generated history, as the test plans it."""

    month: int
    trigger: datetime
    delay: timedelta
    currency: str
    price: Decimal
    late: bool
    corrected: bool
    paid_after_due_days: int | None  # None: never paid; negative: paid before the due date
    number: str = ""
    total: Decimal = Decimal(0)

    @property
    def issued(self) -> datetime:
        return self.trigger + self.delay

    @property
    def due(self) -> date:
        return self.issued.astimezone(NEW_YORK).date() + timedelta(days=14)  # seed_company's terms

    @property
    def paid(self) -> date | None:
        return None if self.paid_after_due_days is None else self.due + timedelta(days=self.paid_after_due_days)


MONTHS = (8, 9, 10, 11)
LATE = {8: 2, 9: 1, 10: 2, 11: 3}  # late invoices of 6 per month: rising from September to November
CORRECTED = {8: 0, 9: 1, 10: 1, 11: 1}  # corrected invoices: not rising


def plan(seed: int) -> list[Planned]:
    """Six invoices a month, August to November 2026, on every fourth day; some late, corrected, paid late."""
    rng = random.Random(seed)
    planned: list[Planned] = []
    for month in MONTHS:
        late = set(rng.sample(range(6), LATE[month]))
        corrected = set(rng.sample(range(6), CORRECTED[month]))
        for index in range(6):
            trigger = datetime(2026, month, 2 + 4 * index, 15, rng.randrange(60), tzinfo=UTC)
            hours = rng.uniform(49, 90) if index in late else rng.uniform(0, 40)
            planned.append(
                Planned(
                    month=month,
                    trigger=trigger,
                    delay=timedelta(seconds=round(hours * 3600)),
                    currency=rng.choice(["USD", "EUR"]),
                    price=Decimal(rng.randrange(1000, 5000)),
                    late=index in late,
                    corrected=index in corrected,
                    paid_after_due_days=rng.choice([None, -3, -1, 0, 2, 9]),
                )
            )
    return planned


def expected_month(history: list[Planned], month: Month) -> dict[str, Any]:
    """The audit's numbers for ``month``, computed from the plan."""
    issued = [p for p in history if Month.of(p.issued.astimezone(NEW_YORK).date()) == month]
    due = [p for p in history if Month.of(p.due) == month]
    overdue = [p for p in due if p.paid is None or p.paid > p.due]
    delays = sorted(p.delay.total_seconds() for p in issued)
    middle = len(delays) // 2
    median = (delays[middle - 1] + delays[middle]) / 2 if len(delays) % 2 == 0 else delays[middle]
    currencies = {}
    for code in sorted({p.currency for p in due}):
        due_amount = sum((p.total for p in due if p.currency == code), Decimal(0))
        overdue_amount = sum((p.total for p in overdue if p.currency == code), Decimal(0))
        currencies[code] = {
            "due": sum(1 for p in due if p.currency == code),
            "overdue": sum(1 for p in overdue if p.currency == code),
            "due_amount": due_amount,
            "overdue_amount": overdue_amount,
        }
    return {
        "issued": len(issued),
        "late": sum(1 for p in issued if p.delay > timedelta(hours=48)),
        "corrected": sum(1 for p in issued if p.corrected),
        "due": len(due),
        "overdue": len(overdue),
        "median": median if delays else None,
        "p95": delays[math.ceil(0.95 * len(delays)) - 1] if delays else None,
        "currencies": currencies,
        "worst": sorted((p for p in issued if p.late), key=lambda p: -p.delay)[:5],
    }


def expected_flag(history: list[Planned], month: Month, number: str) -> str:
    shares = []
    for back in (2, 1, 0):
        numbers = expected_month(history, month.before(back))
        part, whole = {
            "late": ("late", "issued"),
            "corrected": ("corrected", "issued"),
            "overdue": ("overdue", "due"),
        }[number]
        if numbers[whole] == 0:
            return "not enough history"
        shares.append(Decimal(numbers[part]) / Decimal(numbers[whole]))
    return "rising" if shares[0] < shares[1] < shares[2] else "not rising"


def share(part: int, whole: int) -> str | None:
    return str((Decimal(part) / Decimal(whole)).quantize(Decimal("0.0001"))) if whole else None


async def play(s: Stack, clock: Clock, history: list[Planned]) -> None:
    """Win each planned deal at its trigger, process it at its issue time, then correct and pay it as planned."""
    company = seed_company(s.hub)
    actions: list[tuple[datetime, int, str, Planned]] = []
    for index, planned in enumerate(history):
        actions.append((planned.trigger, index, "win", planned))
        actions.append((planned.issued, index, "issue", planned))
        if planned.corrected:
            actions.append((planned.issued + timedelta(days=1), index, "correct", planned))
        if planned.paid is not None:
            actions.append(
                (
                    datetime.combine(planned.paid, datetime.min.time(), tzinfo=UTC) + timedelta(hours=17),
                    index,
                    "pay",
                    planned,
                )
            )
    for at, _index, action, planned in sorted(actions, key=lambda a: (a[0], a[1])):
        clock.at = at
        if action == "win":
            deal = s.hub.add_deal(
                {
                    "dealname": f"Job {at:%m%d}",
                    "dealstage": "contractsent",
                    "pipeline": "default",
                    "deal_currency_code": planned.currency,
                },
                company_id=company[0],
                contact_ids=[company[1]],
                line_items=[{"name": "Work", "quantity": "1", "price": str(planned.price)}],
            )
            await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
        elif action == "issue":
            await s.drain()
            planned.number = s.xero.invoices()[-1]["InvoiceNumber"]
        elif action == "correct":
            invoice = xero_invoice(s, planned.number)
            lines = [{**line, "Description": "Work (as agreed by phone)"} for line in invoice["LineItems"]]
            await s.xero.edit_invoice(invoice["InvoiceID"], {"LineItems": lines})
        else:
            invoice = xero_invoice(s, planned.number)
            await s.xero.pay_invoice(invoice["InvoiceID"], invoice["AmountDue"], on=planned.paid)
    await s.drain()
    for planned in history:
        planned.total = Decimal(str(xero_invoice(s, planned.number)["Total"]))


async def test_the_audit_of_a_seeded_history_matches_the_plan(tmp_path: Path, db_url: str) -> None:
    """Four months of invoices: each month's numbers, the rising late share and 'not enough history' as planned."""
    history = plan(seed=20261101)
    clock = Clock(history[0].trigger)
    async with stack(tmp_path, db_url, clock=clock, daemon_extra=START) as s:
        await play(s, clock, history)
        clock.at = datetime(2026, 12, 20, 15, tzinfo=UTC)
        config = str(s.config.path)

        result = await cli("audit", "--month", "2026-11", "--format", "json", "--config", config)
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        assert [m["month"] for m in report["months"]] == ["2026-09", "2026-10", "2026-11"]
        for shown in report["months"]:
            want = expected_month(history, Month.parse(shown["month"]))
            assert (shown["issued"], shown["late"], shown["corrected"]) == (
                want["issued"],
                want["late"],
                want["corrected"],
            )
            assert (shown["due"], shown["overdue"]) == (want["due"], want["overdue"])
            assert shown["late_share"] == share(want["late"], want["issued"])
            assert shown["overdue_share"] == share(want["overdue"], want["due"])
            assert shown["corrections"]["lines"] == want["corrected"]
            assert (shown["latency_median_s"], shown["latency_p95_s"]) == (want["median"], want["p95"])
            assert {
                code: (c["due"], c["overdue"], Decimal(c["due_amount"]), Decimal(c["overdue_amount"]))
                for code, c in shown["currencies"].items()
            } == {
                code: (c["due"], c["overdue"], c["due_amount"], c["overdue_amount"])
                for code, c in want["currencies"].items()
            }
        november = expected_month(history, Month(2026, 11))
        assert [w["invoice"] for w in report["months"][-1]["worst"]] == [p.number for p in november["worst"]]
        assert report["trends"] == {
            n: expected_flag(history, Month(2026, 11), n) for n in ("late", "corrected", "overdue")
        }
        assert report["trends"]["late"] == "rising"
        assert report["trends"]["corrected"] == "not rising"

        early = json.loads((await cli("audit", "--month", "2026-09", "--format", "json", "--config", config)).output)
        assert early["trends"] == {
            "late": "not enough history",
            "corrected": "not enough history",
            "overdue": "not enough history",
        }

        rows = list(
            csv.DictReader(
                io.StringIO((await cli("audit", "--month", "2026-11", "--format", "csv", "--config", config)).output)
            )
        )
        assert {"month": "2026-11", "metric": "trend", "key": "late", "value": "rising"} in rows
        assert {"month": "2026-11", "metric": "late", "key": "", "value": str(november["late"])} in rows
        table = await cli("audit", "--month", "2026-11", "--config", config)
        assert table.exit_code == 0
        assert "rising" in table.output
        assert "latest invoices" in table.output
        assert "shares by month" not in table.output  # not a terminal, no --plot: no plot

        plotted = await cli("audit", "--month", "2026-11", "--plot", "--config", config)
        assert plotted.exit_code == 0, plotted.output
        plot = plotted.output[plotted.output.index("shares by month") :].splitlines()
        months = [expected_month(history, Month(2026, m)) for m in (9, 10, 11)]
        for number, (part, whole) in {
            "late": ("late", "issued"),
            "corrected": ("corrected", "issued"),
            "overdue": ("overdue", "due"),
        }.items():
            rows = [line for line in plot if line.split()[:1] == [number]]
            assert len(rows) == 1
            first = plot.index(rows[0])
            for offset, want in enumerate(months):
                percent = (Decimal(100 * want[part]) / want[whole]).quantize(Decimal("0.1"))
                assert f"2026-{9 + offset:02d}" in plot[first + offset]
                assert f"{percent} %" in plot[first + offset]
            assert plot[first + 2].endswith(report["trends"][number])
        assert (
            json.loads(
                (await cli("audit", "--month", "2026-11", "--plot", "--format", "json", "--config", config)).output
            )
            == report
        )

        on_terminal = await asyncio.to_thread(_on_a_terminal, "audit", "--month", "2026-11", "--config", config)
        assert "shares by month" in on_terminal

        metrics = (await s.web.get("/metrics")).text
        assert 'syncd_audit_month_info{month="2026-11"} 1.0' in metrics
        assert f'syncd_audit_share{{number="late"}} {float(Decimal(november["late"]) / 6)}' in metrics
        assert 'syncd_audit_trend_rising{number="late"} 1.0' in metrics
        assert f'syncd_audit_latency_seconds{{quantile="0.95"}} {november["p95"]}' in metrics
        assert f'syncd_audit_latency_seconds{{quantile="0.5"}} {november["median"]}' in metrics
        for what in ("issued", "late", "corrected", "due", "overdue"):
            assert f'syncd_audit_invoices{{what="{what}"}} {float(november[what])}' in metrics
        assert f'syncd_audit_share{{number="corrected"}} {float(Decimal(november["corrected"]) / 6)}' in metrics
        overdue_share = float(Decimal(november["overdue"]) / november["due"])
        assert f'syncd_audit_share{{number="overdue"}} {overdue_share}' in metrics
        for code, amounts in november["currencies"].items():
            amount_share = float(amounts["overdue_amount"] / amounts["due_amount"])
            assert f'syncd_audit_overdue_amount_share{{currency="{code}"}} {amount_share}' in metrics
        for number in ("corrected", "overdue"):
            rising = 1.0 if report["trends"][number] == "rising" else 0.0
            assert f'syncd_audit_trend_rising{{number="{number}"}} {rising}' in metrics
            assert f'syncd_audit_history_complete{{number="{number}"}} 1.0' in metrics

        assert await scheduler.tick_audit(s.daemon.runtime) is True
        assert await scheduler.tick_audit(s.daemon.runtime) is False  # once per month
        alerts = await s.daemon.runtime.store.pending_alerts()
        rising = [n for n in ("late", "corrected", "overdue") if report["trends"][n] == "rising"]
        assert [(a.source, a.key) for a in alerts] == [("audit", f"audit:2026-11:{n}") for n in rising]
        assert "rose" in alerts[0].text
        await s.daemon.runtime.store.mark_alerts_sent([a.id or 0 for a in alerts], clock.at)
        assert await s.daemon.runtime.store.pending_alerts() == []
        assert await s.daemon.runtime.store.count(PendingAlertRow) == len(rising)


def _on_a_terminal(*args: str) -> str:
    """``syncd ARGS`` in a child process whose stdout is a pseudo-terminal; what it printed."""
    controller, terminal = pty.openpty()
    env = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1"}
    child = subprocess.Popen(  # our own CLI, our own arguments
        [sys.executable, "-m", "syncd", *args], stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal, env=env
    )
    os.close(terminal)
    out = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(controller)
    assert child.wait(timeout=60) == 0, out.decode(errors="replace")
    return out.decode()


def _numbers(month: Month, *, issued: int, late: int, corrected: int, due: int, overdue: int) -> audit.MonthNumbers:
    return audit.MonthNumbers(
        month=month,
        issued=issued,
        late=late,
        worst=(),
        corrected=corrected,
        classes={},
        due=due,
        overdue=overdue,
        currencies={},
        latency_median_s=None,
        latency_p95_s=None,
    )


def test_the_plot_draws_each_share_to_one_scale_in_eighths_of_a_cell() -> None:
    """Late 25/50/75 %, corrected 25/0/25 %, overdue -/1 in 3/2 in 3: the 75 % bar is the full 24 cells."""
    history = (
        _numbers(Month(2026, 9), issued=4, late=1, corrected=1, due=0, overdue=0),
        _numbers(Month(2026, 10), issued=4, late=2, corrected=0, due=3, overdue=1),
        _numbers(Month(2026, 11), issued=4, late=3, corrected=1, due=3, overdue=2),
    )
    report = audit.Report(
        month=Month(2026, 11),
        zone="America/New_York",
        late_after_h=48,
        delays={},
        history=history,
        trends={"late": "rising", "corrected": "not rising", "overdue": "not enough history"},
    )
    lines = audit.plot_lines(report)
    assert lines[0] == "shares by month (bars to one scale: full = 75.0 %)"
    bars = [line[len("corrected  2026-09  ") :][:24].rstrip() for line in lines[1:]]
    # 1/3 of 75 % → 24·8/2.25 = 85.3 eighths: 10 cells and 5/8; 2/3 → 170.7: 21 cells and 3/8
    assert bars == [
        "█" * 8,
        "█" * 16,
        "█" * 24,
        "█" * 8,
        "",
        "█" * 8,
        "-",
        "█" * 10 + "▋",
        "█" * 21 + "▍",
    ]
    assert lines[1].startswith("late       2026-09  ")  # each number's label on its first month
    assert lines[3].startswith("           2026-11  ")
    assert lines[3].endswith("75.0 %  rising")
    assert lines[5].endswith("0.0 %")
    assert lines[9].endswith("66.7 %  not enough history")
    assert lines[7].split() == ["overdue", "2026-09", "-", "-"]  # nothing was due: no bar, no share


def test_month_arithmetic_and_the_percentile() -> None:
    """Months step across years; a month is read as YYYY-MM only; p95 is the nearest rank."""
    assert Month.parse("2027-01").before(2) == Month(2026, 11)
    assert Month.last_complete(datetime(2026, 12, 1, 3, tzinfo=UTC), "America/New_York") == Month(2026, 10)
    with pytest.raises(ValueError, match="not a month"):
        Month.parse("2026-13")
    assert audit.p95([float(n) for n in range(1, 21)]) == 19.0
    assert audit.p95([5.0]) == 5.0
    assert audit.p95([]) is None


async def test_invoice_rows_keep_what_was_sent_and_when_it_was_issued(
    tmp_path: Path, db_url: str, clock: Clock
) -> None:
    """An approved invoice is issued when syncd creates it; what was sent and the ledger's content are stored."""
    async with stack(tmp_path, db_url, clock=clock, daemon_extra=START) as s:
        await win(s, seed_deal(s.hub))
        (row,) = await s.daemon.runtime.store.select(InvoiceRow)
        assert row.issued_at == clock.at
        assert row.sent is not None
        assert row.sent["customer_id"] == s.xero.contacts()[0]["ContactID"]
        assert row.document is not None
        assert len(row.document["lines"]) == 2


async def test_a_draft_is_issued_when_syncd_first_reads_it_approved(tmp_path: Path, db_url: str, clock: Clock) -> None:
    """A draft invoice has no issue time; approved at Xero, it is issued when the webhook's read sees it so."""
    drafts = tmp_path / "drafts.toml"
    drafts.write_text(MAPPING.read_text(encoding="utf-8").replace('status = "authorised"', 'status = "draft"'))
    async with stack(tmp_path, db_url, clock=clock, daemon_extra=START, mapping=drafts) as s:
        await win(s, seed_deal(s.hub))
        (created,) = s.xero.invoices()
        store = s.daemon.runtime.store
        (row,) = await store.select(InvoiceRow)
        assert (row.state, row.issued_at) == ("draft", None)
        clock.at += timedelta(hours=30)
        await s.xero.edit_invoice(created["InvoiceID"], {"Status": "AUTHORISED"})
        await s.drain()
        (row,) = await store.select(InvoiceRow)
        assert (row.state, row.issued_at) == ("authorised", clock.at)
        assert await store.count(InvoiceTrailRow, table_of(InvoiceTrailRow).c.kind == "correction") == 0
        numbers = (await audit.build_report(store, s.config, Month(2026, 11))).current
        assert (numbers.issued, numbers.latency_median_s) == (1, 30 * 3600.0)
