"""Hot reload of mapping files (Runtime.reload_mappings, the daemon's file watch and SIGHUP).

Each test runs a daemon on SQLite and on PostgreSQL with the emulators over ASGI
transports. The periodic file watch is switched off (``mapping_watch_interval_s = 0``)
and its one step, :meth:`Daemon.poll_mappings`, is called by hand: no test waits on a timer.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog

from tests.harness import MAPPING, seed_company, seed_deal, stack

NO_WATCH = "mapping_watch_interval_s = 0"
ACCOUNT_DEFAULT = 'table = "account_code_by_sku", default = "200" }'


@pytest.fixture(autouse=True)
def default_structlog() -> None:
    """Log through structlog's defaults: a CLI test run earlier may have left it on a closed stream."""
    structlog.reset_defaults()


def copy_of_example(folder: Path) -> Path:
    path = folder / "mapping.toml"
    path.write_text(MAPPING.read_text(encoding="utf-8"), encoding="utf-8")
    return path


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new), encoding="utf-8")


def account_codes(invoice: dict[str, object]) -> list[object]:
    lines = invoice["LineItems"]
    assert isinstance(lines, list)
    return [line["AccountCode"] for line in lines]


async def until(condition: Callable[[], bool]) -> None:
    """Yield to the event loop until ``condition`` holds (the caller bounds it with a timeout)."""
    while not condition():
        await asyncio.sleep(0)


async def test_a_good_change_is_swapped_in_and_applies_to_the_next_event(tmp_path: Path, db_url: str) -> None:
    """An edited mapping file is validated and swapped in; the next deal is invoiced with it, the first was not."""
    mapping = copy_of_example(tmp_path)
    async with stack(tmp_path, db_url, mapping=mapping, daemon_extra=NO_WATCH) as s:
        company = seed_company(s.hub)
        first = seed_deal(s.hub, company=company)
        await s.hub.set_deal_properties(first, {"dealstage": "closedwon"})
        await s.drain()
        running = s.daemon.runtime.pipelines
        assert s.daemon.poll_mappings() is None

        edit(mapping, ACCOUNT_DEFAULT, 'table = "account_code_by_sku", default = "260" }  # Other Revenue')
        assert s.daemon.poll_mappings() == []
        assert s.daemon.runtime.pipelines is not running
        assert s.daemon.poll_mappings() is None
        second = seed_deal(s.hub, company=company)
        await s.hub.set_deal_properties(second, {"dealstage": "closedwon"})
        await s.drain()

    by_deal = {invoice["Reference"]: invoice for invoice in s.xero.invoices()}
    assert len(by_deal) == 2
    first_invoice, second_invoice = sorted(by_deal.values(), key=lambda invoice: str(invoice["InvoiceNumber"]))
    assert account_codes(first_invoice) == ["200", "200"]
    assert account_codes(second_invoice) == ["260", "260"]


async def test_a_bad_change_keeps_the_running_mapping_and_reports_every_problem(tmp_path: Path, db_url: str) -> None:
    """A file with two mistakes is refused with both, each by file, line and key; events keep the old mapping."""
    mapping = copy_of_example(tmp_path)
    async with stack(tmp_path, db_url, mapping=mapping, daemon_extra=NO_WATCH) as s:
        running = s.daemon.runtime.pipelines[0].mapping
        edit(
            mapping,
            'unit_price = { money = "item.properties.price" }',
            'unit_price = { mony = "item.properties.price" }',
        )
        edit(
            mapping,
            'tax_id = { path = "company.properties.tax_id" }',
            'tax_idd = { path = "company.properties.tax_id" }',
        )
        lines = mapping.read_text(encoding="utf-8").splitlines()
        tax_line = next(n for n, line in enumerate(lines, 1) if line.startswith("tax_idd"))
        price_line = next(n for n, line in enumerate(lines, 1) if line.startswith("unit_price"))
        with structlog.testing.capture_logs() as logs:
            problems = s.daemon.poll_mappings()
        assert problems is not None
        assert len(problems) == 2
        assert problems[0].startswith(f'{mapping}:{tax_line} [client].tax_idd: unknown key "tax_idd"')
        assert problems[1].startswith(f'{mapping}:{price_line} [engagement.lines].unit_price: unknown transform "mony"')
        assert [entry["problem"] for entry in logs if entry["event"] == "mapping_reload_failed"] == problems
        assert s.daemon.runtime.pipelines[0].mapping is running

        deal = seed_deal(s.hub)
        await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
        await s.drain()
        (invoice,) = s.xero.invoices()
        assert account_codes(invoice) == ["200", "200"]
        assert s.daemon.poll_mappings() is None


async def test_sighup_reloads_the_mappings(tmp_path: Path, db_url: str) -> None:
    """SIGHUP to the process reloads the mapping files; the handler is gone once the daemon stops."""
    mapping = copy_of_example(tmp_path)
    async with stack(tmp_path, db_url, mapping=mapping, daemon_extra=NO_WATCH) as s:
        assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        running = s.daemon.runtime.pipelines[0].mapping
        edit(mapping, ACCOUNT_DEFAULT, 'table = "account_code_by_sku", default = "260" }')
        os.kill(os.getpid(), signal.SIGHUP)
        await asyncio.wait_for(until(lambda: s.daemon.runtime.pipelines[0].mapping is not running), timeout=10)
        codes = {(code.kind, code.code) for code in s.daemon.runtime.pipelines[0].mapping.target_codes}
        assert ("account_code", "260") in codes
        assert s.daemon.poll_mappings() is None
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
