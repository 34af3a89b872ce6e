"""A real ``syncd run`` killed at every step boundary, or frozen past its lease, loses and duplicates nothing.

The failpoints (``syncd/plumbing/failpoints.py``) put the SIGKILL exactly at a boundary: after the
effect's claim, before the vendor call, after the vendor's 2xx and before syncd's
commit, after the commit and before the CRM write-back. Each crash is followed by a
restart; the order of the points is drawn from the seed.
"""

from __future__ import annotations

import random
import signal
from pathlib import Path

import pytest

from syncd.plumbing import failpoints
from tests.faults.live import live
from tests.faults.rig import deals
from tests.servers import until

pytestmark = pytest.mark.slow

INVOICE_PATH = ("after_claim", "before_vendor_call", "after_vendor_2xx", "after_local_commit")


def test_the_invoice_path_has_a_failpoint_at_each_boundary() -> None:
    """The points the crash scenario kills at are the engine's, in the order an invoice passes them."""
    assert failpoints.POINTS[: len(INVOICE_PATH)] == INVOICE_PATH


@pytest.mark.ci_seeds(1)
async def test_a_sigkill_at_every_failpoint_then_a_restart_leaves_one_invoice_per_deal(
    tmp_path: Path, sqlite_url: str, seed: int
) -> None:
    """SIGKILL at each boundary in turn (a new won deal each time), restart after each: one invoice per deal."""
    order = random.Random(seed).sample(INVOICE_PATH, len(INVOICE_PATH))
    async with live(tmp_path, sqlite_url) as s:
        (replica,) = s.replicas
        won: list[str] = []
        killed_at: list[str] = []
        for point in order:
            replica.start(env={failpoints.ENV: f"{point}:kill"})
            # The restarted process may reach the point with the effect the last crash left
            # (its lease ran out) before it is even ready; else a new won deal takes it there.
            if await replica.ready_or_gone(s.client):
                await s.hub.webhooks.retry_failed()  # a delivery the last crash cut off, as HubSpot retries
                (deal,) = deals(s.hub, 1)
                await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
                won.append(deal)
            assert await replica.exited(60) == -signal.SIGKILL, s.tails()
            assert replica.log.read_text().count('"event": "failpoint_hit"') == len(killed_at) + 1
            killed_at.append(point)
            assert f'"point": "{point}"' in replica.log.read_text()
        await s.start()
        await s.settled(won)
        assert await replica.stop() == 0
        report = await s.verify("sigkill at every failpoint", seed, expect_won=won)
    assert report.invoices == len(won)


@pytest.mark.postgres
@pytest.mark.parametrize("window", ["replayed", "expired"])
async def test_a_worker_frozen_past_its_lease_and_resumed_sends_no_second_invoice(
    tmp_path: Path, postgres_url: str, window: str
) -> None:
    """SIGSTOP right before the vendor call, another replica takes the effect over, SIGCONT: still one invoice.

    ``replayed``: the resumed create falls inside Xero's idempotency window, which
    replays the first answer. ``expired``: Xero keeps no key (``idempotency_ttl_s=0``), so
    only syncd itself can stop the second create: the lease's write guard before every
    vendor write (``syncd/plumbing/leases.py``) finds the lease taken over.
    """
    from connectors.xero.emulator import XeroEmulator

    xero = XeroEmulator(rate_limits=False, idempotency_ttl_s=0 if window == "expired" else 360)
    async with live(tmp_path, postgres_url, replicas=2, xero=xero) as s:
        frozen = s.replicas[0]
        await s.start(0, env={failpoints.ENV: "before_vendor_call:stop"})
        (deal,) = deals(s.hub, 1)
        await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
        await until(
            "the worker to freeze at the vendor call", lambda: '"point": "before_vendor_call"' in frozen.log.read_text()
        )
        await s.start(1)
        await s.settled([deal])  # the other replica took the effect over once the lease ran out
        assert len(xero.invoices()) == 1
        frozen.signal(signal.SIGCONT)
        await until("the resumed worker to find its lease lost", lambda: "lease_lost" in frozen.log.read_text(), 30)
        await s.settled([deal])
        assert [await r.stop() for r in s.replicas] == [0, 0]
        await s.verify(f"frozen past the lease ({window} idempotency window)", expect_won=[deal])
