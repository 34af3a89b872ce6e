"""Batches keep every record's guarantees: crash mid-batch, lost answer, one element refused, split across replicas.

With ``[daemon].batch_max`` above 1 (the default) a worker works a claim's rows at once and
their vendor calls share requests (``syncd/engine/batching.py``). Each scenario ends with
the checker (``tests/faults/checker.py``): one invoice per billing event at most, every
won deal ending as an invoice, a dead letter or an outcome, the store and the vendor one
to one, the CRM showing the vendor's state. Each also checks that a batch really carried
several records, so the scenario cannot pass by running one record at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from connectors.emulation import Fault
from connectors.hubspot.emulator import HubSpotEmulator
from connectors.xero.emulator import XeroEmulator
from syncd.plumbing import failpoints
from syncd.plumbing.settings import Config
from syncd.store.db import ClientRow, DeadLetterRow, InvoiceRow, Store
from tests.faults.live import PUBLIC_URL, live
from tests.faults.rig import STEP_S, Clock, deals, pending, verify, win
from tests.harness import Stack, seed_deal, stack

DEBUG = 'log_level = "debug"'
BATCH = 8


async def rounds(stacks: list[Stack], clock: Clock, *, limit: int = 40) -> None:
    """Worker rounds (claims worked at once, calls batched) on every replica, past every back-off, until nothing is pending."""
    for _ in range(limit):
        for s in stacks:
            await s.hub.webhooks.flush()
            await s.xero.webhooks.flush()
        while sum(await asyncio.gather(*(s.daemon.engine.work_round(BATCH * 2) for s in stacks))):
            pass
        if await pending(stacks[0]) == 0:
            return
        clock.advance(STEP_S)
    raise AssertionError(f"work still pending after {limit} rounds")


def carried(s: Stack, kind: str) -> int:
    """Records the batched calls of ``kind`` carried in this replica (calls of one record not counted)."""
    return s.daemon.engine.batcher.carried[kind]


async def test_an_answer_lost_for_a_batch_creates_each_invoice_once(
    tmp_path: Path, sqlite_url: str, run_logging: Callable[[Config], None], capsys: pytest.CaptureFixture[str]
) -> None:
    """Xero commits a batch of invoices and the answer is lost: each is found by its key, none is created twice."""
    clock = Clock()
    xero = XeroEmulator(rate_limits=False, clock=clock)
    hub = HubSpotEmulator(rate_limits=False, clock=clock)
    xero.faults.add(Fault(kind="drop_response", method="PUT", path_contains="/Invoices", times=1))
    hub.faults.add(Fault(kind="drop_response", method="POST", path_contains="/deals/batch/update", times=1))
    async with stack(tmp_path, sqlite_url, clock=clock, hub=hub, xero=xero, daemon_extra=DEBUG) as s:
        run_logging(s.config)
        won = deals(s, BATCH)
        for deal in won:
            await win(s, deal)
        await rounds([s], clock)
        assert xero.faults.injected["drop_response"] == 1
        assert hub.faults.injected["drop_response"] == 1
        assert carried(s, "create_invoices") >= 2
        report = await verify(s, "lost answer for a batch", expect_won=won, logs=capsys.readouterr().err)
    assert report.invoices == BATCH
    assert len(xero.invoices()) == BATCH


async def test_one_refused_element_is_dead_lettered_alone_and_the_rest_of_its_batch_is_invoiced(
    tmp_path: Path, sqlite_url: str, run_logging: Callable[[Config], None], capsys: pytest.CaptureFixture[str]
) -> None:
    """Xero refuses one invoice of a batch: it is dead-lettered with Xero's message, the others are created once."""
    clock = Clock()
    xero = XeroEmulator(rate_limits=False, clock=clock)
    message = (
        "Account code '4000' has been archived, or has been deleted. Each line item must use a valid account code."
    )
    xero.faults.refuse_element("PO-REFUSED", message)
    async with stack(tmp_path, sqlite_url, clock=clock, xero=xero, daemon_extra=DEBUG) as s:
        run_logging(s.config)
        won = deals(s, BATCH - 1)
        refused = seed_deal(s.hub, po="PO-REFUSED")
        for deal in [*won, refused]:
            await win(s, deal)
        await rounds([s], clock)
        assert xero.faults.injected["element_refused"] == 1
        assert carried(s, "create_invoices") >= 2
        letters = await s.daemon.runtime.store.select(DeadLetterRow)
        assert len(letters) == 1, [letter.reason for letter in letters]
        assert message in letters[0].reason
        assert letters[0].source == "effect"
        report = await verify(s, "one element refused", expect_won=[*won, refused], logs=capsys.readouterr().err)
    assert report.invoices == BATCH - 1
    assert all("PO-REFUSED" not in invoice.get("Reference", "") for invoice in xero.invoices())


@pytest.mark.postgres
async def test_batches_split_across_three_replicas_create_each_invoice_once(
    tmp_path: Path, postgres_url: str, run_logging: Callable[[Config], None], capsys: pytest.CaptureFixture[str]
) -> None:
    """Three replicas on one PostgreSQL database claim parts of the same wave and batch their parts: once each."""
    clock = Clock()
    hub = HubSpotEmulator(rate_limits=False, clock=clock)
    xero = XeroEmulator(rate_limits=False, clock=clock)
    key = Fernet.generate_key().decode()
    async with contextlib.AsyncExitStack() as running:
        stacks: list[Stack] = []
        for index in range(3):
            folder = tmp_path / f"replica{index}"
            folder.mkdir()
            stacks.append(
                await running.enter_async_context(
                    stack(folder, postgres_url, clock=clock, hub=hub, xero=xero, daemon_extra=DEBUG, encryption_key=key)
                )
            )
        run_logging(stacks[0].config)
        won = deals(stacks[0], 3 * BATCH)
        for deal in won:
            await win(stacks[0], deal)
        await rounds(stacks, clock)
        batched = [carried(s, "create_invoices") for s in stacks]
        assert sum(batched) >= 2, batched
        report = await verify(stacks[0], "batches across replicas", expect_won=won, logs=capsys.readouterr().err)
    assert report.invoices == 3 * BATCH
    assert len(xero.invoices()) == 3 * BATCH


@contextlib.asynccontextmanager
async def _queued_invoices(
    tmp_path: Path, database_url: str, hub: HubSpotEmulator, xero: XeroEmulator, key: str
) -> AsyncIterator[list[str]]:
    """``BATCH`` won deals processed in process: their invoices queued, none created yet."""
    (tmp_path / "prep").mkdir()
    async with stack(tmp_path / "prep", database_url, hub=hub, xero=xero, encryption_key=key) as prep:
        won = deals(prep, BATCH)
        for deal in won:
            await win(prep, deal)
        while await prep.daemon.engine.process_events(100):  # the invoices are queued, none created
            pass
        yield won


@pytest.mark.slow
async def test_a_sigkill_mid_batch_then_a_restart_leaves_one_invoice_per_deal(tmp_path: Path, sqlite_url: str) -> None:
    """A real ``syncd run`` creates a batch of invoices and is SIGKILLed before recording any: the restart finds them all."""
    async with live(tmp_path, sqlite_url, daemon_extra="batch_wait_ms = 1000\n") as s:
        match = re.search(r'encryption_key = "([^"]+)"', s.replicas[0].config.read_text(encoding="utf-8"))
        assert match is not None
        async with _queued_invoices(tmp_path, sqlite_url, s.hub, s.xero, match.group(1)) as won:
            pass
        s.hub.subscribe(f"{PUBLIC_URL}/webhooks/hubspot", s.balanced)  # the prep stack took the subscription
        (replica,) = s.replicas
        replica.start(env={failpoints.ENV: "after_vendor_2xx:kill"})
        assert await replica.exited(60) == -signal.SIGKILL, s.tails()
        assert s.xero.calls["createInvoices"] == 1  # one request carried the whole claim
        assert len(s.xero.invoices()) == BATCH  # all created at Xero, none recorded by syncd
        store = Store.open(sqlite_url)
        try:
            assert await store.count(InvoiceRow) == 0
        finally:
            await store.close()
        await s.start()
        await s.settled(won)
        assert await replica.stop() == 0
        report = await s.verify("sigkill mid-batch", expect_won=won)
    assert report.invoices == BATCH
    assert s.xero.calls["createInvoices"] == 1  # the restart found every one by its key: none sent again


async def test_deals_of_one_new_client_claimed_together_share_one_customer(
    tmp_path: Path, sqlite_url: str, run_logging: Callable[[Config], None], capsys: pytest.CaptureFixture[str]
) -> None:
    """Four deals of one new client in one claim: each invoice's customer step starts from the client row as its
    processing read it (no customer yet), and still one contact is created and every invoice goes to it."""
    clock = Clock()
    xero = XeroEmulator(rate_limits=False, clock=clock)
    hub = HubSpotEmulator(rate_limits=False, clock=clock)
    async with stack(tmp_path, sqlite_url, clock=clock, hub=hub, xero=xero, daemon_extra=DEBUG) as s:
        run_logging(s.config)
        company = hub.add_company({"name": "Fabrikam", "legal_name": "Fabrikam Pty Ltd", "default_po_number": "PO-7"})
        contact = hub.add_contact(
            {"firstname": "Ira", "lastname": "Lund", "email": "ap@fabrikam.example"}, company_id=company
        )
        won = [seed_deal(hub, company=(company, contact)) for _ in range(4)]
        for deal in won:
            await win(s, deal)
        await rounds([s], clock)
        report = await verify(s, "deals of one new client together", expect_won=won, logs=capsys.readouterr().err)
        client_ids = {str(row.external_ids.get("xero")) for row in await s.daemon.runtime.store.select(ClientRow)}
    assert report.invoices == 4
    (created,) = xero.contacts()
    assert {invoice["Contact"]["ContactID"] for invoice in xero.invoices()} == {created["ContactID"]}
    assert client_ids == {created["ContactID"]}
