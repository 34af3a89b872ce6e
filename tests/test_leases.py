"""Leases (syncd/plumbing/leases.py): a claim is not taken over mid-call, and a worker that lost one writes nothing.

Two daemons (each its own engine, store and owner) share one database, a SQLite file or
a PostgreSQL database, and one pair of emulators over ASGI transports. The harness's
lease is 5 s; the slow answers here are real waits of a few seconds, since a lease runs
on the real clock of the other worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
import structlog

from connectors.emulation import Fault
from syncd.engine.runtime import utcnow
from syncd.store.db import EffectRow
from tests.harness import Stack, seed_company, seed_deal, stack

LEASE_S = 5  # tests/harness.py
SLOW_S = 7.0  # a vendor answer slower than the lease


async def _queued_invoices(s: Stack, deals: int = 1) -> None:
    """``deals`` won deals of one company, processed up to their queued create_invoice effects."""
    company = seed_company(s.hub)
    for _ in range(deals):
        await s.hub.set_deal_properties(seed_deal(s.hub, company=company), {"dealstage": "closedwon"})
    while await s.daemon.engine.process_events(100):  # a claim may take fewer (rate limits)
        pass
    assert await s.daemon.runtime.store.count(EffectRow, EffectRow.status == "pending") == deals


def _key(s: Stack) -> str:
    """The daemon's encryption key: a second daemon on the same database needs it for the stored tokens."""
    key = s.config.daemon.encryption_key
    assert key is not None
    return key.get_secret_value()


async def _fault_taken(fault: Fault) -> None:
    """Until the emulator has applied ``fault`` to a request (it is then in flight)."""
    while fault.times:
        await asyncio.sleep(0.05)


@pytest.fixture
async def two(tmp_path: Path, db_url: str) -> AsyncIterator[tuple[Stack, Stack]]:
    """Daemons A and B on one database and one pair of emulators; B's clock is A's."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with (
        stack(tmp_path / "a", db_url) as a,
        stack(tmp_path / "b", db_url, hub=a.hub, xero=a.xero, encryption_key=_key(a)) as b,
    ):
        yield a, b


async def test_a_vendor_answer_slower_than_the_lease_is_not_taken_over(two: tuple[Stack, Stack]) -> None:
    """A worker waiting on a slow create keeps its lease: a second worker claims nothing and Xero gets one create."""
    a, b = two
    await _queued_invoices(a)
    slow = a.xero.faults.add(Fault(kind="latency", latency_s=SLOW_S, method="PUT", path_contains="/Invoices"))
    stop_b = asyncio.Event()
    with structlog.testing.capture_logs() as logs:
        worker_a = asyncio.create_task(a.daemon.engine.execute_effects(10))
        await _fault_taken(slow)  # A holds the claim and its create is in flight; B starts looking now
        worker_b = asyncio.create_task(b.daemon.engine.run_worker(stop_b, idle_s=0.2))
        assert await worker_a == 1
        stop_b.set()
        await worker_b

    assert a.xero.calls["createInvoices"] == 1
    assert len(a.xero.invoices()) == 1
    (effect,) = await a.daemon.runtime.store.select(EffectRow, EffectRow.kind == "create_invoice")
    assert (effect.status, effect.attempts) == ("done", 1)
    assert not [line for line in logs if line["event"] in ("lease_lost", "work_retry")]
    # The next claim of A takes only what fits in half the lease at the pace it measured.
    assert a.daemon.engine.claim_size("effect", 10) == 1


async def test_a_worker_whose_lease_was_taken_over_writes_nothing(tmp_path: Path, db_url: str) -> None:
    """A worker frozen past its lease (here: B's clock is ahead) is fenced: it logs lease_lost, no retry, no write."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ahead = [timedelta(0)]
    async with (
        stack(tmp_path / "a", db_url) as a,
        stack(
            tmp_path / "b", db_url, hub=a.hub, xero=a.xero, clock=lambda: utcnow() + ahead[0], encryption_key=_key(a)
        ) as b,
    ):
        await _queued_invoices(a)
        ahead[0] = timedelta(seconds=LEASE_S + 60)
        slow_read = a.xero.faults.add(Fault(kind="latency", latency_s=3.0, method="GET", path_contains="/Contacts"))
        with structlog.testing.capture_logs() as logs:
            worker_a = asyncio.create_task(a.daemon.engine.execute_effects(10))
            await _fault_taken(slow_read)  # A is reading the contact when B takes the row over
            assert await b.daemon.engine.execute_effects(10) == 1
            assert await worker_a == 1
        (effect,) = await a.daemon.runtime.store.select(EffectRow, EffectRow.kind == "create_invoice")

    assert (effect.status, effect.attempts) == ("done", 2)
    assert a.xero.calls["createInvoices"] == 1  # B's only
    assert a.xero.calls["createContacts"] == 1
    assert len(a.xero.invoices()) == 1
    lost = [line for line in logs if line["event"] == "lease_lost"]
    assert [(line["source"], line["attempt"]) for line in lost] == [("effect", 1)]
    assert not [line for line in logs if line["event"] in ("work_retry", "dead_lettered")]


async def test_in_request_retries_stay_within_the_lease(tmp_path: Path, db_url: str) -> None:
    """A Retry-After longer than the lease is not slept through in the request: the row goes back to the queue."""
    async with stack(tmp_path, db_url) as s:
        await _queued_invoices(s)
        s.xero.faults.add(Fault(kind="status", status=503, method="PUT", path_contains="/Invoices", times=1))
        s.xero.faults.add(Fault(kind="status", status=503, retry_after_s=30, method="PUT", path_contains="/Invoices"))
        claimed_at = utcnow()
        assert await s.daemon.engine.execute_effects(10) == 1

        (slept,) = s.sleeps  # the short back-off, within the request; not the 30 s
        assert slept < LEASE_S / 2
        assert s.xero.invoices() == []
        (effect,) = await s.daemon.runtime.store.select(EffectRow, EffectRow.kind == "create_invoice")
        assert (effect.status, effect.attempts, effect.lease_owner, effect.lease_until) == ("pending", 1, None, None)
        assert "503" in (effect.last_error or "")
        assert timedelta(seconds=29) < effect.next_at - claimed_at < timedelta(seconds=40)


async def test_a_claim_takes_only_what_fits_in_the_lease(tmp_path: Path, db_url: str) -> None:
    """At Xero's 60 calls a minute, a 5 s lease fits one invoice: a claim takes one row, not ten."""
    async with stack(tmp_path, db_url, rate_limits=True) as s:
        await _queued_invoices(s, deals=3)
        assert await s.daemon.engine.execute_effects(10) == 1
        assert len(s.xero.invoices()) == 1
        untouched = await s.daemon.runtime.store.select(
            EffectRow, EffectRow.kind == "create_invoice", EffectRow.attempts == 0
        )
        assert len(untouched) == 2


async def test_rows_worked_together_are_claimed_by_the_pace_of_batched_calls(tmp_path: Path, db_url: str) -> None:
    """At Xero's pace a 5 s lease fits one row worked alone, but many rows sharing batched calls (50 to a call)."""
    async with stack(tmp_path, db_url, rate_limits=True) as s:
        engine = s.daemon.engine
        interval = s.daemon.runtime.call_interval_s()  # Xero's, the slowest: over a second a call
        assert interval > 1.0
        assert engine.claim_size("effect", 50) == 1  # half the lease, 2.5 s, at 4 calls a row
        shared = engine.claim_size("effect", 50, together=50)
        assert shared == int(2.5 / (4 * interval / 50))  # Xero and HubSpot both batch: a 50th of a call a row
        assert shared > 20


async def test_a_stopping_worker_finishes_the_call_in_flight_and_starts_no_other(tmp_path: Path, db_url: str) -> None:
    """Stop during a slow read: the read finishes, no write follows, and every claimed row is back in the queue."""
    async with stack(tmp_path, db_url) as s:
        await _queued_invoices(s, deals=3)
        slow_read = s.xero.faults.add(Fault(kind="latency", latency_s=1.0, method="GET", path_contains="/Contacts"))
        engine = s.daemon.engine
        with structlog.testing.capture_logs() as logs:
            worker = asyncio.create_task(engine.execute_effects(10))
            await _fault_taken(slow_read)
            engine.stop.set()  # what SIGTERM does (syncd/daemon.py)
            assert await worker == 3
        rows = await s.daemon.runtime.store.select(EffectRow, EffectRow.kind == "create_invoice", order_by=EffectRow.id)

    assert s.xero.calls["createContacts"] == 0
    assert s.xero.calls["createInvoices"] == 0
    first, *rest = rows
    assert (first.status, first.attempts, first.lease_owner, first.last_error) == (
        "pending",
        1,
        None,
        "interrupted at shutdown",
    )
    assert [(row.status, row.attempts, row.first_attempt_at, row.lease_owner) for row in rest] == [
        ("pending", 0, None, None)
    ] * 2
    events = [line["event"] for line in logs if line["event"] in ("work_interrupted", "claims_released", "work_retry")]
    assert events == ["work_interrupted", "claims_released"]
