"""Preview (syncd/cli/preview.py, `syncd preview`): what a mapping produces, with no effect.

Store-backed tests run on SQLite and PostgreSQL with the emulators over ASGI transports;
`syncd preview deal` builds its own HTTP client, so its CLI test serves the HubSpot
emulator with uvicorn on a loopback port in a thread.
"""

from __future__ import annotations

import asyncio
import json
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import structlog
from rich.console import Console

from connectors.hubspot.emulator import HubSpotEmulator
from connectors.xero.emulator import XeroEmulator
from syncd.cli.preview import preview_deal, preview_mapping, render_deal, render_diff
from syncd.store.db import BillingEventRow, ClientRow, EffectRow, EngagementRow, InvoiceRow, SourceRecordRow
from tests.harness import MAPPING, seed_company, seed_deal, stack, write_config
from tests.servers import invoke, serve_in_thread

EVER = 'billing_start = "2000-01-01T00:00:00Z"'
ROWS = (SourceRecordRow, ClientRow, EngagementRow, BillingEventRow, EffectRow, InvoiceRow)


@pytest.fixture(autouse=True)
def default_structlog() -> None:
    """Log through structlog's defaults: a CLI test run earlier may have left it on a closed stream."""
    structlog.reset_defaults()


async def test_a_won_deal_is_previewed_with_client_engagement_and_draft_and_nothing_happens(
    tmp_path: Path, db_url: str
) -> None:
    """Preview of a won deal shows the legal name, PO, lines and due date; nothing is stored or sent."""
    async with stack(tmp_path, db_url, daemon_extra=EVER) as s:
        deal = seed_deal(s.hub)
        await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
        store = s.daemon.runtime.store
        before = [await store.count(model) for model in ROWS]
        (preview,) = await preview_deal(s.daemon.runtime, deal)
        assert [await store.count(model) for model in ROWS] == before == [0] * len(ROWS)
    assert sum(s.xero.calls.values()) == 0
    assert s.xero.invoices() == []
    assert preview.error is None
    assert preview.client is not None
    assert preview.engagement is not None
    assert (preview.client.legal_name, preview.client.po_number) == ("Northwind Traders LLC", "PO-4411")
    (item,) = preview.drafts
    draft = item.draft
    assert (draft.reference, draft.currency, item.recorded) == ("PO-4411", "USD", False)
    assert [(line.description, line.quantity, line.unit_price) for line in draft.lines] == [
        ("Discovery workshop", Decimal(1), Decimal("2500.00")),
        ("Build sprint", Decimal(4), Decimal("2500.00")),
    ]
    assert draft.due_date - draft.issue_date == timedelta(days=14)
    assert draft.subtotal() == Decimal("12500.00")

    console = Console(record=True, width=160)
    render_deal([preview], console)
    text = console.export_text()
    for shown in ("Northwind Traders LLC", "PO-4411", "Discovery workshop", "Build sprint", "12500.00"):
        assert shown in text
    assert draft.due_date.isoformat() in text
    data = json.loads(json.dumps(preview.as_json()))
    assert data["drafts"][0]["due_date"] == draft.due_date.isoformat()
    assert data["drafts"][0]["subtotal"] == "12500.00"


async def test_a_deal_that_is_not_won_or_does_not_map_is_explained(tmp_path: Path, db_url: str) -> None:
    """An open deal has no draft and says why; a deal missing its legal name shows the dead-letter message."""
    async with stack(tmp_path, db_url, daemon_extra=EVER) as s:
        open_deal = seed_deal(s.hub)
        company = s.hub.add_company({"default_po_number": "PO-9"})
        contact = s.hub.add_contact({"email": "ap@nameless.example"}, company_id=company)
        nameless = seed_deal(s.hub, company=(company, contact))
        (waiting,) = await preview_deal(s.daemon.runtime, open_deal)
        (failing,) = await preview_deal(s.daemon.runtime, nameless)
    assert waiting.drafts == ()
    assert waiting.notes == ("the deal is not won ([pipeline].won does not hold): nothing is invoiced until it is",)
    assert failing.client is None
    assert failing.error is not None
    assert f"{MAPPING}:{_line(MAPPING, 'legal_name = {')} [client].legal_name: no value for legal_name" in failing.error


def _line(path: Path, prefix: str) -> int:
    lines = path.read_text(encoding="utf-8").splitlines()
    return next(number for number, line in enumerate(lines, 1) if line.startswith(prefix))


# ---------------------------------------------------------------------------- --mapping


def _proposed(folder: Path) -> Path:
    """The worked example with a new SKU account, the contact's email as a last legal name, and no type default."""
    text = MAPPING.read_text(encoding="utf-8")
    join = '  { join = [ { path = "contact.properties.firstname" }, { path = "contact.properties.lastname" } ], sep = " " },\n'
    changes = {
        '"SETUP-FEE" = "200"': '"SETUP-FEE" = "260"',
        join + "] }": join + '  { path = "contact.properties.email" },\n] }',
        'table = "engagement_type", default = "one_time" }': 'table = "engagement_type" }',
    }
    for old, new in changes.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path = folder / "proposed.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _deal(hub: HubSpotEmulator, company: tuple[str, str], *, billing_type: str | None, sku: str = "") -> str:
    properties = {"dealname": "Deal", "pipeline": "default", "deal_currency_code": "USD"}
    if billing_type is not None:
        properties["billing_type"] = billing_type
    item = {"name": "Setup", "quantity": "1", "price": "500.00", **({"hs_sku": sku} if sku else {})}
    return hub.add_deal(properties, company_id=company[0], contact_ids=[company[1]], line_items=[item])


async def test_a_proposed_mapping_is_compared_over_the_stored_deals(tmp_path: Path, db_url: str) -> None:
    """--mapping counts same, changed, newly failing and newly passing deals and diffs each, with no effect."""
    async with stack(tmp_path, db_url, daemon_extra=EVER) as s:
        northwind = seed_company(s.hub)
        company = s.hub.add_company({"default_po_number": "PO-9"})
        nameless = (company, s.hub.add_contact({"email": "ap@nameless.example"}, company_id=company))
        same = _deal(s.hub, northwind, billing_type="fixed_fee")
        changed = _deal(s.hub, northwind, billing_type="fixed_fee", sku="SETUP-FEE")
        passing = _deal(s.hub, nameless, billing_type="fixed_fee")
        failing = _deal(s.hub, northwind, billing_type=None)
        for deal in (same, changed, passing, failing):
            await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
        await s.drain()
        store = s.daemon.runtime.store
        before = [await store.count(model) for model in ROWS]
        invoices = len(s.xero.invoices())
        proposed = _proposed(tmp_path)
        diff = await preview_mapping(s.daemon.runtime, proposed)
        cli = await asyncio.to_thread(
            invoke, "preview", "--mapping", str(proposed), "--json", "--config", str(s.config.path)
        )
        assert [await store.count(model) for model in ROWS] == before
        assert len(s.xero.invoices()) == invoices == 3

    assert diff.counts() == {"same": 1, "changed": 1, "newly_failing": 1, "newly_passing": 1}
    by_deal = {record.deal_id: record for record in diff.records}
    assert by_deal[same].status == "same"
    assert by_deal[changed].changes == (
        ("engagement.lines[0].account_code", "200", "260"),
        ("draft.lines[0].account_code", "200", "260"),
    )
    ((field, now, then),) = by_deal[failing].changes
    assert (by_deal[failing].status, field, now) == ("newly_failing", "error", None)
    assert f"{proposed}:{_line(proposed, 'type = {')} [engagement].type" in then
    ((field, now, then),) = by_deal[passing].changes
    assert (by_deal[passing].status, field, then) == ("newly_passing", "error", None)
    assert "[client].legal_name: no value for legal_name" in now
    assert diff.unread == ()

    console = Console(record=True, width=200)
    render_diff(diff, console)
    text = console.export_text()
    assert f"deal {changed}: changed" in text
    assert "engagement.lines[0].account_code" in text
    assert f"deal {failing}: newly failing" in text

    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.output)["counts"] == diff.counts()


# ---------------------------------------------------------------------------- `syncd preview deal`


def test_syncd_preview_deal_prints_the_draft_and_json(tmp_path: Path, sqlite_url: str) -> None:
    """`syncd preview deal ID` prints legal name, PO, lines and due date; --json gives the same draft."""
    hub, xero = HubSpotEmulator(rate_limits=False), XeroEmulator(rate_limits=False)
    with serve_in_thread(hub.app) as hub_url:
        config = write_config(tmp_path, sqlite_url, hub, xero, daemon_extra=EVER)
        config.write_text(config.read_text(encoding="utf-8").replace("http://hubspot.test", hub_url))
        assert invoke("db", "upgrade", "--config", str(config)).exit_code == 0
        deal = seed_deal(hub)
        shown = invoke("preview", "deal", deal, "--config", str(config))
        won = invoke("preview", "deal", _won(hub, deal), "--json", "--config", str(config))
    assert shown.exit_code == 0, shown.output
    assert "Northwind Traders LLC" in shown.output
    assert "not won" in shown.output
    assert won.exit_code == 0, won.output
    (data,) = json.loads(won.output)
    (draft,) = data["drafts"]
    assert data["client"]["legal_name"] == "Northwind Traders LLC"
    assert draft["reference"] == "PO-4411"
    assert [line["description"] for line in draft["lines"]] == ["Discovery workshop", "Build sprint"]
    due = date.fromisoformat(draft["due_date"]) - date.fromisoformat(draft["issue_date"])
    assert (Decimal(draft["subtotal"]), due) == (Decimal("12500.00"), timedelta(days=14))
    assert xero.invoices() == []
    assert sum(xero.calls.values()) == 0


def _won(hub: HubSpotEmulator, deal: str) -> str:
    """Close ``deal`` as won at HubSpot (no webhook subscriber: nothing else hears of it)."""
    asyncio.run(hub.set_deal_properties(deal, {"dealstage": "closedwon"}))
    return deal
