"""Vendor faults, in process: lost answers, an expired idempotency window, a third of calls failing.

Each scenario runs the whole stack of ``tests/harness.py`` at DEBUG, drives it to rest
(:func:`tests.faults.rig.settle`, moving the shared clock past every back-off) and ends
with the checker (``tests/faults/checker.py``): one invoice per billing event at most,
every won deal ending as an invoice, a dead letter or an outcome, the store and the
vendor one to one, the CRM showing the vendor's state, and no secret anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from connectors.emulation import Fault, FaultPlan, FaultRates, WebhookFaults
from connectors.hubspot.emulator import HubSpotEmulator
from connectors.xero.emulator import XeroEmulator
from syncd.plumbing.settings import Config
from tests.faults.rig import Clock, deals, settle, verify, win
from tests.harness import stack

DEBUG = 'log_level = "debug"'


async def test_an_answer_lost_after_the_vendor_committed_creates_one_invoice(
    tmp_path: Path, sqlite_url: str, run_logging: Callable[[Config], None], capsys: pytest.CaptureFixture[str]
) -> None:
    """Xero commits the invoice and its answer is lost, as is the deal write-back's: one invoice, the deal updated."""
    clock = Clock()
    xero = XeroEmulator(rate_limits=False, clock=clock)
    hub = HubSpotEmulator(rate_limits=False, clock=clock)
    xero.faults.add(Fault(kind="drop_response", method="PUT", path_contains="/Invoices", times=1))
    hub.faults.add(Fault(kind="drop_response", method="PATCH", path_contains="/objects/deals/", times=1))
    async with stack(tmp_path, sqlite_url, clock=clock, hub=hub, xero=xero, daemon_extra=DEBUG) as s:
        run_logging(s.config)
        (deal,) = deals(s, 1)
        await win(s, deal)
        await settle(s, clock)
        assert xero.faults.injected["drop_response"] == 1
        assert hub.faults.injected["drop_response"] == 1
        report = await verify(s, "lost answer", expect_won=[deal], logs=capsys.readouterr().err)
    assert report.invoices == 1
    assert hub.deal(deal)["properties"]["syncd_invoice_number"] == xero.invoices()[0]["InvoiceNumber"]


async def test_a_retry_after_the_idempotency_window_finds_the_invoice_by_its_key(
    tmp_path: Path, sqlite_url: str, run_logging: Callable[[Config], None], capsys: pytest.CaptureFixture[str]
) -> None:
    """The create's answer is lost and the retry comes after Xero forgot the key: the look-up finds it, no second one."""
    clock = Clock()
    xero = XeroEmulator(rate_limits=False, clock=clock, idempotency_ttl_s=60)
    # The create commits and its answer is lost; the request's own retries (safe within the
    # window, as they carry the Idempotency-Key) all meet a 503, so the effect is retried later.
    xero.faults.add(Fault(kind="drop_response", method="PUT", path_contains="/Invoices"))
    xero.faults.add(Fault(kind="status", status=503, method="PUT", path_contains="/Invoices", times=None))
    async with stack(tmp_path, sqlite_url, clock=clock, xero=xero, daemon_extra=DEBUG) as s:
        run_logging(s.config)
        (deal,) = deals(s, 1)
        await win(s, deal)
        await s.drain()
        assert len(xero.invoices()) == 1  # committed at Xero, unknown to syncd
        xero.faults.clear()
        creates = xero.calls["createInvoices"]
        clock.advance(xero.idempotency_ttl_s + 1)  # the retry falls after the window: no replay protects it
        await settle(s, clock)
        report = await verify(s, "idempotency window expired", expect_won=[deal], logs=capsys.readouterr().err)
    assert report.invoices == 1
    assert xero.calls["createInvoices"] == creates  # found by its key; never sent again


async def test_a_third_of_vendor_calls_failing_still_bills_each_deal_once(
    tmp_path: Path,
    sqlite_url: str,
    seed: int,
    run_logging: Callable[[Config], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """30 % of calls fail (429, 5xx, hung, lost after commit, slow) and webhooks come twice and out of order: once each."""
    clock = Clock()
    rates = FaultRates(rate_limited=0.08, server_error=0.08, timeout=0.05, lost_answer=0.06, slow=0.03)
    xero = XeroEmulator(rate_limits=False, clock=clock, faults=FaultPlan(seed))
    hub = HubSpotEmulator(rate_limits=False, clock=clock, faults=FaultPlan(seed + 10_000))
    hub.webhooks.faults = WebhookFaults(seed=seed, duplicate=0.3, reorder=0.3)
    async with stack(tmp_path, sqlite_url, clock=clock, hub=hub, xero=xero, daemon_extra=DEBUG) as s:
        run_logging(s.config)
        xero.faults.rates = hub.faults.rates = rates  # once started: the start-up's own set-up is not the subject
        won = deals(s, 6)
        for deal in won:
            await win(s, deal)
        await s.drain()
        for invoice in xero.invoices()[:3]:  # paid in part: the write-backs must follow the vendor forward
            await xero.pay_invoice(invoice["InvoiceID"], invoice["AmountDue"] / 2)
        await settle(s, clock)
        assert sum(xero.faults.injected.values()) + sum(hub.faults.injected.values()) > 0
        report = await verify(s, "30 % of vendor calls failing", seed, expect_won=won, logs=capsys.readouterr().err)
    assert (report.invoices, report.dead_letters) == (len(won), 0)
