"""Month-start: every retainer client due at once on the 1st, batching off and on (issue 12 §3).

Monthly retainers (``mappings/hubspot-xero-retainer.toml``: billed in advance on the 1st)
for ``profile.monthstart_clients`` clients, each its own company and billing contact at
the HubSpot emulator. The Xero emulator enforces its limits, scaled as in
``bench.budget`` (600 calls a minute, 5 concurrent, 5,000 a day), and syncd is configured
with the same 600 a minute and 5 concurrent. Each run, on a fresh pair of emulators and
a fresh SQLite database:

1. **Acquaintance** (real clock): every retainer deal is won today with its service
   starting on the first of next month (in ``[daemon].timezone``), so nothing is due yet;
   ``syncd run`` receives each deal's webhook and stores its engagement. Then it stops.
2. **The 1st**: syncd starts again on the same database with its business clock at 00:30
   on that first (``bench.clocked``: the real time plus an offset). Its scheduler runs
   the recurring tick at start (:func:`syncd.engine.scheduler.tick_recurring`, as it runs
   every hour), which queues one ``period_due`` invoice per client at once; the workers
   create them at Xero and write each invoice back to its deal.

Measured in the second phase (batching off: ``[daemon] batch_max = 1``; on: syncd's
default): Xero API calls per invoice (every call but OAuth token requests), HubSpot calls
per invoice, the 429s Xero answered, the time from the recurring tick (the ``ticks``
row's start, taken back to real time) to the last invoice committed at the Xero emulator,
and the database transactions the process began per invoice (its whole life, start-up
and the other ticks it runs at start included: on the 1st those run too). Then the
speed-up: the off run's time ÷ the on run's.

Targets (issue 12): ≤ 0.1 Xero calls per invoice, no 429, ≥ 10× faster than batching off.

Run alone: ``python -m bench.monthstart`` (``--full``: 1,000 clients; batching off then
takes about as many minutes as it makes Xero calls per invoice × 1.7: 514 s at 4.0).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as clock_time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from bench import report, stack
from bench.budget import CONCURRENT, LIMIT_PER_MIN, Recorder
from bench.e2e import TRANSACTIONS, UNBATCHED, written_back
from bench.load import DealWonWebhooks
from bench.report import Profile, Row, Target
from connectors.hubspot.emulator import HubSpotEmulator
from syncd.plumbing.serving import free_port

RETAINER = stack.REPO / "mappings" / "hubspot-xero-retainer.toml"
ZONE = ZoneInfo("America/New_York")  # [daemon].timezone of stack.write_config: the clients' zone
AMOUNT = "1500.00"
WORKERS = 16
SENDERS = 16  # concurrent webhook deliveries in the acquaintance phase
TARGET_CALLS = Target(op="<=", limit=0.1)
DRIFT_OPS = ("getAccounts", "getTaxRates", "getCurrencies", "getTrackingCategories")  # syncd.engine.drift, at start
TARGET_429 = Target(op="<=", limit=0.0)
TARGET_SPEEDUP = Target(op=">=", limit=10.0)


@dataclass(frozen=True, kw_only=True)
class MonthStart:
    """One month-start run.

    Attributes:
        batch_max: syncd's ``[daemon] batch_max`` (``None``: its default; 1: batching off).
        clients: retainer clients due.
        invoices: invoices committed at Xero on the 1st.
        xero_calls / hub_calls: API calls on the 1st (Xero's OAuth token calls excluded).
        drift_xero_calls: of ``xero_calls``, the drift guard's (``GET /Accounts``,
            ``/TaxRates``, ``/Currencies``, ``/TrackingCategories``): it runs at syncd's start
            and then every ``drift_check_interval_s``, so it is there because the benchmark
            starts syncd on the 1st; a daemon running through the month start does not make
            them for it.
        refused: Xero's 429s on the 1st.
        problems: ``X-Rate-Limit-Problem`` of those 429s (``minute``, ``concurrent`` …).
        tick_to_last_s: recurring tick's start → last invoice committed (``None``: not all were).
        transactions: transactions the process began (``None``: ``/metrics`` gave none).
        drained: whether every invoice was also written back to its deal in time.
        acquaint_s: how long the acquaintance phase took.
        acquaint_xero_calls: Xero API calls in the acquaintance phase.
    """

    batch_max: int | None
    clients: int
    invoices: int
    xero_calls: int
    drift_xero_calls: int
    hub_calls: int
    refused: int
    problems: Counter[str]
    tick_to_last_s: float | None
    transactions: float | None
    drained: bool
    acquaint_s: float
    acquaint_xero_calls: int

    @property
    def setting(self) -> str:
        """``100 clients, batching off`` / ``100 clients, batch_max default``."""
        batching = "batching off (batch_max=1)" if self.batch_max == UNBATCHED else "batching on"
        if self.batch_max not in (None, UNBATCHED):
            batching = f"batch_max={self.batch_max}"
        return f"{self.clients} clients, {batching}"


class Commits:
    """Records when each invoice is committed at the Xero emulator (its ``on_commit`` hook)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._enough: tuple[int, asyncio.Event] | None = None

    def committed(self, kind: str, _document: dict[str, Any]) -> None:
        """The emulator stored a document: note the wall time of each invoice."""
        if kind != "invoice":
            return
        self.times.append(time.time())
        if self._enough is not None and len(self.times) >= self._enough[0]:
            self._enough[1].set()

    async def reach(self, count: int, timeout_s: float) -> bool:
        """Wait (bounded) until ``count`` invoices are committed."""
        event = asyncio.Event()
        self._enough = (count, event)
        if len(self.times) >= count:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)
        return len(self.times) >= count


def first_of_next_month(today: date) -> date:
    """The first day of the month after ``today``'s."""
    return (today.replace(day=1) + timedelta(days=32)).replace(day=1)


def seed_retainers(hub: HubSpotEmulator, count: int, *, start: date, won_at: datetime) -> list[str]:
    """Seed ``count`` won monthly retainers, each with its own company and billing contact.

    Each is billed in advance on the 1st from ``start`` (the fields of
    ``mappings/hubspot-xero-retainer.toml``, as ``tests/test_recurring.py`` seeds them).

    Returns:
        the deal ids.
    """
    deals = []
    for number in range(count):
        company = hub.add_company(
            {
                "name": f"Retainer client {number}",
                "legal_name": f"Retainer client {number} LLC",
                "default_po_number": f"PO-R{number}",
                "payment_terms_days": "14",
            }
        )
        contact = hub.add_contact(
            {"firstname": "Sam", "lastname": f"Okafor {number}", "email": f"billing{number}@retainer.example"},
            company_id=company,
        )
        deal = hub.add_deal(
            {
                "dealname": f"Managed services {number}",
                "dealstage": "closedwon",
                "closedate": won_at.isoformat(),
                "pipeline": "default",
                "deal_currency_code": "USD",
                "billing_type": "retainer",
                "amount": AMOUNT,
                "billing_cycle": "monthly",
                "billing_anchor_day": "1",
                "billing_timing": "advance",
                "service_start_date": start.isoformat(),
            },
            company_id=company,
            contact_ids=[contact],
        )
        deals.append(deal)
    return deals


async def run(profile: Profile) -> list[Row]:
    """The month start with batching off, then on (syncd's default); then the speed-up."""
    off = await measure(profile.monthstart_clients, batch_max=UNBATCHED)
    on = await measure(profile.monthstart_clients, batch_max=None)
    return [*rows(off), *rows(on), speedup(off, on)]


async def measure(clients: int, *, batch_max: int | None) -> MonthStart:
    """One month start for ``clients`` retainer clients at ``batch_max`` (see the module docstring)."""
    recorder = Recorder()
    async with stack.vendors(xero_limit_per_min=LIMIT_PER_MIN, xero_app=recorder.wrap) as bench:
        now = datetime.now(UTC)
        first = first_of_next_month(now.astimezone(ZONE).date())
        deals = seed_retainers(bench.hub, clients, start=first, won_at=now)
        with tempfile.TemporaryDirectory(prefix="syncd-bench-") as tmp:
            folder = Path(tmp)
            database = folder / "syncd.db"
            port = free_port()
            config = stack.write_config(
                folder,
                db_url=f"sqlite:///{database}",
                port=port,
                bench=bench,
                workers=WORKERS,
                xero_limit_per_min=LIMIT_PER_MIN,
                xero_concurrent=CONCURRENT,
                mapping=RETAINER,
                batch_max=batch_max,
            )
            started = time.perf_counter()
            async with stack.running(
                ["-m", "syncd", "run", "--config", str(config)], port=port, log=folder / "acquaint.log"
            ) as child:
                if not await _acquainted(child, bench.hub.client_secret, database, deals):
                    raise RuntimeError(f"acquaintance: not every engagement was stored: {child.tail()}")
            acquaint_s = time.perf_counter() - started
            acquaint_calls, before_problems = len(recorder.calls), Counter(recorder.problems)
            hub_before = sum(bench.hub.calls.values())
            return await _first_of_month(
                bench,
                recorder,
                config=config,
                port=port,
                database=database,
                deals=deals,
                due=datetime.combine(first, clock_time(0, 30), ZONE),
                batch_max=batch_max,
                marks=(acquaint_calls, hub_before, before_problems, acquaint_s),
            )


async def _acquainted(child: stack.Child, secret: str, database: Path, deals: list[str]) -> bool:
    """Send every deal's won webhook and wait (bounded) until syncd has stored each engagement."""
    hooks = DealWonWebhooks(f"{child.url}/webhooks/hubspot", secret)
    async with contextlib.aclosing(hooks):
        gate = asyncio.Semaphore(SENDERS)

        async def deliver(deal: str) -> int:
            async with gate:
                return await hooks.send(int(deal))

        statuses = await asyncio.gather(*(deliver(deal) for deal in deals))
    refused = [status for status in statuses if status != 200]
    if refused:
        raise RuntimeError(f"acquaintance: {len(refused)} webhooks answered {sorted(set(refused))}")
    deadline = time.monotonic() + 60.0 + len(deals) * 0.5
    while time.monotonic() < deadline:
        if _count(database, "SELECT count(*) FROM engagements WHERE won_at IS NOT NULL") >= len(deals):
            return True
        await asyncio.sleep(0.2)
    return False


async def _first_of_month(
    bench: stack.Vendors,
    recorder: Recorder,
    *,
    config: Path,
    port: int,
    database: Path,
    deals: list[str],
    due: datetime,
    batch_max: int | None,
    marks: tuple[int, int, Counter[str], float],
) -> MonthStart:
    """Start syncd at ``due`` (its first act is the recurring tick) and wait for every invoice."""
    acquaint_calls, hub_before, before_problems, acquaint_s = marks
    commits = Commits()
    bench.xero.on_commit = commits.committed
    drift_before = {op: bench.xero.calls[op] for op in DRIFT_OPS}
    # Twice the time the calls need at the limit (4 a client with batching off), plus two windows.
    bound_s = len(deals) * 4 / LIMIT_PER_MIN * 60 * 2 + 120.0
    offset_s = (due - datetime.now(UTC)).total_seconds()
    argv = ["-m", "bench.clocked", "--config", str(config), "--offset-s", f"{offset_s:.6f}"]
    async with stack.running(argv, port=port, log=config.parent / "monthstart.log") as child:
        complete = await commits.reach(len(deals), bound_s)
        drained = await written_back(bench, deals, 60.0)
        transactions = await child.metric(TRANSACTIONS)
    tick_started = _tick_started(database) - offset_s
    calls = recorder.calls[acquaint_calls:]
    return MonthStart(
        batch_max=batch_max,
        clients=len(deals),
        invoices=len(commits.times),
        xero_calls=len(calls),
        drift_xero_calls=sum(bench.xero.calls[op] - drift_before[op] for op in DRIFT_OPS),
        hub_calls=sum(bench.hub.calls.values()) - hub_before,
        refused=sum(1 for _at, status in calls if status == 429),
        problems=recorder.problems - before_problems,
        tick_to_last_s=max(commits.times) - tick_started if complete else None,
        transactions=transactions,
        drained=drained,
        acquaint_s=acquaint_s,
        acquaint_xero_calls=acquaint_calls,
    )


def _count(database: Path, query: str) -> int:
    """One number from the daemon's SQLite file (read-only, beside the running daemon: WAL)."""
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5.0)) as conn:
        try:
            return int(conn.execute(query).fetchone()[0])
        except sqlite3.OperationalError:  # the tables are not created yet
            return 0


def _tick_started(database: Path) -> float:
    """When the last recurring tick started, by the daemon's (business) clock, in epoch seconds."""
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as conn:
        (text,) = conn.execute("SELECT max(started_at) FROM ticks WHERE job = 'recurring'").fetchone()
    started = datetime.fromisoformat(text)
    return (started if started.tzinfo else started.replace(tzinfo=UTC)).timestamp()


def rows(outcome: MonthStart) -> list[Row]:
    """The rows of one run; the issue's targets apply with batching on."""
    on = outcome.batch_max != UNBATCHED
    setting = outcome.setting
    invoices = max(1, outcome.invoices)
    problems = ", ".join(f"{problem}: {count}" for problem, count in outcome.problems.items())
    note = (
        f"{outcome.invoices} of {outcome.clients} invoiced"
        + ("" if outcome.drained else "; write-backs NOT drained")
        + f"; acquaintance {outcome.acquaint_s:.0f} s, {outcome.acquaint_xero_calls} Xero calls before the 1st"
    )
    return [
        Row(
            measurement="monthstart",
            setting=setting,
            metric="tick → last invoice",
            value=outcome.tick_to_last_s,
            unit="s",
            note=note if outcome.tick_to_last_s is not None else f"not every invoice was committed; {note}",
        ),
        Row(
            measurement="monthstart",
            setting=setting,
            metric="Xero calls/invoice",
            value=(outcome.xero_calls - outcome.drift_xero_calls) / invoices,
            target=TARGET_CALLS if on else None,
            note=f"{outcome.xero_calls - outcome.drift_xero_calls} calls (OAuth token calls and the "
            f"{outcome.drift_xero_calls} of the drift guard run at syncd's start excluded: "
            f"{outcome.xero_calls / invoices:.3f} with them), {LIMIT_PER_MIN}/min limit",
        ),
        Row(
            measurement="monthstart",
            setting=setting,
            metric="429s",
            value=float(outcome.refused),
            target=TARGET_429 if on else None,
            note=problems,
        ),
        Row(
            measurement="monthstart",
            setting=setting,
            metric="HubSpot calls/invoice",
            value=outcome.hub_calls / invoices,
            note="write-backs and the reads around them",
        ),
        Row(
            measurement="monthstart",
            setting=setting,
            metric="transactions/invoice",
            value=None if outcome.transactions is None else outcome.transactions / invoices,
            note="the whole process on the 1st: start-up and the other start ticks included",
        ),
    ]


def speedup(off: MonthStart, on: MonthStart) -> Row:
    """Batching off's time ÷ batching on's (same clients, same limits)."""
    value = None
    if off.tick_to_last_s is not None and on.tick_to_last_s:
        value = off.tick_to_last_s / on.tick_to_last_s
    return Row(
        measurement="monthstart",
        setting=f"{on.clients} clients",
        metric="speed-up, batching on vs off",
        value=value,
        unit="×",
        target=TARGET_SPEEDUP,
        note="tick → last invoice, off ÷ on",
    )


if __name__ == "__main__":
    report.main("monthstart", run)
