"""Dead letters and replay (syncd/engine/replay.py, `syncd replay`): fixed records are invoiced exactly once.

Each test runs on SQLite and on PostgreSQL with the emulators over ASGI transports. The
CLI runs in a worker thread (it starts its own event loop) against the same database.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import structlog

from connectors.hubspot.emulator import HubSpotEmulator
from syncd.engine.replay import list_dead_letters, replay_dead_letters
from syncd.store.db import BillingEventRow, DeadLetterRow, EffectRow
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


async def _dead_invoice(s: Stack) -> DeadLetterRow:
    """A won deal whose invoice Xero refuses (the mapping's account code 999 does not exist): its dead letter."""
    deal = seed_deal(s.hub)
    await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
    await s.drain()
    (letter,) = await list_dead_letters(s.config)
    assert letter.source == "effect"
    assert "Account code '999' is not a valid code" in letter.reason
    return letter


def _mapping_with_account(folder: Path, code: str) -> Path:
    """The worked example with ``code`` as the default account code of a deal's line items."""
    path = folder / "mapping.toml"
    text = MAPPING.read_text(encoding="utf-8")
    line = 'account_code = { lookup = "item.properties.hs_sku", table = "account_code_by_sku", default = "200" }'
    assert line in text
    path.write_text(text.replace(line, line.replace('"200"', f'"{code}"')), encoding="utf-8")
    return path


async def test_a_replayed_invoice_is_drafted_from_the_fixed_mapping(tmp_path: Path, db_url: str) -> None:
    """A refused invoice, replayed once the mapping is fixed, is created with the fixed account code under the same key."""
    now = [datetime.now(UTC)]
    mapping = _mapping_with_account(tmp_path, "999")
    start = f'billing_start = "{(now[0] - timedelta(days=1)).isoformat()}"'
    async with stack(tmp_path, db_url, mapping=mapping, clock=lambda: now[0], daemon_extra=start) as s:
        letter = await _dead_invoice(s)
        (effect,) = await s.daemon.runtime.store.select(EffectRow, EffectRow.kind == "create_invoice")
        key = effect.payload["draft"]["key"]

        _mapping_with_account(tmp_path, "200")
        assert s.daemon.reload_mappings() == []
        now[0] += timedelta(minutes=7)  # past Xero's 6-minute idempotency window of the refused request
        assert (await replay_dead_letters(s.config, [letter.id])).requeued == (letter.id,)
        await s.drain()

        (invoice,) = s.xero.invoices()
        assert [line["AccountCode"] for line in invoice["LineItems"]] == ["200", "200"]
        assert invoice["Reference"].endswith(f"syncd:{key}")
        (effect,) = await s.daemon.runtime.store.select(EffectRow, EffectRow.kind == "create_invoice")
        assert effect.status == "done"
        assert effect.payload["draft"]["key"] == key
        assert [line["account_code"] for line in effect.payload["draft"]["lines"]] == ["200", "200"]
        assert "redraft" not in effect.payload


async def test_replay_resets_the_record_and_marks_the_letter_in_one_transaction(tmp_path: Path, db_url: str) -> None:
    """Attempts, first attempt and last error are reset with the letter marked replayed, or nothing is."""
    mapping = _mapping_with_account(tmp_path, "999")
    async with stack(tmp_path, db_url, mapping=mapping) as s:
        letter = await _dead_invoice(s)
        store = s.daemon.runtime.store
        (dead,) = await store.select(EffectRow, EffectRow.kind == "create_invoice")
        assert (dead.status, dead.attempts) == ("dead", 1)
        assert dead.first_attempt_at is not None
        assert dead.last_error is not None

        refuse = (
            [
                "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'refused'; END $$ LANGUAGE plpgsql",
                "CREATE TRIGGER refuse BEFORE UPDATE ON dead_letters FOR EACH ROW EXECUTE FUNCTION refuse()",
            ]
            if store.is_postgres
            else ["CREATE TRIGGER refuse BEFORE UPDATE ON dead_letters BEGIN SELECT RAISE(ABORT, 'refused'); END"]
        )
        async with store.begin() as conn:
            for statement in refuse:
                await conn.exec_driver_sql(statement)
        with pytest.raises(sa.exc.DBAPIError, match="refused"):
            await replay_dead_letters(s.config, [letter.id])
        (unchanged,) = await store.select(EffectRow, EffectRow.kind == "create_invoice")
        assert unchanged == dead
        async with store.begin() as conn:
            await conn.exec_driver_sql(
                "DROP TRIGGER refuse ON dead_letters" if store.is_postgres else "DROP TRIGGER refuse"
            )

        assert (await replay_dead_letters(s.config, [letter.id])).requeued == (letter.id,)
        (requeued,) = await store.select(EffectRow, EffectRow.kind == "create_invoice")
        assert (requeued.status, requeued.attempts, requeued.first_attempt_at, requeued.last_error) == (
            "pending",
            0,
            None,
            None,
        )
        (replayed,) = await list_dead_letters(s.config, include_replayed=True)
        assert replayed.status == "replayed"


async def test_a_letter_whose_record_is_not_dead_any_more_stays_open(tmp_path: Path, db_url: str) -> None:
    """A dead letter whose record was requeued or settled meanwhile requeues nothing and is not marked replayed."""
    mapping = _mapping_with_account(tmp_path, "999")
    async with stack(tmp_path, db_url, mapping=mapping) as s:
        letter = await _dead_invoice(s)
        store = s.daemon.runtime.store
        await store.update(EffectRow, [EffectRow.kind == "create_invoice"], {"status": "done"})  # settled meanwhile

        done = await replay_dead_letters(s.config, [letter.id])
        assert done.count == 0
        assert done.left == ((letter.id, f"its effect {letter.ref} is not dead any more (requeued or settled since)"),)
        (still,) = await list_dead_letters(s.config)
        assert (still.id, still.status) == (letter.id, "open")
