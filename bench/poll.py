"""Incremental poll: a few changed deals among many, found through the change feed.

Polling (BENCHMARKS.md). The HubSpot emulator holds N deals last modified two hours
ago; the poll cursor is taken one hour ago (``poll_changes(None)``); then a few deals
are edited, and, five minutes later (past the connector's ``poll_lag_s``), the feed is
read from the cursor until it says there is no more. Reported: the API calls that
took (counted at the emulator), the deals hinted, and the time of the ``poll_changes``
calls. The emulator runs in this process behind ``httpx.ASGITransport`` with an
injected clock, so the time includes the emulator's own search over all N deals (a
linear scan), which HubSpot would do on its side.

Target: calls proportional to the changes (a handful), not to the total.

Run alone: ``python -m bench.poll`` (``--full`` for 100,000 deals).
"""

from __future__ import annotations

import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from bench import report, stack
from bench.report import Profile, Row, Target
from connectors.hubspot.emulator import HubSpotEmulator
from connectors.xero.emulator import XeroEmulator
from syncd.core.interfaces import Crm
from syncd.engine.runtime import Runtime
from syncd.plumbing.settings import load_config

TARGET_CALLS = Target(op="<=", limit=5.0)
MAX_PAGES = 100


class Clock:
    """A settable clock shared by the emulator and syncd's runtime."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        """The current (set) time."""
        return self.now


async def run(profile: Profile) -> list[Row]:
    """Poll once after ``profile.poll_changed`` changes among ``profile.poll_total`` deals."""
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    clock = Clock(base)
    hub = HubSpotEmulator(rate_limits=False, clock=clock)
    deals = [
        hub.add_deal({"dealname": f"Deal {i}", "amount": "100.00", "pipeline": "default", "dealstage": "contractsent"})
        for i in range(profile.poll_total)
    ]
    with tempfile.TemporaryDirectory(prefix="syncd-bench-") as tmp:
        folder = Path(tmp)
        bench = stack.Vendors(
            hub=hub, xero=XeroEmulator(rate_limits=False), hub_url="http://hubspot.test", xero_url="http://xero.test"
        )
        config = stack.write_config(
            folder, db_url=f"sqlite:///{folder / 'syncd.db'}", port=8080, bench=bench, workers=1
        )
        runtime = await Runtime.start(
            load_config(config), clock=clock, mounts={"http://hubspot.test": httpx.ASGITransport(app=hub.app)}
        )
        try:
            crm = runtime.connectors["hubspot"]
            clock.now = base + timedelta(hours=1)
            cursor = (await crm.poll_changes(None)).cursor
            clock.now = base + timedelta(hours=1, minutes=1)
            step = max(1, len(deals) // profile.poll_changed)
            for deal in deals[::step][: profile.poll_changed]:
                await hub.set_deal_properties(deal, {"amount": "250.00"})
            clock.now = base + timedelta(hours=1, minutes=6)
            hub.calls.clear()
            hinted, pages, seconds = await _poll(crm, cursor)
        finally:
            await runtime.aclose()
    setting = f"{profile.poll_changed} changed of {profile.poll_total:,}"
    note = f"{hinted} deals hinted in {pages} poll_changes call(s)"
    return [
        Row(
            measurement="poll",
            setting=setting,
            metric="API calls",
            value=float(sum(hub.calls.values())),
            target=TARGET_CALLS,
            note=note,
        ),
        Row(
            measurement="poll",
            setting=setting,
            metric="time",
            value=seconds * 1000,
            unit="ms",
            note="includes the emulator's scan of every deal",
        ),
    ]


async def _poll(crm: Crm, cursor: str) -> tuple[int, int, float]:
    """Read the feed from ``cursor`` until it has no more (bounded); hints, pages, seconds."""
    hinted = pages = 0
    started = time.perf_counter()
    for _ in range(MAX_PAGES):
        page = await crm.poll_changes(cursor)
        hinted += len(page.hints)
        pages += 1
        cursor = page.cursor
        if not page.more:
            break
    return hinted, pages, time.perf_counter() - started


if __name__ == "__main__":
    report.main("poll", run)
