"""Several replicas on one PostgreSQL database: the same work offered to all of them is done once.

The webhook scenario runs three real ``syncd run`` processes behind a balancer
(``tests/faults/live.py``); the others run three daemons in this process, each with its
own store, owner and engine on the same database (``tests/harness.py``), so a shared
clock can jump past every ``Retry-After`` and billing period.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import AsyncIterator, Callable
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from connectors.emulation import Fault
from connectors.hubspot.emulator import HubSpotEmulator
from connectors.xero.emulator import XeroEmulator
from syncd.engine.recurring import run_due
from syncd.engine.scheduler import tick_recurring
from syncd.plumbing.settings import Config
from tests.faults.live import live
from tests.faults.rig import Clock, deals, settle, together, verify, win
from tests.harness import MAPPING, Stack, stack
from tests.test_recurring import BILLING_START, RETAINER, at, retainer_deal

pytestmark = pytest.mark.postgres

DEBUG = 'log_level = "debug"'


@contextlib.asynccontextmanager
async def replicas(
    folder: Path, database_url: str, clock: Clock, *, mapping: Path = MAPPING, daemon_extra: str = DEBUG
) -> AsyncIterator[list[Stack]]:
    """Three in-process daemons on one database, sharing the emulators and the clock."""
    hub = HubSpotEmulator(rate_limits=False, clock=clock)
    xero = XeroEmulator(rate_limits=False, clock=clock)
    key = Fernet.generate_key().decode()  # one key: each replica reads the tokens another stored
    async with contextlib.AsyncExitStack() as running:
        stacks = []
        for index in range(3):
            (folder / f"replica{index}").mkdir()
            one = stack(
                folder / f"replica{index}",
                database_url,
                clock=clock,
                hub=hub,
                xero=xero,
                mapping=mapping,
                daemon_extra=daemon_extra,
                encryption_key=key,
            )
            stacks.append(await running.enter_async_context(one))
        yield stacks


def xero_calls(stack: Stack) -> int:
    """The Xero API calls this replica has made so far."""
    return int(stack.daemon.runtime.connectors["xero"].http.calls)


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON log lines in captured output (other lines are skipped)."""
    found = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                found.append(value)
    return found


@pytest.mark.slow
async def test_the_same_webhook_fifty_times_across_three_replicas_makes_one_invoice(
    tmp_path: Path, postgres_url: str
) -> None:
    """One signed delivery posted 50 times, at once, round-robin to three real replicas: one invoice, one write-back."""
    async with live(tmp_path, postgres_url, replicas=3) as s:
        await s.start()
        (deal,) = deals(s.hub, 1)
        await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
        first = s.hub.webhooks.deliveries[-1]
        assert first.status == 200
        answers = await asyncio.gather(*(s.hub.webhooks.redeliver(first) for _ in range(49)))
        assert set(answers) == {200}
        await s.settled([deal])
        served = [r.log.read_text().count('"event": "webhook_received"') for r in s.replicas]
        assert sum(served) == 50, served
        assert all(served), served  # every replica took its share
        assert await asyncio.gather(*(r.stop() for r in s.replicas)) == [0, 0, 0]
        report = await s.verify("same webhook 50 times across 3 replicas", expect_won=[deal])
    assert report.invoices == 1
    assert len([w for w in s.hub.writes if w.object_id == deal]) == 1


async def test_a_429_storm_shared_by_three_replicas_is_waited_out_and_bills_once(
    tmp_path: Path,
    postgres_url: str,
    seed: int,
    run_logging: Callable[[Config], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Xero answers every replica 429 with Retry-After for a while: each waits as told, each deal is billed once.

    A wait the lease leaves room for is spent in the request; a longer one puts the effect
    off (``syncd/plumbing/leases.py``): either way exactly the ``Retry-After`` Xero gave.
    """
    clock = Clock()
    async with replicas(tmp_path, postgres_url, clock) as stacks:
        run_logging(stacks[0].config)
        hub, xero = stacks[0].hub, stacks[0].xero
        storm = xero.faults.add(
            Fault(kind="status", status=429, retry_after_s=30, times=20 + 5 * seed, path_contains="/api.xro/2.0/")
        )
        won = deals(hub, 6)
        for deal in won:
            await win(stacks[0], deal)
        refused = [0, 0, 0]  # per replica: its Xero calls while the storm blew
        for _ in range(40):
            before = [xero_calls(s) for s in stacks]
            await together(stacks)
            if storm not in xero.faults.faults:
                break
            refused = [n + xero_calls(s) - b for n, s, b in zip(refused, stacks, before, strict=True)]
            clock.advance(31)
        assert storm not in xero.faults.faults  # the storm blew over
        await settle(stacks[0], clock)
        logs = capsys.readouterr().err
        # Waited in the request when the lease left room, else the effect was put off: exactly as long as asked.
        waits = [wait for s in stacks for wait in s.sleeps]
        waits += [
            line["wait_s"] for line in json_lines(logs) if line.get("event") == "work_retry" and "429" in line["error"]
        ]
        assert waits
        assert set(waits) == {30.0}
        assert sum(1 for n in refused if n) >= 2  # the storm was shared
        report = await verify(stacks[0], "429 storm across 3 replicas", seed, expect_won=won, logs=logs)
    assert (report.invoices, report.dead_letters) == (len(won), 0)


async def test_three_replicas_running_the_scheduler_bill_each_period_once(
    tmp_path: Path, postgres_url: str, run_logging: Callable[[Config], None], capsys: pytest.CaptureFixture[str]
) -> None:
    """Each month, three replicas run the recurring tick and the billing run itself at once: one invoice per period."""
    clock = Clock()
    clock.now = at(date(2027, 1, 10))
    async with replicas(
        tmp_path, postgres_url, clock, mapping=RETAINER, daemon_extra=f"{BILLING_START}\n{DEBUG}"
    ) as stacks:
        run_logging(stacks[0].config)
        hub = stacks[0].hub
        company = hub.add_company({"name": "Retainer client", "legal_name": "Retainer Client Pty Ltd"})
        contact = hub.add_contact(
            {"firstname": "Ana", "lastname": "Lee", "email": "ap@retainer.example"}, company_id=company
        )
        deal = retainer_deal(hub, (company, contact), start="2027-01-15")
        await win(stacks[0], deal)
        await stacks[0].drain()
        days = [date(2027, 1, 15), *(date(2027, month, 1) for month in range(2, 8))]
        for day in days:
            clock.now = at(day)
            ticks = [tick_recurring(s.daemon.runtime, functools.partial(run_due, s.daemon.engine)) for s in stacks]
            ran = await asyncio.gather(*ticks)
            assert sum(ran) == 1  # the window's tick row: one replica runs it
            # As if the windows had not lined up (clock skew): every replica bills too, at once.
            await asyncio.gather(*(run_due(s.daemon.engine) for s in stacks))
            await together(stacks)
        await settle(stacks[0], clock)
        dates = sorted(invoice["DateString"][:10] for invoice in stacks[0].xero.invoices())
        assert dates == [day.isoformat() for day in days]
        report = await verify(stacks[0], "scheduler on 3 replicas", expect_won=[deal], logs=capsys.readouterr().err)
    assert report.invoices == len(days)
