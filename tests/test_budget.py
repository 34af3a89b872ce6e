"""A vendor rate budget shared by replicas: one row per key holding the next free slot."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from bench import budget
from bench.report import TINY
from syncd.plumbing.http import RateLimit, SharedBudget, VendorHttp, within
from syncd.store.db import RateBudgetRow, Store
from tests import harness

T0 = datetime(2026, 11, 27, 9, 0, 0, 500_000, tzinfo=UTC)  # half a second into a 60 s window


@pytest.fixture
async def replicas(postgres_url: str) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores on one migrated PostgreSQL database, as two replicas have."""
    first, second = Store.open(postgres_url), Store.open(postgres_url)
    await first.migrate()
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


@pytest.mark.postgres
async def test_two_replicas_each_get_their_own_slot(replicas: tuple[Store, Store]) -> None:
    """Concurrent takes from two stores get distinct slots, evenly spaced: 6 per 60 s at most."""
    first, second = replicas
    takes = [store.take_budget("xero:default", 60, 6, T0) for _ in range(10) for store in (first, second)]
    waits = [wait or 0.0 for wait in await asyncio.gather(*takes)]
    assert sorted(round(wait, 6) for wait in waits) == [10.0 * slot for slot in range(20)]
    (row,) = await first.select(RateBudgetRow)
    assert (row.key, row.next_at_s) == ("xero:default", pytest.approx(T0.timestamp() + 200))


@pytest.mark.postgres
async def test_a_budget_left_idle_grants_at_once_again(replicas: tuple[Store, Store]) -> None:
    """A call waits for the slot after the last one; after a quiet spell the next goes at once."""
    first, second = replicas
    assert await first.take_budget("xero:default", 60, 6, T0) is None
    assert await second.take_budget("xero:default", 60, 6, T0 + timedelta(seconds=4)) == pytest.approx(6)
    assert await second.take_budget("xero:default", 60, 6, T0 + timedelta(seconds=21)) is None
    assert await first.take_budget("hubspot:default", 60, 6, T0) is None  # another key is its own budget


async def test_a_budget_without_a_limit_is_refused(sqlite_url: str) -> None:
    """A limit below one is a configuration mistake, not an endless wait."""
    store = Store.open(sqlite_url)
    try:
        with pytest.raises(ValueError, match="grants nothing"):
            await store.take_budget("xero:default", 60, 0, T0)
    finally:
        await store.close()


def test_within_keeps_the_vendor_numbers_for_the_shared_budget() -> None:
    """The leaky bucket derived from "60 per 60 s" still carries 60 and 60 s."""
    (bucket,) = within(60, 60, concurrency=5)
    assert (bucket.window_limit, bucket.window_s, bucket.concurrency) == (60, 60, 5)
    assert bucket.max_requests == 15
    assert within(None, 60) == []


class FakeTime:
    """One replica's clock: it moves only when that replica sleeps."""

    def __init__(self) -> None:
        self.now = T0

    def clock(self) -> datetime:
        """The current fake time."""
        return self.now

    async def sleep(self, seconds: float) -> None:
        """Advance the fake time instead of waiting."""
        self.now += timedelta(seconds=seconds)
        await asyncio.sleep(0)


async def _replica(store: Store, seen: list[datetime], calls: int) -> None:
    """One replica's worker: ``calls`` requests one after another, each recorded at its replica's time."""
    fake = FakeTime()

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(fake.now)
        return httpx.Response(200, json={})

    # A roomy leaky bucket (it must not wait in real time here) carrying the vendor's 5 per 60 s.
    limits = [RateLimit(max_requests=1000, period_s=1, window_limit=5, window_s=60)]
    budget = SharedBudget(store, connection="xero", clock=fake.clock, sleep=fake.sleep)
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        http = VendorHttp(client, connection="xero", base_url="https://api.xero.test", limits=limits, budget=budget)
        for _ in range(calls):
            await http.request("GET", "/Invoices")


@pytest.mark.postgres
async def test_two_vendor_clients_sharing_a_budget_stay_under_the_limit(replicas: tuple[Store, Store]) -> None:
    """Two replicas' clients send at most the limit per window between them, and every call goes out."""
    seen: list[datetime] = []
    await asyncio.gather(*(_replica(store, seen, 7) for store in replicas))
    seen.sort()
    assert len(seen) == 14
    # However the vendor places its 60 s windows, none holds a sixth call.
    assert all(later - earlier > timedelta(seconds=60) for earlier, later in zip(seen, seen[5:], strict=False))


async def test_sqlite_runs_without_a_shared_budget(sqlite_url: str, tmp_path: Path) -> None:
    """On SQLite (one process) the connectors' HTTP has no shared budget and no row is written."""
    async with harness.stack(tmp_path, sqlite_url, shared_rate_budget=None, rate_limits=True) as stack:  # defaults
        xero = stack.daemon.runtime.connectors["xero"]
        assert xero.http.budget is None
        await xero.http.request("GET", "/Organisation")
        assert await stack.daemon.runtime.store.count(RateBudgetRow) == 0


@pytest.mark.postgres
async def test_postgres_replicas_share_the_budget_unless_switched_off(postgres_url: str, tmp_path: Path) -> None:
    """On PostgreSQL each Xero call takes from the shared budget; ``shared_rate_budget = false`` stops it."""
    async with harness.stack(tmp_path, postgres_url, shared_rate_budget=None, rate_limits=True) as stack:  # defaults
        xero = stack.daemon.runtime.connectors["xero"]
        assert isinstance(xero.http.budget, SharedBudget)
        await xero.http.request("GET", "/Organisation")
        keys = {row.key for row in await stack.daemon.runtime.store.select(RateBudgetRow)}
        assert keys == {"xero:default", "hubspot:default"}  # ensuring the properties spent HubSpot's
    async with harness.stack(tmp_path, postgres_url, daemon_extra="shared_rate_budget = false") as stack:
        assert stack.daemon.runtime.connectors["xero"].http.budget is None


@pytest.mark.slow
@pytest.mark.postgres
async def test_two_replica_bench_invoices_every_deal_without_429s(postgres_url: str) -> None:
    """Two syncd processes on one PostgreSQL database invoice every deal and draw no 429.

    (``postgres_url`` only skips the test where no server answers; the bench makes its own database.)
    """
    rows = await budget.two_replicas(TINY)
    (windows,) = [row for row in rows if row.metric == "Xero windows (60 s)"]
    assert windows.setting.endswith("2 replicas (postgres)")
    assert windows.note.startswith(f"{TINY.budget_deals} of {TINY.budget_deals} deals invoiced")
    assert [row.value for row in rows if row.metric == "429s (whole run)"] == [0.0]
