"""In-process pieces the fault scenarios share: a clock they move, deals, settling, checking.

The in-process stack is ``tests/harness.py``'s (emulators over ``httpx.ASGITransport``,
the daemon with no worker tasks); these helpers only add what a fault scenario needs:
a clock that jumps past every back-off (:class:`Clock`), a loop that drains until
nothing is left to do (:func:`settle`), and the end-of-scenario check with the
emulators' secrets (:func:`verify`).
"""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta

from connectors.hubspot.emulator import HubSpotEmulator
from syncd.core import receivables
from syncd.store.db import EffectRow, EventRow
from tests.faults.checker import Report, check, emulator_secrets, record
from tests.harness import Stack, seed_deal

STEP_S = 3601  # past the longest back-off (an hour), so every retry is due at the next round


class Clock:
    """A clock that moves only when told (daemon and emulators share it).

    It starts a minute after the real now: a new database's ``billing_start`` is the real
    moment it was created, and a deal won before that would be a recorded skip.
    """

    def __init__(self) -> None:
        self.now = datetime.now(UTC) + timedelta(minutes=1)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward."""
        self.now += timedelta(seconds=seconds)


async def pending(stack: Stack) -> int:
    """Events and effects still to do."""
    store = stack.daemon.runtime.store
    return await store.count(EventRow, EventRow.status == "pending") + await store.count(
        EffectRow, EffectRow.status == "pending"
    )


async def settle(stack: Stack, clock: Clock, *, rounds: int = 40) -> int:
    """Drain, move the clock past every back-off, and again, until nothing is pending.

    Returns:
        the rounds it took.

    Raises:
        AssertionError: work was still pending after ``rounds`` (a retry loop).
    """
    for round_ in itertools.count(1):
        await stack.xero.webhooks.flush()
        await stack.hub.webhooks.flush()
        await stack.drain()
        if await pending(stack) == 0:
            return round_
        if round_ >= rounds:
            raise AssertionError(f"work still pending after {rounds} rounds")
        clock.advance(STEP_S)
    raise AssertionError("unreachable")  # pragma: no cover


_clients = itertools.count(1)


async def together(stacks: list[Stack], *, batch: int = 1) -> int:
    """Let replicas claim and work at once, ``batch`` rows per claim, until none finds work.

    ``Stack.drain`` claims up to 100 rows at a time, so the first replica would take
    everything; small claims share the work as busy replicas do.

    Returns:
        the rows claimed in all.
    """
    total = 0
    while True:

        async def one(stack: Stack) -> int:
            engine = stack.daemon.engine
            return await engine.process_events(batch) + await engine.execute_effects(batch)

        claimed = sum(await asyncio.gather(*(one(s) for s in stacks)))
        if claimed == 0:
            return total
        total += claimed


def deals(hub: HubSpotEmulator | Stack, count: int) -> list[str]:
    """``count`` open deals, each of its own company: a client with a name of its own.

    Xero contact names are unique, so two clients with one legal name would be a
    (correct) dead letter, not what a fault scenario is about.
    """
    crm = hub.hub if isinstance(hub, Stack) else hub
    made = []
    for _ in range(count):
        n = next(_clients)
        company = crm.add_company(
            {"name": f"Client {n}", "legal_name": f"Client {n} Pty Ltd", "default_po_number": f"PO-{n}"}
        )
        contact = crm.add_contact(
            {"firstname": "Dana", "lastname": f"Reyes {n}", "email": f"ap{n}@client{n}.example"}, company_id=company
        )
        made.append(seed_deal(crm, company=(company, contact)))
    return made


async def win(stack: Stack, deal: str) -> None:
    """Move a deal to closed-won at the CRM (a signed webhook is delivered)."""
    await stack.hub.set_deal_properties(deal, {"dealstage": "closedwon"})


async def verify(
    stack: Stack,
    scenario: str,
    seed: int | None = None,
    *,
    expect_won: list[str] | tuple[str, ...] = (),
    logs: str = "",
    reversals: bool = False,
) -> Report:
    """The checker over this stack, recorded for the soak table; fails listing every problem."""
    report = await check(
        stack.config.daemon.database_url,
        stack.hub,
        stack.xero,
        expect_won=expect_won,
        secrets=emulator_secrets(stack.hub, stack.xero),
        texts=[("captured log", logs)] if logs else [],
        reversals=reversals,
        today=receivables.today_in(stack.daemon.runtime.clock(), stack.config.daemon.timezone),
    )
    record(report, scenario, seed)
    report.assert_ok()
    return report
