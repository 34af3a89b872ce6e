"""Dead letters and replay (syncd/engine/replay.py, `syncd replay`): fixed records are invoiced exactly once.

Each test runs on SQLite and on PostgreSQL with the emulators over ASGI transports. The
CLI runs in a worker thread (it starts its own event loop) against the same database.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import structlog

from connectors.hubspot.emulator import HubSpotEmulator
from syncd.engine.replay import list_dead_letters, replay_dead_letters
from syncd.store.db import BillingEventRow, DeadLetterRow
from tests.harness import MAPPING, Stack, seed_deal, stack
from tests.servers import invoke

LEGAL_NAME_LINE = next(
    number
    for number, line in enumerate(MAPPING.read_text(encoding="utf-8").splitlines(), 1)
    if line.startswith("legal_name = {")
)


@pytest.fixture(autouse=True)
def default_structlog() -> None:
    """Log through structlog's defaults: a CLI test run earlier may have left it on a closed stream."""
    structlog.reset_defaults()


async def nameless_deal_dead_lettered(s: Stack) -> tuple[str, DeadLetterRow]:
    """A won deal whose company has no name and whose contact has none: (company id, its dead letter)."""
    company = s.hub.add_company({"default_po_number": "PO-9", "payment_terms_days": "14"})
    contact = s.hub.add_contact({"email": "ap@nameless.example"}, company_id=company)
    deal = seed_deal(s.hub, company=(company, contact))
    await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
    await s.drain()
    assert s.xero.invoices() == []
    (letter,) = await list_dead_letters(s.config)
    assert letter.place == f"{MAPPING}:{LEGAL_NAME_LINE} [client].legal_name"
    assert letter.reason.startswith('no value for legal_name: path "company.properties.legal_name"')
    assert f'path "company.properties.name" is empty on deal {deal}' in letter.reason
    return company, letter


async def name_company(hub: HubSpotEmulator, company: str, name: str) -> None:
    """Fix the data as a user would: give the company a name through HubSpot's API."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=hub.app), base_url="http://hubspot.test") as api:
        response = await api.patch(
            f"/crm/v3/objects/companies/{company}",
            json={"properties": {"name": name}},
            headers={"Authorization": f"Bearer {hub.token}"},
        )
    assert response.status_code == 200


async def test_a_fixed_record_is_invoiced_once_after_replay(tmp_path: Path, db_url: str) -> None:
    """A dead letter naming the mapping's file:line/key, once the data is fixed and replayed, makes one invoice."""
    async with stack(tmp_path, db_url) as s:
        company, letter = await nameless_deal_dead_lettered(s)
        await name_company(s.hub, company, "Nameless Co")

        assert (await replay_dead_letters(s.config, [letter.id])).requeued == (letter.id,)
        again = await replay_dead_letters(s.config, [letter.id])
        assert (again.count, again.left) == (0, ((letter.id, "it is replayed, not open"),))
        await s.drain()
        (invoice,) = s.xero.invoices()
        assert invoice["Contact"]["Name"] == "Nameless Co"
        assert invoice["Reference"].startswith("PO-9 · syncd:")

        assert (await replay_dead_letters(s.config, [], all_=True)).count == 0
        assert await s.hub.redeliver_last() == 200
        await s.drain()
        assert len(s.xero.invoices()) == 1
        assert await s.daemon.runtime.store.count(BillingEventRow) == 1
        (replayed,) = await list_dead_letters(s.config, include_replayed=True)
        assert (replayed.id, replayed.status) == (letter.id, "replayed")
        assert await list_dead_letters(s.config) == []


async def test_syncd_replay_requeues_a_dead_letter_once(tmp_path: Path, db_url: str) -> None:
    """`syncd dead-letters list` shows the letter; `syncd replay ID` requeues it once and one invoice follows."""
    async with stack(tmp_path, db_url) as s:
        company, letter = await nameless_deal_dead_lettered(s)
        config = str(s.config.path)
        listed = await asyncio.to_thread(invoke, "dead-letters", "list", "--config", config)
        assert listed.exit_code == 0, listed.output
        assert "legal_name" in listed.output

        await name_company(s.hub, company, "Nameless Co")
        first = await asyncio.to_thread(invoke, "replay", str(letter.id), "--config", config)
        again = await asyncio.to_thread(invoke, "replay", "--all", "--config", config)
        assert (first.exit_code, again.exit_code) == (0, 0)
        assert "requeued 1 record(s)" in first.output
        assert "requeued 0 record(s)" in again.output
        await s.drain()
        (invoice,) = s.xero.invoices()
        assert invoice["Contact"]["Name"] == "Nameless Co"
