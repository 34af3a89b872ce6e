"""Listings (syncd/cli/listings.py) and dismissing dead letters (syncd/engine/replay.py): `syncd status`,
`syncd dead-letters list|dismiss`, `syncd replay` of an unknown id.

Each test runs on SQLite and on PostgreSQL with the emulators over ASGI transports; the
CLI runs in a worker thread (it starts its own event loop) against the same database,
at 80 columns.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import sqlalchemy as sa
import structlog
from click.testing import Result
from typer.testing import CliRunner

from connectors.emulation import Fault
from syncd.cli.listings import entry
from syncd.cli.main import app
from syncd.store.db import DeadLetterRow, EffectRow
from tests.harness import Stack, seed_company, seed_deal, stack


@pytest.fixture(autouse=True)
def default_structlog() -> None:
    """Log through structlog's defaults: a CLI test run earlier may have left it on a closed stream."""
    structlog.reset_defaults()


async def cli(*args: str, columns: int = 80) -> Result:
    """`syncd ARGS` in a worker thread, at ``columns`` wide; structlog is put back afterwards."""

    def go() -> Result:
        saved = structlog.get_config()
        try:
            return CliRunner().invoke(app, list(args), env={"COLUMNS": str(columns)})
        finally:
            structlog.configure(**saved)

    return await asyncio.to_thread(go)


def fits(output: str, columns: int = 80) -> bool:
    return all(len(line) <= columns for line in output.splitlines())


async def two_dead_letters(s: Stack) -> tuple[str, str, str]:
    """An invoice Xero refuses (an effect) and a deal whose company has no name (an event): (named deal, its client, nameless deal)."""
    company = seed_company(s.hub)
    named = seed_deal(s.hub, company=company)
    s.xero.faults.add(Fault(kind="status", status=400, method="PUT", path_contains="/Invoices", times=None))
    await s.hub.set_deal_properties(named, {"dealstage": "closedwon"})
    await s.drain()
    s.xero.faults.clear()
    nameless_company = s.hub.add_company({"default_po_number": "PO-9"})
    contact = s.hub.add_contact({"email": "ap@nameless.example"}, company_id=nameless_company)
    nameless = seed_deal(s.hub, company=(nameless_company, contact))
    await s.hub.set_deal_properties(nameless, {"dealstage": "closedwon"})
    await s.drain()
    return named, f"hubspot:company:{company[0]}", nameless


async def test_dead_letters_name_their_deal_and_client_in_80_columns_and_as_json(tmp_path: Path, db_url: str) -> None:
    """`dead-letters list` names each letter's deal and client, wraps the reason to 80 columns; --json has every key."""
    async with stack(tmp_path, db_url) as s:
        named, client, nameless = await two_dead_letters(s)
        config = str(s.config.path)
        text = await cli("dead-letters", "list", "--config", config)
        listed = await cli("dead-letters", "list", "--config", config, "--json")
    assert (text.exit_code, listed.exit_code) == (0, 0), text.output + listed.output
    assert fits(text.output)
    lines = text.output.splitlines()
    heads = [line for line in lines if line.startswith("#")]
    assert len(heads) == 2
    assert heads[0].startswith("#1 open · effect ")
    assert heads[1].startswith("#2 open · event ")
    assert f"  deal:   Website rebuild (hubspot:deal:{named})" in lines
    assert f"  client: Northwind Traders LLC ({client})" in lines
    assert f"  deal:   Website rebuild (hubspot:deal:{nameless})" in lines  # from the stored copy: it was never mapped
    assert sum(line.startswith("  client:") for line in lines) == 1  # the nameless one has none to show
    assert any(line.startswith("  reason: ") for line in lines)
    assert any(line.startswith("  place:  ") for line in lines)

    rows = json.loads(listed.output)
    keys = {
        "id", "status", "source", "ref", "connection", "reason", "place", "created_at", "deal", "deal_name",
        "client", "client_name", "replayed_at", "dismissed_at", "dismissed_by", "dismissed_why",
    }  # fmt: skip
    assert [set(row) for row in rows] == [keys, keys]
    first, second = rows
    assert (first["source"], first["deal"], first["deal_name"]) == (
        "effect",
        f"hubspot:deal:{named}",
        "Website rebuild",
    )
    assert (first["client"], first["client_name"]) == (client, "Northwind Traders LLC")
    assert (second["source"], second["deal"], second["client_name"]) == ("event", f"hubspot:deal:{nameless}", None)
    assert second["reason"].startswith("no value for legal_name")


async def test_a_dismissed_dead_letter_is_hidden_counted_and_keeps_who_when_and_why(
    tmp_path: Path, db_url: str
) -> None:
    """`dead-letters dismiss ID --why` closes it: hidden unless --all, counted apart in status, never replayed."""
    async with stack(tmp_path, db_url) as s:
        await two_dead_letters(s)
        config = str(s.config.path)
        dismissed = await cli("dead-letters", "dismiss", "1", "--why", "invoiced by hand", "--by", "ops", "-c", config)
        again = await cli("dead-letters", "dismiss", "1", "--why", "twice", "-c", config)
        unknown = await cli("dead-letters", "dismiss", "99", "--why", "no such", "-c", config)
        empty_why = await cli("dead-letters", "dismiss", "2", "--why", " ", "-c", config)
        shown = await cli("dead-letters", "list", "-c", config)
        every = await cli("dead-letters", "list", "--all", "-c", config)
        status = await cli("status", "-c", config)
        status_json = await cli("status", "-c", config, "--json")
        replayed = await cli("replay", "1", "-c", config)
        (row,) = await s.daemon.runtime.store.select(DeadLetterRow, sa.column("id") == 1)
        effect = (await s.daemon.runtime.store.select(EffectRow))[0]

    assert (dismissed.exit_code, dismissed.output) == (0, "dead letter 1 dismissed by ops\n")
    assert (row.status, row.dismissed_by, row.dismissed_why) == ("dismissed", "ops", "invoiced by hand")
    assert row.dismissed_at is not None
    assert again.exit_code == 1
    assert again.output.startswith("✗ dead letter 1 was dismissed already, on ")
    assert again.output.endswith(" by ops: invoiced by hand\n")
    assert again.output.count("\n") == 1
    assert (unknown.exit_code, unknown.output) == (
        1,
        "✗ no dead letter with id 99; `syncd dead-letters list --all` lists them\n",
    )
    assert empty_why.exit_code == 2

    assert [line for line in shown.output.splitlines() if line.startswith("#")] == [
        line for line in every.output.splitlines() if line.startswith("#2 ")
    ]
    assert "not shown: 1 dismissed (--all lists them)" in shown.output
    assert "#1 dismissed · effect" in every.output
    assert "  dismissed: " in every.output
    assert "by ops: invoiced by hand" in every.output
    assert fits(every.output)

    status_lines = status.output.splitlines()
    hubspot, xero = status_lines.index("  hubspot: last sync never"), status_lines.index("  xero: last sync never")
    assert status_lines[hubspot + 2] == "    dead letters: 1 open, 0 dismissed"  # the event's
    assert status_lines[xero + 2] == "    dead letters: 0 open, 1 dismissed"  # the invoice Xero refused
    connections = {item["connection"]: item for item in json.loads(status_json.output)["connections"]}
    assert (connections["xero"]["dead_letters_open"], connections["xero"]["dead_letters_dismissed"]) == (0, 1)
    assert (connections["hubspot"]["dead_letters_open"], connections["hubspot"]["dead_letters_dismissed"]) == (1, 0)

    assert replayed.exit_code == 0
    assert "dead letter 1 left as it is: it is dismissed, not open" in replayed.output
    assert "requeued 0 record(s)" in replayed.output
    assert effect.status == "dead"  # a dismissed letter's effect stays where it was


async def test_replay_of_an_unknown_id_is_one_line_exit_1_and_requeues_nothing(tmp_path: Path, db_url: str) -> None:
    """`syncd replay 2 77` names 77 in one line, exits 1, and leaves 2 dead."""
    async with stack(tmp_path, db_url) as s:
        await two_dead_letters(s)
        config = str(s.config.path)
        result = await cli("replay", "2", "77", "-c", config)
        letters = await s.daemon.runtime.store.select(DeadLetterRow)
    assert (result.exit_code, result.output) == (
        1,
        "✗ no dead letter with id 77; `syncd dead-letters list --all` lists them\n",
    )
    assert [letter.status for letter in letters] == ["open", "open"]


async def test_status_names_the_newest_invoices_in_80_columns_and_as_json(tmp_path: Path, db_url: str) -> None:
    """`syncd status` lists each connection, then the invoice with its deal and client names; --json the same."""
    async with stack(tmp_path, db_url) as s:
        company = seed_company(s.hub)
        deal = seed_deal(s.hub, company=company)
        await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
        await s.drain()
        (invoice,) = s.xero.invoices()
        config = str(s.config.path)
        text = await cli("status", "-c", config)
        narrow = await cli("status", "-c", config, columns=40)
        found = json.loads((await cli("status", "-c", config, "--json")).output)
    assert text.exit_code == 0, text.output
    assert fits(text.output)
    assert fits(narrow.output, 40)
    lines = text.output.splitlines()
    number = invoice["InvoiceNumber"]
    assert lines[0] == "connections:"
    assert "  hubspot: last sync never" in lines
    assert "invoices: 1" in lines
    assert any(line.startswith(f"  {number} · {invoice['Total']} USD · authorised · due ") for line in lines)
    assert f"    deal:   Website rebuild (hubspot:deal:{deal})" in lines
    assert f"    client: Northwind Traders LLC (hubspot:company:{company[0]})" in lines
    assert lines[-1] == "outcomes without an invoice: skip: 0; simulated: 0; attention: 0"

    assert [item["connection"] for item in found["connections"]] == ["hubspot", "xero"]
    (listed,) = found["invoices"]
    assert (listed["number"], listed["deal"], listed["deal_name"]) == (
        number,
        f"hubspot:deal:{deal}",
        "Website rebuild",
    )
    assert (listed["client_name"], listed["currency"], listed["total"]) == (
        "Northwind Traders LLC",
        "USD",
        str(invoice["Total"]),
    )
    assert (found["invoice_count"], found["outcomes"]) == (1, [])


def test_an_entry_wraps_every_field_under_its_value_and_breaks_long_words() -> None:
    """A long reason wraps under its value, a word longer than the width is broken, nothing is lost."""
    reason, path = ("word " * 30).strip(), "mappings/" + "x" * 90 + ".toml:12"
    lines = entry("#7 open · event 3 · hubspot", [("reason", reason), ("place", path), ("empty", "")], 60)
    assert all(len(line) <= 60 for line in lines)
    assert lines[0] == "#7 open · event 3 · hubspot"
    place = next(number for number, line in enumerate(lines) if line.startswith("  place:"))
    assert all(line.startswith(" " * 10) for line in lines[2:place] + lines[place + 1 :])
    assert lines[1].startswith("  reason: word")
    assert " ".join(line[10:] for line in lines[1:place]) == reason
    assert "".join(line[10:] for line in lines[place:]) == path
    assert not any("empty" in line for line in lines)
