"""The fault checker finds what it is there to find: it is no check that cannot fail."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import httpx
import sqlalchemy as sa

from connectors.xero.models import dump_json
from syncd.store.db import BillingEventRow, table_of
from tests.faults.checker import check, emulator_secrets
from tests.faults.rig import Clock, deals, settle, win
from tests.harness import stack


async def test_the_checker_reports_duplicates_losses_a_stale_or_backward_deal_and_leaked_secrets(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A second stamped invoice, an event that ended as nothing, a deal written backwards and a leaked token are each found."""
    clock = Clock()
    async with stack(tmp_path, sqlite_url, clock=clock) as s:
        (deal,) = deals(s, 1)
        await win(s, deal)
        await settle(s, clock)
        clean = await check(sqlite_url, s.hub, s.xero, expect_won=[deal], secrets=emulator_secrets(s.hub, s.xero))
        assert clean.problems == []
        assert (clean.invoices, clean.duplicates, clean.losses) == (1, 0, 0)

        first = s.xero.invoices()[0]
        token = next(token for token, grant in s.xero._grants.items() if grant.kind.startswith("access"))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=s.xero.app), base_url="http://xero.test") as api:
            copy = {
                "Type": "ACCREC",
                "Contact": {"ContactID": first["Contact"]["ContactID"]},
                "Reference": first["Reference"],
                "LineItems": [{"Description": "again", "Quantity": 1, "UnitAmount": 1, "AccountCode": "200"}],
            }
            answer = await api.put(
                "/api.xro/2.0/Invoices",
                content=dump_json({"Invoices": [copy]}),
                headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            )
            assert answer.status_code == 200, answer.text
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=s.hub.app), base_url="http://hubspot.test"
        ) as crm:
            answer = await crm.patch(
                f"/crm/v3/objects/deals/{deal}",
                json={"properties": {"syncd_invoice_number": "", "syncd_total_invoiced": "0"}},
                headers={"Authorization": f"Bearer {s.hub.token}"},
            )
            assert answer.status_code == 200, answer.text
        async with s.daemon.runtime.store.begin() as conn:
            await conn.execute(
                sa.insert(table_of(BillingEventRow)).values(
                    key="hubspot:deal:404:deal_won:won",
                    kind="deal_won",
                    engagement_key="hubspot:deal:404",
                    occurrence="won",
                    occurred_at=clock.now,
                    created_at=clock.now,
                    simulated=False,
                )
            )
        clock.advance(timedelta(days=1).total_seconds())
        report = await check(
            sqlite_url,
            s.hub,
            s.xero,
            expect_won=[deal, "777"],
            secrets=emulator_secrets(s.hub, s.xero),
            texts=[("daemon.log", f'{{"event": "oops", "token": "{token}"}}')],
        )
    problems = "\n".join(report.problems)
    assert report.duplicates == 1
    assert report.losses == 2  # the event that ended as nothing, and deal 777 that never became one
    assert f"2 vendor documents carry key {first['Reference'].split('syncd:')[1]}" in problems
    assert "hubspot:deal:404:deal_won:won ended as no invoice, dead letter or outcome" in problems
    assert "deal 777 was won but has no billing event" in problems
    assert f"deal {deal}: syncd_invoice_number shows ''" in problems
    assert f"deal {deal}: a write-back dropped invoice numbers" in problems
    assert f"deal {deal}: total invoiced went back" in problems
    assert "appears in daemon.log" in problems
    assert token not in problems
