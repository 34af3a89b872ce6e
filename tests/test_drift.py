"""The drift guard: mappings against the vendors' live schemas (syncd/engine/drift.py, `syncd check`).

The runtime-level tests run the emulators over ASGI transports on SQLite and PostgreSQL;
the CLI test serves them with uvicorn on loopback ports in threads, because `syncd check`
builds its own HTTP client (and runs its own event loop).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import structlog

from connectors.emulation import Fault
from connectors.hubspot.emulator import HubSpotEmulator
from connectors.xero.emulator import XeroEmulator
from syncd.core.mapping import load_mapping
from syncd.engine import drift
from syncd.engine.scheduler import build_scheduler, tick_drift
from syncd.store.db import DeadLetterRow
from tests.harness import MAPPING, stack, write_config
from tests.servers import invoke, serve_in_thread


@pytest.fixture(autouse=True)
def default_structlog() -> None:
    """Log through structlog's defaults: a CLI test run earlier may have left it on a closed stream."""
    structlog.reset_defaults()


def line_of(path: Path, prefix: str) -> int:
    """The 1-based line of the first line of ``path`` starting with ``prefix``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return next(number for number, line in enumerate(lines, 1) if line.startswith(prefix))


def proposed(folder: Path, old: str, new: str) -> Path:
    """The worked example with ``old`` replaced by ``new``, written to ``folder``."""
    text = MAPPING.read_text(encoding="utf-8")
    assert old in text
    path = folder / "mapping.toml"
    path.write_text(text.replace(old, new), encoding="utf-8")
    return path


def define_what_it_reads(hub: HubSpotEmulator, mapping: Path) -> None:
    """Create every custom property the mapping reads, as the admin did when setting it up."""
    for read in load_mapping(mapping).source_reads:
        hub.define_property(read.object_type, read.name)


def at(path: Path, prefix: str, label: str) -> str:
    """``file:line [table].key`` of the line starting with ``prefix``."""
    return f"{path}:{line_of(path, prefix)} {label}"


def test_target_codes_list_constants_defaults_and_table_values_with_their_place() -> None:
    """The worked example's codes are its defaults and lookup-table values, each at its line and key."""
    found = {(code.kind, code.code, code.place) for code in load_mapping(MAPPING).target_codes}
    assert found == {
        ("account_code", "200", at(MAPPING, "account_code =", "[engagement.lines].account_code")),
        ("tax_type", "OUTPUT", at(MAPPING, "tax_type =", "[engagement.lines].tax_type")),
        ("account_code", "200", at(MAPPING, '"SETUP-FEE"', "[tables.account_code_by_sku].SETUP-FEE")),
        ("tax_type", "NONE", at(MAPPING, '"EXPORT-SERVICES"', "[tables.tax_type_by_sku].EXPORT-SERVICES")),
        ("account_code", "200", at(MAPPING, "default = ", "[accounts].default")),
        ("account_code", "200", at(MAPPING, "by_line_kind = ", "[accounts].by_line_kind.deposit")),
        ("account_code", "200", at(MAPPING, "by_line_kind = ", "[accounts].by_line_kind.deduction")),
    }


def test_target_codes_include_constants_coalesced_and_money_currencies(tmp_path: Path) -> None:
    """A constant, a coalesce option, an inline table and a money currency are all listed; record values are not."""
    path = proposed(
        tmp_path,
        'unit_price = { money = "item.properties.price" }',
        'unit_price = { money = "item.properties.price", currency = "NZD" }',
    )
    path.write_text(
        path.read_text(encoding="utf-8")
        .replace(
            'item_code = { path = "item.properties.hs_sku" }',
            'item_code = { coalesce = [ { path = "item.properties.hs_sku" }, "MISC" ] }',
        )
        .replace(
            'currency = { path = "deal.properties.deal_currency_code", default = { path = "defaults.currency" } }\n'
            "payment_terms_days",
            'currency = { lookup = "deal.properties.region", table = { eu = "EUR" }, default = "GBP" }\n'
            "payment_terms_days",
        ),
        encoding="utf-8",
    )
    codes = {(code.kind, code.code) for code in load_mapping(path).target_codes}
    assert {("item_code", "MISC"), ("currency", "NZD"), ("currency", "EUR"), ("currency", "GBP")} <= codes
    assert not any(code.startswith("item.") or code.startswith("deal.") for _, code in codes)


def test_source_reads_name_every_place_a_property_is_read() -> None:
    """A property read by two keys is listed at both places."""
    reads = [read for read in load_mapping(MAPPING).source_reads if read.name == "default_po_number"]
    assert [(read.object_type, read.place) for read in reads] == [
        ("company", at(MAPPING, "po_number = { path", "[client].po_number")),
        ("company", at(MAPPING, "po_number = { coalesce", "[engagement].po_number")),
    ]


async def test_a_deleted_property_and_missing_codes_are_reported_with_file_line_and_key(
    tmp_path: Path, db_url: str
) -> None:
    """An archived HubSpot property and Xero account codes that are missing or archived are each reported."""
    mapping = proposed(tmp_path, '"SETUP-FEE" = "200"', '"SETUP-FEE" = "999"')
    async with stack(tmp_path, db_url, mapping=mapping) as s:
        define_what_it_reads(s.hub, mapping)
        table_entry = at(mapping, '"SETUP-FEE"', "[tables.account_code_by_sku].SETUP-FEE")
        assert await drift.check_pipelines(s.daemon.runtime) == [
            drift.DriftProblem(place=table_entry, message='xero has no account code "999"; it has: 090, 200, 260, 400')
        ]
        s.hub.archive_property("companies", "default_po_number")
        s.xero.archive_account("200")
        problems = [str(problem) for problem in await drift.check_pipelines(s.daemon.runtime)]
    gone = 'hubspot company property "default_po_number" does not exist (deleted or renamed?)'
    assert problems == [
        f"{at(mapping, 'po_number = { path', '[client].po_number')}: {gone}",
        f"{at(mapping, 'po_number = { coalesce', '[engagement].po_number')}: {gone}",
        f"{at(mapping, 'account_code =', '[engagement.lines].account_code')}: "
        'xero has no account code "200"; it has: 090, 260, 400',
        f'{at(mapping, "default = ", "[accounts].default")}: xero has no account code "200"; it has: 090, 260, 400',
        f"{at(mapping, 'by_line_kind = ', '[accounts].by_line_kind.deposit')}: "
        'xero has no account code "200"; it has: 090, 260, 400',
        f"{at(mapping, 'by_line_kind = ', '[accounts].by_line_kind.deduction')}: "
        'xero has no account code "200"; it has: 090, 260, 400',
        f'{table_entry}: xero has no account code "999"; it has: 090, 260, 400',
    ]


async def test_the_scheduled_check_logs_each_problem_and_exposes_the_count(tmp_path: Path, db_url: str) -> None:
    """The hourly drift job logs mapping_drift per problem, /metrics shows the count; a vendor error is one problem."""
    async with stack(tmp_path, db_url) as s:
        job = build_scheduler(s.daemon.runtime).get_job("drift")
        assert job is not None
        assert job.trigger.interval == timedelta(seconds=3600)
        define_what_it_reads(s.hub, MAPPING)
        s.hub.archive_property("deals", "billing_type")
        with structlog.testing.capture_logs() as logs:
            assert await tick_drift(s.daemon.runtime) == 2
        when, logged = [entry for entry in logs if entry["event"] == "mapping_drift"]
        assert when["place"] == at(MAPPING, "when = { all", "[pipeline].when")
        assert logged["place"] == at(MAPPING, "type = { lookup", "[engagement].type")
        assert 'deal property "billing_type" does not exist' in logged["problem"]
        metrics = (await s.web.get("/metrics")).text
        assert "syncd_mapping_drift_problems 2.0" in metrics

        s.xero.faults.add(Fault(kind="status", status=403, times=None, path_contains="/Accounts"))
        problems = await drift.check_pipelines(s.daemon.runtime)
    (unreadable,) = [problem for problem in problems if problem.place.startswith("[connections.")]
    assert unreadable.place == "[connections.xero]"
    assert unreadable.message.startswith("cannot read its codes for the drift check:")


# ---------------------------------------------------------------------------- `syncd check`


def test_syncd_check_reports_drift_by_file_line_and_key(tmp_path: Path, sqlite_url: str) -> None:
    """`syncd check` passes on a matching mapping, then names a deleted property and an unknown code."""
    hub, xero = HubSpotEmulator(rate_limits=False), XeroEmulator(rate_limits=False)
    mapping = proposed(tmp_path, '"SETUP-FEE" = "200"', '"SETUP-FEE" = "260"')
    define_what_it_reads(hub, mapping)
    with serve_in_thread(hub.app) as hub_url, serve_in_thread(xero.app) as xero_url:
        config = write_config(tmp_path, sqlite_url, hub, xero, mapping=mapping)
        text = config.read_text(encoding="utf-8")
        config.write_text(text.replace("http://hubspot.test", hub_url).replace("http://xero.test", xero_url))
        assert invoke("db", "upgrade", "--config", str(config)).exit_code == 0
        clean = invoke("check", "--config", str(config))
        assert clean.exit_code == 0, clean.output
        assert "config, mappings and connections are fine" in clean.output

        hub.archive_property("deals", "po_number")
        mapping.write_text(
            mapping.read_text(encoding="utf-8").replace('"SETUP-FEE" = "260"', '"SETUP-FEE" = "4000"'),
            encoding="utf-8",
        )
        drifted = invoke("check", "--config", str(config))
    assert drifted.exit_code == 1
    property_gone = 'hubspot deal property "po_number" does not exist (deleted or renamed?)'
    assert f"{at(mapping, 'po_number = { coalesce', '[engagement].po_number')}: {property_gone}" in drifted.output
    table_entry = at(mapping, '"SETUP-FEE"', "[tables.account_code_by_sku].SETUP-FEE")
    assert f'{table_entry}: xero has no account code "4000"' in drifted.output


async def test_tracking_options_and_ledger_codes_missing_at_xero_are_reported(tmp_path: Path, db_url: str) -> None:
    """A [tracking] option Xero has no such category option for, and an [accounts] code it lacks, are drift."""
    mapping = proposed(tmp_path, '\ndefault = "200"\n', '\ndefault = "999"\n')
    mapping.write_text(
        mapping.read_text(encoding="utf-8")
        + '\n[tracking]\nRegion = { path = "deal.properties.region", default = "East" }\n',
        encoding="utf-8",
    )
    async with stack(tmp_path, db_url, mapping=mapping) as s:
        define_what_it_reads(s.hub, mapping)
        problems = [str(problem) for problem in await drift.check_pipelines(s.daemon.runtime)]
        known = s.daemon.runtime.extra[drift.KNOWN_CODES]["xero"]
    assert problems == [
        f'{at(mapping, "default = ", "[accounts].default")}: xero has no account code "999"; it has: 090, 200, 260, 400',
        f'{at(mapping, "Region = ", "[tracking].Region")}: xero has no tracking category option "Region/East"; '
        "it has: Region/North, Region/South",
    ]
    assert "200" in known["account_code"]


async def test_a_client_account_code_xero_lacks_dead_letters_the_deal_at_its_mapping_key(
    tmp_path: Path, db_url: str
) -> None:
    """A company's own account code (read from a CRM property) missing at Xero fails that deal, naming [client].account_code."""
    mapping = proposed(
        tmp_path,
        'po_number = { path = "company.properties.default_po_number" }              # custom\n',
        'po_number = { path = "company.properties.default_po_number" }              # custom\n'
        'account_code = { path = "company.properties.xero_account_code" }\n',
    )
    async with stack(tmp_path, db_url, mapping=mapping) as s:
        define_what_it_reads(s.hub, mapping)
        assert await drift.check_pipelines(s.daemon.runtime) == []
        for code in ("260", "999"):
            company = s.hub.add_company({"name": f"Client {code}", "xero_account_code": code})
            deal = s.hub.add_deal(
                {"dealname": f"Deal {code}", "pipeline": "default", "dealstage": "contractsent", "amount": "100.00"},
                company_id=company,
            )
            await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
            await s.drain()
        letters = await s.daemon.runtime.store.select(DeadLetterRow)
        invoices = s.xero.invoices()
    (letter,) = letters
    assert letter.place == at(mapping, "account_code = { path", "[client].account_code")
    assert "account code '999' read from the CRM is not in use" in letter.reason
    (invoice,) = invoices
    assert [line["AccountCode"] for line in invoice["LineItems"]] == ["260"]
