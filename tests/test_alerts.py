"""Alerts: recorded beside their causes, posted to a real HTTP receiver, grouped, retried.

The receiver is a tiny ASGI app on a real uvicorn socket (``tests/servers.py``) that
records each body and answers as a test tells it (200, 500, 429, or holding the answer
until released). The sender is run by hand (:meth:`syncd.alerts.AlertSender.deliver_due`)
with the test's clock; each stack test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import structlog
from click.testing import Result
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from typer.testing import CliRunner

from connectors.emulation import Fault
from syncd.cli.main import app
from syncd.engine import alerts, audit, scheduler
from syncd.engine.alerts import AlertSender, message
from syncd.store.db import AlertRow, DeadLetterRow, VendorHealthRow
from syncd.store.outcomes import list_outcomes
from tests.harness import Stack, seed_company, seed_deal, stack
from tests.servers import serve_in_thread

START = 'billing_start = "2026-01-01T00:00:00+00:00"'
GIVE_UP = "give_up_after_s = 1"  # a failing record is dead-lettered at its first retry
HOOK_PATH = "/services/T000/B000/XXXXsecretXXXX"


class Clock:
    """The one clock of the daemon and the emulators; tests move it."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Receiver:
    """A Slack-like incoming webhook: keeps every body, answers from ``answers`` (then 200)."""

    answers: list[int] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    hold: threading.Event = field(default_factory=threading.Event)
    arrived: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.hold.set()

    async def post(self, request: Request) -> Response:
        self.bodies.append(json.loads(await request.body()))
        self.arrived.set()
        await asyncio.to_thread(self.hold.wait, 30)
        status = self.answers.pop(0) if self.answers else 200
        if status == 429:
            return JSONResponse({"error": "rate_limited"}, status_code=429, headers={"Retry-After": "30"})
        return PlainTextResponse("ok" if status == 200 else "server_error", status_code=status)

    def app(self) -> Starlette:
        return Starlette(routes=[Route(HOOK_PATH, self.post, methods=["POST"])])


@contextlib.contextmanager
def receiving(receiver: Receiver) -> Iterator[str]:
    """The receiver on a free loopback port; the webhook URL."""
    with serve_in_thread(receiver.app()) as base:
        yield f"{base}{HOOK_PATH}"


def alerting(url: str, **settings: int) -> str:
    values = {"group_window_s": 60, "min_interval_s": 300, "retry_max_s": 900, "vendor_errors_after_s": 120}
    values.update(settings)
    lines = "\n".join(f"{key} = {value}" for key, value in values.items())
    return f'\n[alerts]\nwebhook_url = "{url}"\n{lines}\n'


def sender(s: Stack) -> AlertSender:
    assert s.daemon.alert_sender is not None
    return s.daemon.alert_sender


def sections(body: dict[str, Any]) -> list[str]:
    """The text of each section block of a message."""
    return [block["text"]["text"] for block in body["blocks"] if block["type"] == "section"]


async def test_an_outage_sends_one_grouped_summary_then_waits_its_interval(tmp_path: Path, db_url: str) -> None:
    """Xero down: three dead letters and a sustained-error alert go out as one message; later ones wait."""
    clock = Clock(datetime(2026, 12, 2, 15, 0, tzinfo=UTC))
    receiver = Receiver()
    with receiving(receiver) as url:
        extra = alerting(url)
        async with stack(tmp_path, db_url, clock=clock, daemon_extra=f"{START}\n{GIVE_UP}", extra=extra) as s:
            s.xero.faults.add(Fault(kind="status", status=503, times=None))
            company = seed_company(s.hub)
            for _ in range(3):  # each invoice fails, then fails again a minute later and is given up
                deal = seed_deal(s.hub, company=company)
                await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
                await s.drain()
                clock.now += timedelta(minutes=1)
            await s.drain()
            assert await s.daemon.runtime.store.count(DeadLetterRow) == 3
            assert await sender(s).deliver_due() == 4  # the first dead letter has waited its 60 s
            (body,) = receiver.bodies
            assert body["text"] == "syncd: Dead letters: 3; Sustained vendor errors: 1"
            assert body["blocks"][0]["text"]["text"] == "syncd: 4 alerts"
            dead, vendor = sections(body)
            assert dead.startswith("*Dead letters (3)*\n• *effect ")
            assert "xero: " in dead
            assert vendor.startswith("*Sustained vendor errors (1)*\n• *xero*: 4 failures in 2 min, none succeeding")

            deal = seed_deal(s.hub, company=company)
            await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
            await s.drain()
            clock.now += timedelta(minutes=1)
            await s.drain()
            clock.now += timedelta(minutes=1)
            assert await sender(s).deliver_due() == 0  # 2 min since the last message: within min_interval_s
            clock.now += timedelta(minutes=3)
            assert await sender(s).deliver_due() == 1
            assert sections(receiver.bodies[1]) == [sections(receiver.bodies[1])[0]]
            assert sections(receiver.bodies[1])[0].startswith("*Dead letters (1)*")
            assert await s.daemon.runtime.store.count(AlertRow, AlertRow.status == "pending") == 0


async def test_a_failing_receiver_is_retried_with_back_off_and_never_blocks_the_engine(
    tmp_path: Path, db_url: str
) -> None:
    """Alerts from the hook wait while the receiver holds its answer, then fails: meanwhile a deal is
    invoiced; they go out on a later try."""
    clock = Clock(datetime(2026, 12, 2, 15, 0, tzinfo=UTC))
    receiver = Receiver(answers=[500, 429])
    receiver.hold.clear()
    with receiving(receiver) as url:
        async with stack(tmp_path, db_url, clock=clock, daemon_extra=START, extra=alerting(url, min_interval_s=0)) as s:
            store = s.daemon.runtime.store  # the hook the audit and the client record record alerts through
            await store.add_alert(
                key="audit:2026-11:late",
                source="audit",
                title="Audit 2026-11: the late share rose two months running",
                text="3% → 5% → 8%",
                fields=None,
                now=clock.now,
            )
            await store.add_alert(
                key="client_conflict:7",
                source="client",
                title="Client detail conflict: Acme, payment_terms_days",
                text="CRM 30, Xero 14",
                fields=None,
                now=clock.now,
            )
            clock.now += timedelta(seconds=61)
            delivery = asyncio.create_task(sender(s).deliver_due())
            await asyncio.to_thread(receiver.arrived.wait, 10)

            deal = seed_deal(s.hub)  # the engine goes on while the alert post hangs
            await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
            await s.drain()
            assert len(s.xero.invoices()) == 1
            assert not delivery.done()

            receiver.hold.set()
            assert await delivery == 0  # answered 500
            (failed, _) = await store.select(AlertRow, order_by=AlertRow.id)
            assert (failed.status, failed.attempts, failed.last_error) == ("pending", 1, "HTTP 500: server_error")
            assert failed.next_at == clock.now + timedelta(seconds=5)
            assert await sender(s).deliver_due() == 0  # backing off: not even tried
            assert len(receiver.bodies) == 1

            clock.now += timedelta(seconds=5)
            assert await sender(s).deliver_due() == 0  # 429 with Retry-After: 30
            assert (await store.select(AlertRow))[0].next_at == clock.now + timedelta(seconds=30)
            clock.now += timedelta(seconds=30)
            assert await sender(s).deliver_due() == 2
            assert len(receiver.bodies) == 3
            assert receiver.bodies[0] == receiver.bodies[2]
            conflict, audit = sections(receiver.bodies[2])
            assert conflict == (
                "*Client record conflicts (1)*\n• *Client detail conflict: Acme, payment_terms_days*: CRM 30, Xero 14"
            )
            assert "3% → 5% → 8%" in audit
            assert await store.pending_alerts() == []  # taken by the sender, once


async def test_pending_alerts_survive_a_restart(tmp_path: Path) -> None:
    """An alert recorded before a stop is sent by the next start on the same database."""
    clock = Clock(datetime(2026, 12, 2, 15, 0, tzinfo=UTC))
    db_url = f"sqlite:///{tmp_path / 'syncd.db'}"
    receiver = Receiver()
    with receiving(receiver) as url:
        async with stack(tmp_path, db_url, clock=clock, daemon_extra=START, extra=alerting(url)) as s:
            await alerts.auth_lost(s.daemon.runtime.store, "xero", "xero: the token was revoked", clock.now)
        clock.now += timedelta(minutes=2)
        async with stack(tmp_path, db_url, clock=clock, daemon_extra=START, extra=alerting(url)) as s:
            assert await sender(s).deliver_due() == 1
    (body,) = receiver.bodies
    assert sections(body) == ["*Lost authorisation (1)*\n• *xero*: xero: the token was revoked ([connections.xero])"]


async def test_an_outcome_that_needs_attention_is_an_alert_and_a_skip_is_not(tmp_path: Path, db_url: str) -> None:
    """A deal outside every pipeline is a skip (no alert); an invoiced deal that leaves won needs attention (an alert)."""
    clock = Clock(datetime(2026, 12, 2, 15, 0, tzinfo=UTC))
    receiver = Receiver()
    with receiving(receiver) as url:
        async with stack(tmp_path, db_url, clock=clock, daemon_extra=START, extra=alerting(url)) as s:
            company = seed_company(s.hub)
            elsewhere = s.hub.add_deal(
                {"dealname": "Retainer", "dealstage": "contractsent", "billing_type": "retainer"}, company_id=company[0]
            )
            await s.hub.set_deal_properties(elsewhere, {"dealstage": "closedwon"})
            deal = seed_deal(s.hub, company=company)
            await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
            await s.drain()
            await s.hub.set_deal_properties(deal, {"dealstage": "closedlost"})
            await s.drain()
            (skip,) = await list_outcomes(s.daemon.runtime.store, kind="skip")
            assert skip.reason == "no_pipeline"
            (row,) = await s.daemon.runtime.store.select(AlertRow)
            assert (row.kind, row.title) == ("attention", f"unwon_after_invoice (deal {deal})")


async def test_without_a_webhook_url_nothing_is_recorded(tmp_path: Path, db_url: str) -> None:
    """No [alerts] webhook_url: dead letters are kept as ever, but no alert piles up unsent."""
    clock = Clock(datetime(2026, 12, 2, 15, 0, tzinfo=UTC))
    async with stack(tmp_path, db_url, clock=clock, daemon_extra=f"{START}\n{GIVE_UP}") as s:
        s.xero.faults.add(Fault(kind="status", status=503, times=None))
        deal = seed_deal(s.hub)
        await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
        await s.drain()
        clock.now += timedelta(minutes=1)
        await s.drain()
        assert await s.daemon.runtime.store.count(DeadLetterRow) == 1
        assert await s.daemon.runtime.store.count(AlertRow) == 0
        assert s.daemon.alert_sender is None


async def test_the_webhook_url_never_appears_in_a_log_line(tmp_path: Path) -> None:
    """A failed delivery is logged with its status and the receiver's words, never the URL (the secret)."""
    clock = Clock(datetime(2026, 12, 2, 15, 0, tzinfo=UTC))
    receiver = Receiver(answers=[500])
    with receiving(receiver) as url, structlog.testing.capture_logs() as logs:
        async with stack(tmp_path, f"sqlite:///{tmp_path / 'a.db'}", clock=clock, extra=alerting(url)) as s:
            await alerts.auth_lost(s.daemon.runtime.store, "hubspot", "hubspot: 401", clock.now)
            clock.now += timedelta(minutes=2)
            await sender(s).deliver_due()
    (failed,) = [line for line in logs if line["event"] == "alerts_delivery_failed"]
    assert failed["error"] == "HTTP 500: server_error"
    assert not [line for line in logs if HOOK_PATH in repr(line)]


def row(kind: str, n: int, **values: Any) -> AlertRow:
    now = datetime(2026, 12, 2, tzinfo=UTC)
    fields = {"title": f"t{n}", "detail": "d", **values}
    return AlertRow(id=n, key=f"{kind}:{n}", kind=kind, next_at=now, created_at=now, **fields)


def test_a_message_lists_five_per_kind_counts_the_rest_and_stays_within_slacks_limits() -> None:
    """12 dead letters: 5 named and '… and 7 more'; long text is cut; <, > and & are escaped."""
    rows = [row("dead_letter", n) for n in range(12)]
    rows.append(row("attention", 99, title="<!channel> & co", detail="x" * 5000, place="a > b"))
    body = message(rows)
    dead, attention = sections(body)
    assert dead.count("\n• ") == 5
    assert dead.endswith("… and 7 more")
    assert attention.startswith("*Needs attention (1)*\n• *&lt;!channel&gt; &amp; co*: xxx")
    assert len(attention) < 3000
    assert body["text"] == "syncd: Dead letters: 12; Needs attention: 1"
    assert len(body["blocks"]) <= 50
    assert all(len(block["text"]["text"]) <= 3000 for block in body["blocks"] if "text" in block)


def _invoke(*args: str) -> Result:
    saved, handlers = structlog.get_config(), logging.root.handlers[:]
    try:
        return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    finally:
        structlog.configure(**saved)
        logging.root.handlers[:] = handlers


async def cli(*args: str) -> Result:
    """``syncd ARGS`` in a thread (the command runs its own event loop)."""
    return await asyncio.to_thread(_invoke, *args)


def code_blocks(body: dict[str, Any]) -> list[list[str]]:
    """The lines of each code block in a message's sections."""
    found = []
    for text in sections(body):
        parts = text.split("```")
        found += [part.strip("\n").splitlines() for part in parts[1::2]]
    return found


async def test_the_monthly_audit_posts_its_whole_report_once_as_a_message_of_its_own(
    tmp_path: Path, db_url: str
) -> None:
    """After November closes, the scheduled audit queues its report once; it goes out beside a grouped
    message, is retried when the receiver fails, and arrives whole: the summary, the months' table and plot."""
    clock = Clock(datetime(2026, 11, 10, 15, 0, tzinfo=UTC))
    receiver = Receiver(answers=[200, 500])
    with receiving(receiver) as url:
        extra = alerting(url, min_interval_s=0)
        async with stack(tmp_path, db_url, clock=clock, daemon_extra=START, extra=extra) as s:
            runtime, store = s.daemon.runtime, s.daemon.runtime.store
            deal = seed_deal(s.hub)  # won and invoiced on 10 November, due on the 24th (14 days), never paid
            await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
            await s.drain()
            (invoice,) = s.xero.invoices()

            clock.now = datetime(2026, 12, 2, 15, 0, tzinfo=UTC)
            await alerts.auth_lost(store, "hubspot", "hubspot: the token was revoked", clock.now)
            assert await scheduler.tick_audit(runtime) is True
            assert await scheduler.tick_audit(runtime) is False  # the month's window is taken
            assert await audit.run_monthly(runtime) is None  # a replica looking later finds it taken too
            (queued,) = await store.select(AlertRow, AlertRow.kind == "audit_report")
            assert (queued.key, queued.title) == ("audit_report:2026-11", "Audit 2026-11")

            clock.now += timedelta(seconds=61)
            assert await sender(s).deliver_due() == 1  # the grouped message went; the report was answered 500
            grouped, report = receiver.bodies
            assert sections(grouped) == [
                "*Lost authorisation (1)*\n• *hubspot*: hubspot: the token was revoked ([connections.hubspot])"
            ]
            (waiting,) = await store.select(AlertRow, AlertRow.status == "pending")
            assert (waiting.kind, waiting.last_error) == ("audit_report", "HTTP 500: server_error")
            assert await sender(s).deliver_due() == 0  # backing off
            clock.now += timedelta(seconds=5)
            assert await sender(s).deliver_due() == 1
            assert await sender(s).deliver_due() == 0
            assert len(receiver.bodies) == 3
            assert receiver.bodies[2] == report

    assert report["blocks"][0] == {"type": "header", "text": {"type": "plain_text", "text": "syncd: audit of 2026-11"}}
    total = Decimal(str(invoice["Total"]))
    assert report["text"].startswith("Audit 2026-11: late 0/1 (0.0 %) not enough history; corrected 0/1 (0.0 %)")
    assert "overdue 1/1 (100.0 %)" in report["text"]
    table, plot = code_blocks(report)
    assert table[0].split() == ["2026-09", "2026-10", "2026-11", "trend"]
    rows = {cells[0]: cells[1:] for cells in (re.split(r" {2,}", line.strip()) for line in table[1:])}
    assert rows["invoices issued"] == ["0", "0", "1"]
    assert rows["overdue (of invoices due)"] == ["0/0 (-)", "0/0 (-)", "1/1 (100.0 %)", "not enough history"]
    assert rows["USD by amount"] == ["-", "-", f"{total}/{total} (100.0 %)"]
    assert plot[0] == "shares by month (bars to one scale: full = 100.0 %)"
    november = [line for line in plot if "2026-11" in line]  # late, corrected, overdue
    assert november[0].endswith(" 0.0 %  not enough history")
    assert november[1].endswith(" 0.0 %  not enough history")
    assert november[2].endswith(" 100.0 %  not enough history")
    assert "█" * 24 in plot[-1]
    assert all(len(block["text"]["text"]) <= 3000 for block in report["blocks"] if "text" in block)


async def test_status_shows_a_failing_alerts_webhook(tmp_path: Path, db_url: str) -> None:
    """`syncd status` (text and --json) shows the waiting alerts, the failed deliveries and the receiver's answer."""
    clock = Clock(datetime(2026, 12, 2, 15, 0, tzinfo=UTC))
    receiver = Receiver(answers=[500])
    with receiving(receiver) as url:
        async with stack(tmp_path, db_url, clock=clock, daemon_extra=START, extra=alerting(url)) as s:
            store = s.daemon.runtime.store
            config = str(s.config.path)
            quiet = json.loads((await cli("status", "--json", "--config", config)).output)["alerts"]
            assert (quiet["configured"], quiet["pending"], quiet["failed"], quiet["last_sent_at"]) == (True, 0, 0, None)

            await alerts.auth_lost(store, "xero", "xero: the token was revoked", clock.now)
            await store.add_alert(
                key="client_conflict:9", source="client", title="conflict", text="t", fields=None, now=clock.now
            )
            before = json.loads((await cli("status", "--json", "--config", config)).output)["alerts"]
            assert (before["pending"], before["failed"], before["hooked"]) == (1, 0, 1)
            assert before["oldest_pending_at"] == clock.now.isoformat()

            clock.now += timedelta(minutes=2)
            assert await sender(s).deliver_due() == 0  # answered 500
            shown = json.loads((await cli("status", "--json", "--config", config)).output)["alerts"]
            assert shown == {
                "configured": True,
                "pending": 2,
                "failed": 2,
                "oldest_pending_at": (clock.now - timedelta(minutes=2)).isoformat(),
                "last_error": "HTTP 500: server_error",
                "retry_at": (clock.now + timedelta(seconds=5)).isoformat(),
                "hooked": 0,
                "last_sent_at": None,
            }
            text = (await cli("status", "--config", config)).output
            assert "alerts: on 2 waiting since 2026-12-02 15:00 UTC" in text
            assert "failed deliveries: 2, next try 2026-12-02 15:02 UTC" in text
            assert "last error:        HTTP 500: server_error" in text
            assert "last sent:         never" in text
            metrics = (await s.web.get("/metrics")).text
            assert 'syncd_backlog{queue="alerts",status="pending"} 2.0' in metrics
            assert 'syncd_backlog{queue="alerts",status="failed"} 2.0' in metrics


async def test_a_vendor_outage_seen_by_two_replicas_is_one_streak_and_one_alert(
    tmp_path: Path, postgres_url: str
) -> None:
    """Replicas A and B fail at Xero in turn: one shared streak from A's first failure, one alert however many
    failures follow on either; a success on A ends the streak for B too, and B's next failure starts a new one."""
    clock = Clock(datetime(2026, 12, 2, 15, 0, tzinfo=UTC))
    start = clock.now
    receiver = Receiver()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with receiving(receiver) as url:
        extra = alerting(url)  # vendor_errors_after_s = 120
        async with stack(tmp_path / "a", postgres_url, clock=clock, daemon_extra=START, extra=extra) as a:
            key = a.config.daemon.encryption_key
            assert key is not None
            async with stack(
                tmp_path / "b",
                postgres_url,
                clock=clock,
                daemon_extra=START,
                extra=extra,
                hub=a.hub,
                xero=a.xero,
                encryption_key=key.get_secret_value(),
            ) as b:
                store = a.daemon.runtime.store
                a.xero.faults.add(Fault(kind="status", status=503, times=None))
                company = seed_company(a.hub)

                async def fail_on(replica: Stack, after_s: int) -> None:
                    """At ``start + after_s``, a new deal is won and ``replica`` fails to invoice it."""
                    clock.now = start + timedelta(seconds=after_s)
                    deal = seed_deal(a.hub, company=company)
                    await a.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
                    await replica.drain()

                async def vendor_alerts() -> list[str]:
                    return [row.key for row in await store.select(AlertRow, AlertRow.kind == "vendor_errors")]

                await fail_on(a, 0)
                await fail_on(b, 60)
                (health,) = await store.select(VendorHealthRow)
                assert (health.connection, health.failing_since) == ("xero", start)
                await fail_on(a, 130)  # 130 s since A's first failure: the alert
                await fail_on(b, 140)
                await fail_on(b, 200)  # B alone has failed for 140 s: the same streak, no second alert
                assert await vendor_alerts() == [f"vendor_errors:xero:{start.isoformat()}"]
                failures = (await store.select(VendorHealthRow))[0].failures
                assert failures >= 5

                status = json.loads((await cli("status", "--json", "--config", str(b.config.path))).output)
                (xero,) = [c for c in status["connections"] if c["connection"] == "xero"]
                assert (xero["failing_since"], xero["failures"]) == (start.isoformat(), failures)

                a.xero.faults.clear()
                clock.now = start + timedelta(seconds=210)
                deal = seed_deal(a.hub, company=company)
                await a.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
                await a.drain()  # Xero answers A again
                assert await a.daemon.runtime.health.flush(store) == 1  # what A's sender loop does every few seconds
                assert (await store.select(VendorHealthRow))[0].failing_since is None

                a.xero.faults.add(Fault(kind="status", status=503, times=None))
                await fail_on(b, 220)
                await fail_on(b, 300)  # 80 s into the new streak: nothing yet
                assert len(await vendor_alerts()) == 1
                await fail_on(b, 350)
                assert await vendor_alerts() == [
                    f"vendor_errors:xero:{start.isoformat()}",
                    f"vendor_errors:xero:{(start + timedelta(seconds=220)).isoformat()}",
                ]


async def test_a_success_this_process_has_not_written_yet_still_ends_its_streak(tmp_path: Path, db_url: str) -> None:
    """Xero fails, then works here (noted, not yet flushed), then fails again 130 s after the first failure:
    the streak starts over at the second failure, so no alert; the one after 120 more seconds makes it."""
    clock = Clock(datetime(2026, 12, 2, 15, 0, tzinfo=UTC))
    start = clock.now
    receiver = Receiver()
    with receiving(receiver) as url:
        async with stack(tmp_path, db_url, clock=clock, daemon_extra=START, extra=alerting(url)) as s:
            runtime, store = s.daemon.runtime, s.daemon.runtime.store
            assert not await runtime.health.failed(store, "xero", "xero: 503", start, after_s=120)
            clock.now = start + timedelta(seconds=100)
            runtime.health.succeeded("xero")
            second = start + timedelta(seconds=130)
            assert not await runtime.health.failed(store, "xero", "xero: 503", second, after_s=120)
            (row,) = await store.select(VendorHealthRow)
            assert (row.failing_since, row.failures, row.last_error) == (second, 1, "xero: 503")
            assert await runtime.health.flush(store) == 0  # the success was spent on the restart
            assert await runtime.health.failed(store, "xero", "xero: 502", second + timedelta(seconds=120), after_s=120)
            (alert,) = await store.select(AlertRow)
            assert (alert.key, alert.detail) == (
                f"vendor_errors:xero:{second.isoformat()}",
                "2 failures in 2 min, none succeeding; last: xero: 502",
            )
