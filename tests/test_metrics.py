"""/metrics, scraped over HTTP after real flows through the emulators (syncd/plumbing/metrics.py).

Each test runs a daemon on SQLite and on PostgreSQL (``tests/harness.py``) with a clock
the test moves, drives a deal or a fault through it, and reads the series it expects
from the Prometheus text the app serves.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from connectors.emulation import Fault
from tests.harness import MAPPING, Stack, seed_deal, stack

GO_LIVE = datetime(2026, 12, 1, 13, 0, tzinfo=UTC)
START = f'billing_start = "{GO_LIVE.isoformat()}"'
PIPELINE = "hubspot-xero"  # the shipped mapping's file stem


class Clock:
    """A clock the test moves by hand, shared by the emulators and syncd."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


async def scrape(web: httpx.AsyncClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample ``/metrics`` serves, by name and labels."""
    response = await web.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def win(s: Stack) -> str:
    deal = seed_deal(s.hub)
    await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
    return deal


async def test_an_invoice_is_counted_per_pipeline_with_its_latency_from_the_trigger(
    tmp_path: Path, db_url: str
) -> None:
    """Won at T, committed at T+90 s: one invoice created, a latency of 90 s in the pipeline's histogram."""
    clock = Clock(GO_LIVE + timedelta(hours=1))
    async with stack(tmp_path, db_url, clock=clock, daemon_extra=START) as s:
        await win(s)
        won_at = clock.at
        clock.at += timedelta(seconds=90)
        await s.drain()
        assert len(s.xero.invoices()) == 1
        samples = await scrape(s.web)
    assert value(samples, "syncd_invoices_created_total", pipeline=PIPELINE) == 1
    assert value(samples, "syncd_invoices_failed_total", pipeline=PIPELINE) is None
    latency = "syncd_invoice_latency_seconds"
    assert value(samples, f"{latency}_count", pipeline=PIPELINE) == 1
    assert value(samples, f"{latency}_sum", pipeline=PIPELINE) == (clock.at - won_at).total_seconds() == 90
    assert value(samples, f"{latency}_bucket", pipeline=PIPELINE, le="60.0") == 0
    assert value(samples, f"{latency}_bucket", pipeline=PIPELINE, le="300.0") == 1


async def test_vendor_calls_are_counted_by_connection_and_status_429_and_401_included(
    tmp_path: Path, db_url: str
) -> None:
    """A 429 waited out and a 401 answered by a token renewal are counted beside the 200s, per connection."""
    async with stack(tmp_path, db_url) as s:
        s.xero.faults.add(
            Fault(kind="status", status=429, retry_after_s=3, times=1, method="PUT", path_contains="/Invoices")
        )
        await win(s)
        await s.drain()
        assert len(s.xero.invoices()) == 1
        assert 3.0 in s.sleeps  # the in-request retry waited the Retry-After
        before = await scrape(s.web)
        s.xero.revoke_access_tokens()
        await s.daemon.runtime.connectors["xero"].http.request("GET", "/Organisation")
        after = await scrape(s.web)
    calls = "syncd_vendor_calls_total"
    assert value(before, calls, connection="xero", status="429") == 1
    assert value(before, calls, connection="xero", status="401") is None
    assert (value(before, calls, connection="xero", status="200") or 0) >= 2  # customer, invoice …
    assert (value(before, calls, connection="hubspot", status="200") or 0) >= 2  # the deal read, the write-back
    assert value(after, calls, connection="xero", status="401") == 1
    ok_before = value(before, calls, connection="xero", status="200") or 0
    assert value(after, calls, connection="xero", status="200") == ok_before + 1  # the resend after the 401
    assert value(after, calls, connection="xero", status="429") == 1


async def test_a_dead_lettered_invoice_is_counted_as_failed_and_as_an_open_dead_letter(
    tmp_path: Path, db_url: str
) -> None:
    """Xero refusing the invoice (400) dead-letters it: failed per pipeline, an open dead letter of source effect."""
    async with stack(tmp_path, db_url) as s:
        s.xero.faults.add(Fault(kind="status", status=400, times=None, method="PUT", path_contains="/Invoices"))
        s.xero.faults.add(Fault(kind="status", status=400, times=None, method="POST", path_contains="/Invoices"))
        await win(s)
        await s.drain()
        assert s.xero.invoices() == []
        samples = await scrape(s.web)
    assert value(samples, "syncd_invoices_failed_total", pipeline=PIPELINE) == 1
    assert value(samples, "syncd_invoices_created_total", pipeline=PIPELINE) is None
    assert value(samples, "syncd_dead_letters_open", source="effect") == 1
    assert value(samples, "syncd_backlog", queue="dead_letters", status="open") == 1
    assert value(samples, "syncd_vendor_calls_total", connection="xero", status="400") == 1


async def test_skips_are_shown_by_reason_from_the_outcomes_table(tmp_path: Path, db_url: str) -> None:
    """A deal won before billing_start is a recorded skip; /metrics shows it under its reason."""
    clock = Clock(GO_LIVE - timedelta(days=30))
    async with stack(tmp_path, db_url, clock=clock, daemon_extra=START) as s:
        assert value(await scrape(s.web), "syncd_skips", reason="before_billing_start") is None
        deal = await win(s)
        clock.at = GO_LIVE + timedelta(days=5)
        await s.hub.set_deal_properties(deal, {"dealname": "Website rebuild (phase 1)"})
        await s.drain()
        samples = await scrape(s.web)
    assert value(samples, "syncd_skips", reason="before_billing_start") == 1
    assert value(samples, "syncd_outcomes", kind="skip", reason="before_billing_start") == 1


async def test_refused_mapping_reloads_and_token_refresh_failures_are_counted(tmp_path: Path, db_url: str) -> None:
    """A broken mapping file on reload and a refused token fetch each add one to their counters."""
    mapping = tmp_path / "mapping.toml"
    mapping.write_text(MAPPING.read_text(encoding="utf-8"), encoding="utf-8")
    clock = Clock(GO_LIVE + timedelta(hours=1))
    config = f"{START}\nmapping_watch_interval_s = 0"
    async with stack(tmp_path, db_url, clock=clock, mapping=mapping, daemon_extra=config) as s:
        mapping.write_text("[pipeline\nbroken", encoding="utf-8")
        assert s.daemon.reload_mappings()
        mapping.write_text(MAPPING.read_text(encoding="utf-8"), encoding="utf-8")
        assert s.daemon.reload_mappings() == []
        s.xero.faults.add(Fault(kind="status", status=400, times=1, path_contains="/connect/token"))
        await win(s)
        await s.drain()
        assert s.xero.invoices() == []  # the effect waits out the refused token (an AuthError)
        clock.at += timedelta(minutes=6)
        await s.drain()
        assert len(s.xero.invoices()) == 1
        samples = await scrape(s.web)
    assert value(samples, "syncd_mapping_reload_failures_total") == 1
    assert value(samples, "syncd_token_refresh_failures_total", connection="xero") == 1
    assert value(samples, "syncd_token_refresh_failures_total", connection="hubspot") is None


async def test_two_runtimes_in_one_process_count_apart(tmp_path: Path, sqlite_url: str) -> None:
    """Each runtime owns its registry: an invoice in one daemon is not counted by another."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with (
        stack(tmp_path / "a", sqlite_url) as first,
        stack(tmp_path / "b", f"sqlite:///{tmp_path / 'b' / 'other.db'}") as second,
    ):
        await win(first)
        await first.drain()
        assert value(await scrape(first.web), "syncd_invoices_created_total", pipeline=PIPELINE) == 1
        samples = await scrape(second.web)
    assert value(samples, "syncd_invoices_created_total", pipeline=PIPELINE) is None
    assert value(samples, "syncd_vendor_calls_total", connection="xero", status="200") is None
