"""Poll ticks: a change missed by webhooks is found by polling; ticks run once per window."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from connectors.hubspot.emulator import HubSpotEmulator
from connectors.xero.emulator import XeroEmulator
from syncd.engine.loop import Engine
from syncd.engine.runtime import Runtime
from syncd.engine.scheduler import poll_connection, tick_poll
from syncd.plumbing.settings import load_config
from syncd.store.db import CursorRow, EventRow
from tests.harness import seed_deal, write_config


class Clock:
    """A clock the test moves by hand, shared by the emulators and syncd."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 27, 15, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Polled:
    hub: HubSpotEmulator
    xero: XeroEmulator
    runtime: Runtime
    engine: Engine
    clock: Clock


@pytest.fixture
async def polled(tmp_path: Path, db_url: str) -> AsyncIterator[Polled]:
    """syncd without webhooks: the emulators deliver none, only polls see changes."""
    clock = Clock()
    hub = HubSpotEmulator(rate_limits=False, clock=clock)
    xero = XeroEmulator(rate_limits=False, clock=clock)
    config = load_config(write_config(tmp_path, db_url, hub, xero, daemon_extra="billing_start = 2026-01-01T00:00:00Z"))
    mounts = {
        "http://hubspot.test": httpx.ASGITransport(app=hub.app),
        "http://xero.test": httpx.ASGITransport(app=xero.app),
    }
    runtime = await Runtime.start(config, clock=clock, mounts=mounts)
    try:
        await runtime.connectors["hubspot"].ensure_properties()
        yield Polled(hub=hub, xero=xero, runtime=runtime, engine=Engine(runtime), clock=clock)
    finally:
        await runtime.aclose()


async def test_a_won_deal_without_a_webhook_is_found_by_polling(polled: Polled) -> None:
    """With no webhook delivered, the poll tick finds the won deal and it is invoiced once."""
    p = polled
    assert await poll_connection(p.runtime, "hubspot") == 0  # first poll: the cursor starts now
    deal = seed_deal(p.hub)
    p.clock.advance(5)
    await p.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
    p.clock.advance(120)  # past the connector's search-lag allowance
    assert await poll_connection(p.runtime, "hubspot") >= 1
    await p.engine.drain()
    assert len(p.xero.invoices()) == 1
    # syncd's own write-back bumped the deal's modification date: the poll knows it and
    # does not hint it back (no re-read spent on our own echo).
    p.clock.advance(120)
    reads = p.hub.calls["GET /crm/v3/objects/deals/{id}"]
    assert await poll_connection(p.runtime, "hubspot") == 0
    await p.engine.drain()
    assert p.hub.calls["GET /crm/v3/objects/deals/{id}"] == reads
    assert len(p.xero.invoices()) == 1
    # a person's later edit is a change again
    await p.hub.set_deal_properties(deal, {"description": "phase 2"})
    p.clock.advance(120)
    assert await poll_connection(p.runtime, "hubspot") == 1
    cursor = await p.runtime.store.get(CursorRow, "hubspot", "changes")
    assert cursor.last_success_at == p.clock.now
    assert cursor.last_error is None


async def test_a_payment_without_a_webhook_is_found_by_polling_xero(polled: Polled) -> None:
    """A payment Xero reports only through its change feed still reaches the deal."""
    p = polled
    deal = seed_deal(p.hub)
    await p.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
    await p.engine.process_deal(p.runtime.pipelines[0], deal)
    await p.engine.drain()
    (invoice,) = p.xero.invoices()
    # the first poll reads from billing_start: it sees the invoice just created (no change to write)
    assert await poll_connection(p.runtime, "xero") == 1
    p.clock.advance(60)
    await p.xero.pay_invoice(invoice["InvoiceID"], Decimal(str(invoice["AmountDue"])))
    p.clock.advance(60)
    assert await poll_connection(p.runtime, "xero") >= 1
    await p.engine.drain()
    assert p.hub.deal(deal)["properties"]["syncd_invoice_status"] == "paid"


async def test_a_poll_window_runs_once_across_replicas(polled: Polled) -> None:
    """Two replicas ticking in the same window poll once; the next window polls again."""
    p = polled
    await tick_poll(p.runtime, "hubspot")
    await tick_poll(p.runtime, "hubspot")
    assert (await p.runtime.store.get(CursorRow, "hubspot", "changes")) is not None
    before = p.hub.calls.total()
    await tick_poll(p.runtime, "hubspot")
    assert p.hub.calls.total() == before
    p.clock.advance(p.runtime.config.daemon.poll_interval_s)
    await tick_poll(p.runtime, "hubspot")
    assert p.hub.calls.total() > before


async def test_a_failing_poll_is_recorded_on_the_cursor(polled: Polled) -> None:
    """A vendor outage during a poll is kept on the cursor row for `syncd status`, nothing raised."""
    from connectors.emulation import Fault

    p = polled
    await poll_connection(p.runtime, "hubspot")
    p.hub.faults.add(Fault(kind="status", status=401, times=None))
    assert await poll_connection(p.runtime, "hubspot") == 0
    cursor = await p.runtime.store.get(CursorRow, "hubspot", "changes")
    assert cursor.last_error
    assert await p.runtime.store.count(EventRow) == 0


async def test_overdue_invoices_are_aged_on_the_deal(polled: Polled) -> None:
    """Once an unpaid invoice is past due, the daily aging writes "overdue" and the days onto the deal."""
    p = polled
    deal = seed_deal(p.hub, terms="14")
    await p.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
    await p.engine.process_deal(p.runtime.pipelines[0], deal)
    await p.engine.drain()
    assert p.hub.deal(deal)["properties"]["syncd_invoice_status"] == "authorised"
    assert await p.engine.refresh_aging() == 0  # not yet due
    p.clock.advance(20 * 86400)
    assert await p.engine.refresh_aging() == 1
    assert await p.engine.refresh_aging() == 0  # once a day
    await p.engine.drain()
    props = p.hub.deal(deal)["properties"]
    assert props["syncd_invoice_status"] == "overdue"
    assert int(props["syncd_days_overdue"]) == 6
