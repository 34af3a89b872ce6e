"""Out-of-order and duplicated CRM events: Hypothesis over the orders of won / amount changed / lost / won again.

A webhook is a hint (the deal is re-read), so what matters is what the deal looks like
when syncd reads it. Each example applies the four changes to a new deal in a drawn
order, every delivery sent twice or more and some held back behind the next
(:class:`~connectors.emulation.WebhookFaults`), with syncd working after a drawn subset
of the changes. Whatever the order: at most one invoice per deal; one invoice if the
deal ends won; an invoiced deal that ends lost needs attention; an amount changed after
the invoice is recorded as a divergence; and the checker's rules hold across all of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from connectors.emulation import WebhookFaults
from connectors.hubspot.emulator import HubSpotEmulator
from connectors.xero.emulator import XeroEmulator
from syncd.plumbing.settings import Config
from syncd.store.db import InvoiceRow
from syncd.store.outcomes import list_outcomes
from tests.faults.conftest import seed_count
from tests.faults.rig import Clock, settle, verify
from tests.harness import Stack, stack

CHANGES = (
    ("won", {"dealstage": "closedwon"}),
    ("amount changed", {"amount": "4321.00"}),
    ("lost", {"dealstage": "closedlost"}),
    ("won again", {"dealstage": "closedwon"}),
)


def new_deal(hub: HubSpotEmulator, n: int) -> str:
    """An open deal of its own client, invoiced from its amount (no line items)."""
    company = hub.add_company(
        {"name": f"Order {n}", "legal_name": f"Order {n} Pty Ltd", "default_po_number": f"PO-{n}"}
    )
    contact = hub.add_contact(
        {"firstname": "Kim", "lastname": f"Order {n}", "email": f"ap@order{n}.example"}, company_id=company
    )
    return hub.add_deal(
        {
            "dealname": f"Order {n}",
            "dealstage": "contractsent",
            "pipeline": "default",
            "amount": "1234.00",
            "deal_currency_code": "USD",
        },
        company_id=company,
        contact_ids=[contact],
    )


async def one_order(s: Stack, clock: Clock, n: int, order: list[int], work_after: list[bool], seed: int) -> None:
    """Apply the changes in ``order`` to a new deal and check what it ended as."""
    s.hub.webhooks.faults = WebhookFaults(seed=seed, duplicate=1.0, reorder=0.4)
    deal = new_deal(s.hub, n)
    for index, work in zip(order, work_after, strict=True):
        await s.hub.set_deal_properties(deal, CHANGES[index][1])
        if work:
            await s.drain()
    await settle(s, clock)
    invoices = await s.daemon.runtime.store.select(InvoiceRow, InvoiceRow.crm_object_id == deal)
    assert len(invoices) <= 1
    ends_won = s.hub.deal(deal)["properties"]["dealstage"] == "closedwon"
    if ends_won:
        assert len(invoices) == 1, f"deal {deal} ends won but was not invoiced ({[CHANGES[i][0] for i in order]})"
    if invoices and not ends_won:
        attention = await list_outcomes(s.daemon.runtime.store, kind="attention", object_id=deal)
        assert [o.reason for o in attention] == ["unwon_after_invoice"]
    if invoices and Decimal(s.hub.deal(deal)["properties"]["amount"]) != Decimal(invoices[0].subtotal or "0"):
        assert invoices[0].divergence, f"deal {deal}: amount changed after its invoice, no divergence recorded"


def test_any_order_of_won_amount_lost_won_again_each_duplicated_bills_at_most_once(
    tmp_path: Path, sqlite_url: str, run_logging: Callable[[Config], None], capsys: pytest.CaptureFixture[str]
) -> None:
    """Every drawn order of the four changes, each delivered twice or more, some reordered: the rules above hold."""
    clock = Clock()
    hub, xero = HubSpotEmulator(rate_limits=False, clock=clock), XeroEmulator(rate_limits=False, clock=clock)
    with asyncio.Runner() as runner:
        running = stack(tmp_path, sqlite_url, clock=clock, hub=hub, xero=xero)
        s = runner.run(running.__aenter__())
        run_logging(s.config)
        examples = iter(range(1, 10**6))
        try:

            @settings(max_examples=8 * seed_count(), suppress_health_check=[HealthCheck.too_slow], deadline=None)
            @given(
                order=st.permutations(range(len(CHANGES))),
                work_after=st.lists(st.booleans(), min_size=len(CHANGES), max_size=len(CHANGES)),
                seed=st.integers(min_value=0, max_value=2**31),
            )
            def example(order: list[int], work_after: list[bool], seed: int) -> None:
                runner.run(one_order(s, clock, next(examples), order, work_after, seed))

            example()
            report = runner.run(verify(s, "out-of-order events (Hypothesis)", logs=capsys.readouterr().err))
        finally:
            runner.run(running.__aexit__(None, None, None))
    assert report.invoices >= 1
