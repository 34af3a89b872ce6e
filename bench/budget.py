"""Rate-budget use: how much of Xero's per-minute limit syncd spends, and how many 429s it draws.

Xero quota use (BENCHMARKS.md). The Xero emulator enforces its limits (5 concurrent calls,
5,000 a day, and a per-minute limit scaled from Xero's 60 to **600 per minute** so a
run takes minutes, not hours); syncd is configured with the same 600 per minute and 5
concurrent. Won deals (ten per client, so most deals reuse a known Xero contact) are
pushed through by 16 closed-loop clients until every one is invoiced. Every request
reaching the Xero API is recorded with its time and status.

The emulator's windows are rebuilt from the recorded calls (a window opens at the first
call after the previous one expired). Reported: the accepted calls as a share of the
limit in steady state (the full windows after the first, which a fresh client-side
limiter may overrun; the last window is cut short by the end of the run), and the
number of 429s (all, and in steady state).

Target: ≥ 95 % of the limit with zero 429s in steady state.

With PostgreSQL (profiles that run it, when a server answers) the same deals go through
**two syncd replicas** on one database, the webhooks alternating between them. Each is
configured with the full 600 per minute (its own limiter smooths its bursts) and the
shared rate budget on (``syncd.plumbing.http.SharedBudget``: evenly spaced call slots reserved
in one PostgreSQL row), so the two together must stay under the one Xero limit; Xero's
5 concurrent calls are split by configuration (2 each), as the budget shares only the
per-minute count.

Run alone: ``python -m bench.budget`` (``--full``: 1,000 deals, about 6 minutes per run).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench import report, stack
from bench.e2e import InvoiceWatch, deal_invoiced, written_back
from bench.load import DealWonWebhooks, Exhausted, closed_loop
from bench.report import Profile, Row, Target

LIMIT_PER_MIN = 600
CONCURRENT = 5
REPLICAS = 2
CLIENTS = 16
DEALS_PER_COMPANY = 10
WINDOW_S = 60.0
TARGET_SHARE = Target(op=">=", limit=95.0)
TARGET_429 = Target(op="<=", limit=0.0)


@dataclass
class Recorder:
    """Wraps the Xero ASGI app and records ``(monotonic time, status)`` of each API call.

    Attributes:
        calls: every API call's time and status.
        problems: for each 429, Xero's ``X-Rate-Limit-Problem`` (``minute``, ``concurrent`` …).
    """

    calls: list[tuple[float, int]] = field(default_factory=list)
    problems: Counter[str] = field(default_factory=Counter)

    def wrap(self, app: Any) -> Callable[..., Any]:
        """The wrapped app (token requests are not API calls and are not recorded)."""

        async def recorded(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http" or not scope["path"].startswith("/api.xro/"):
                await app(scope, receive, send)
                return

            async def watch(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    self.calls.append((time.monotonic(), int(message["status"])))
                    if message["status"] == 429:
                        headers = dict(message.get("headers") or [])
                        self.problems[headers.get(b"x-rate-limit-problem", b"?").decode()] += 1
                await send(message)

            await app(scope, receive, watch)

        return recorded


@dataclass(frozen=True, kw_only=True)
class Window:
    """One of the emulator's fixed rate-limit windows, rebuilt from the recorded calls.

    The emulator opens a window at the first call after the previous one expired
    (:class:`connectors.emulation.WindowLimiter`); accepted calls count against it.

    Attributes:
        accepted: calls answered with anything but 429.
        refused: calls answered 429.
    """

    accepted: int
    refused: int


def windows(calls: list[tuple[float, int]]) -> list[Window]:
    """The windows the calls fell into, in order (the last one usually partial)."""
    found: list[Window] = []
    start: float | None = None
    accepted = refused = 0
    for at, status in calls:
        if start is None or at - start >= WINDOW_S:
            if start is not None:
                found.append(Window(accepted=accepted, refused=refused))
            start, accepted, refused = at, 0, 0
        if status == 429:
            refused += 1
        else:
            accepted += 1
    if start is not None:
        found.append(Window(accepted=accepted, refused=refused))
    return found


def share_pct(full: list[Window]) -> float:
    """Accepted calls as a percentage of what the limit allowed in these windows."""
    return sum(w.accepted for w in full) / (LIMIT_PER_MIN * len(full)) * 100


async def run(profile: Profile) -> list[Row]:
    """Push ``profile.budget_deals`` deals through the rate-limited Xero emulator (then two replicas)."""
    rows = await one_replica(profile)
    if profile.postgres and stack.postgres_available():
        rows += await two_replicas(profile)
    return rows


async def one_replica(profile: Profile) -> list[Row]:
    """One syncd process (SQLite) spends the Xero budget alone."""
    recorder = Recorder()
    deals_total = profile.budget_deals
    async with stack.vendors(xero_limit_per_min=LIMIT_PER_MIN, xero_app=recorder.wrap) as bench:
        lines = stack.seed_won_deals(bench.hub, deals_total, deals_per_company=DEALS_PER_COMPANY)
        async with stack.syncd(
            bench, workers=CLIENTS, xero_limit_per_min=LIMIT_PER_MIN, xero_concurrent=CONCURRENT
        ) as child:
            completed, failures, elapsed = await _push(bench, [child.url], lines)
    return _rows(
        recorder, completed, failures, deals_total, elapsed, setting=f"{deals_total} deals, {LIMIT_PER_MIN}/min"
    )


async def two_replicas(profile: Profile) -> list[Row]:
    """Two syncd processes on one PostgreSQL database share the Xero budget."""
    recorder = Recorder()
    deals_total = profile.budget_deals
    async with stack.vendors(xero_limit_per_min=LIMIT_PER_MIN, xero_app=recorder.wrap) as bench:
        lines = stack.seed_won_deals(bench.hub, deals_total, deals_per_company=DEALS_PER_COMPANY)
        async with stack.replicas(
            bench,
            count=REPLICAS,
            workers=CLIENTS,
            xero_limit_per_min=LIMIT_PER_MIN,
            xero_concurrent=CONCURRENT // REPLICAS,
        ) as children:
            completed, failures, elapsed = await _push(bench, [child.url for child in children], lines)
    setting = f"{deals_total} deals, {LIMIT_PER_MIN}/min, {REPLICAS} replicas (postgres)"
    return _rows(recorder, completed, failures, deals_total, elapsed, setting=setting)


async def _push(bench: stack.Vendors, urls: list[str], lines: dict[str, str]) -> tuple[int, str, float]:
    """Send every deal's webhook (to the replicas in turn) and wait for its invoice and write-back.

    Returns:
        deals invoiced, the failures summary, and the seconds it took.
    """
    watch = InvoiceWatch(lines)
    bench.xero.on_commit = watch.committed
    hooks = [DealWonWebhooks(f"{url}/webhooks/hubspot", bench.hub.client_secret) for url in urls]
    async with contextlib.AsyncExitStack() as closing:
        for sender in hooks:
            closing.push_async_callback(sender.aclose)
        deals = iter(lines.values())

        async def work(n: int) -> float | None:
            deal = next(deals, None)
            if deal is None:
                raise Exhausted
            return await deal_invoiced(hooks[n % len(hooks)], watch, deal)

        # Bounded: twice the time the calls need at the limit, plus two windows.
        bound_s = len(lines) * 4 / LIMIT_PER_MIN * 60 * 2 + 2 * WINDOW_S
        started = time.perf_counter()
        loop = await closed_loop(clients=CLIENTS, duration_s=bound_s, warmup_s=0.0, work=work)
        elapsed = time.perf_counter() - started
        await written_back(bench, watch.invoiced, 60.0)
    return loop.completed, loop.failures, elapsed


def _rows(recorder: Recorder, completed: int, failures: str, deals: int, elapsed: float, *, setting: str) -> list[Row]:
    found = windows(recorder.calls)
    accepted = sum(w.accepted for w in found)
    note = f"{completed} of {deals} deals invoiced in {elapsed:.0f} s ({failures}); {accepted / max(1, completed):.1f} Xero calls/deal"
    full = found[:-1]  # the last window is cut short by the end of the run
    steady = full[1:]  # the first one may be overrun by a fresh client-side limiter
    problems = ", ".join(f"{problem}: {count}" for problem, count in recorder.problems.items())
    rows = [
        Row(measurement="budget", setting=setting, metric="Xero windows (60 s)", value=float(len(found)), note=note),
        Row(
            measurement="budget",
            setting=setting,
            metric="429s (whole run)",
            value=float(sum(w.refused for w in found)),
            note=problems,
        ),
    ]
    if not steady:
        note = "needs three windows or more: use --full"
        return [
            *rows,
            Row(
                measurement="budget",
                setting=setting,
                metric="share of limit (steady)",
                value=None,
                unit="%",
                target=TARGET_SHARE,
                note=note,
            ),
        ]
    per_window = ", ".join(str(w.accepted) for w in steady)
    return [
        *rows,
        Row(
            measurement="budget",
            setting=setting,
            metric="share of limit (steady)",
            value=share_pct(steady),
            unit="%",
            target=TARGET_SHARE,
            note=f"full windows after the first; accepted per window: {per_window}",
        ),
        Row(
            measurement="budget",
            setting=setting,
            metric="429s (steady)",
            value=float(sum(w.refused for w in steady)),
            target=TARGET_429,
        ),
    ]


if __name__ == "__main__":
    report.main("budget", run)
