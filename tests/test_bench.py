"""The benchmarks still run: each measurement's quick path at a tiny size (no time is asserted)."""

from __future__ import annotations

import pytest

from bench import backfill, budget, e2e, ingest, monthstart, poll, store
from bench.report import TINY, Row

pytestmark = pytest.mark.slow


def _values(rows: list[Row], metric: str) -> list[float]:
    return [row.value for row in rows if row.metric == metric and row.value is not None]


async def test_ingest_acknowledges_every_signed_webhook() -> None:
    """Each ingest run gets its signed webhooks acknowledged (none fail) and reports a rate, with the workers running too."""
    rows = await ingest.run(TINY)
    rates = [row for row in rows if row.metric == "req/s"]
    assert [row.setting for row in rates] == [
        "sqlite c=1",
        "sqlite c=4",
        "sqlite paced 20/s",
        "sqlite paced 20/s, workers running",
    ]
    assert all(row.value and row.value > 0 for row in rates)
    assert all(row.note.startswith("failed 0") for row in rates)


async def test_end_to_end_invoices_deals_and_the_baseline_makes_the_same_calls() -> None:
    """syncd with batching off and the baseline both invoice deals, with the same vendor calls per deal."""
    profile = TINY
    ours = await e2e.measure(profile, system="syncd", clients=2, latency_s=0.0, batch_max=e2e.UNBATCHED)
    floor = await e2e.measure(profile, system="baseline", clients=2, latency_s=0.0)
    assert ours.deals > 0
    assert floor.deals > 0
    assert ours.drained
    assert floor.drained
    assert (round(ours.hub_calls, 1), round(ours.xero_calls, 1)) == (
        round(floor.hub_calls, 1),
        round(floor.xero_calls, 1),
    )
    assert ours.peak_rss_mb > 0
    assert ours.cpu_ms_per_deal > 0
    assert ours.transactions is not None
    assert ours.transactions > 0
    assert floor.transactions == 0.0


async def test_batching_at_sixteen_deals_at_once_makes_at_most_three_vendor_calls_per_deal() -> None:
    """With syncd's default batching, 16 concurrent deals cost at most 3 vendor calls each (HubSpot + Xero)."""
    outcome = await e2e.measure(TINY, system="syncd", clients=16, latency_s=0.0)
    assert outcome.deals >= 16
    assert outcome.drained
    assert outcome.hub_calls + outcome.xero_calls <= 3.0, (outcome.hub_calls, outcome.xero_calls)


async def test_month_start_invoices_every_retainer_client_with_batching_off_and_on() -> None:
    """Every retainer due on the 1st is invoiced and written back by the recurring tick, batching off and on."""
    rows = await monthstart.run(TINY)
    clients = TINY.monthstart_clients
    times = [row for row in rows if row.metric == "tick → last invoice"]
    assert [row.setting for row in times] == [
        f"{clients} clients, batching off (batch_max=1)",
        f"{clients} clients, batching on",
    ]
    assert all(row.value is not None and row.value > 0 for row in times)
    assert all(row.note.startswith(f"{clients} of {clients} invoiced; acquaintance") for row in times)
    assert _values(rows, "429s") == [0.0, 0.0]
    assert all(value > 0 for value in _values(rows, "Xero calls/invoice"))
    assert all(value > 0 for value in _values(rows, "transactions/invoice"))
    (speedup,) = [row for row in rows if row.metric == "speed-up, batching on vs off"]
    assert speedup.value is not None


async def test_budget_invoices_every_deal_under_the_xero_limits() -> None:
    """Every deal is invoiced through the rate-limited Xero emulator, and the calls are recorded."""
    rows = await budget.run(TINY)
    (windows,) = [row for row in rows if row.metric == "Xero windows (60 s)"]
    assert windows.note.startswith(f"{TINY.budget_deals} of {TINY.budget_deals} deals invoiced")
    assert _values(rows, "429s (whole run)") == [0.0]


async def test_backfill_reads_every_deal_page_by_page() -> None:
    """The backfill reads every seeded deal, 100 per list call."""
    rows = await backfill.run(TINY)
    (size,) = TINY.backfill_sizes
    assert _values(rows, "API calls") == [float(-(-size // 100))]
    (wall,) = [row for row in rows if row.metric == "wall time"]
    assert wall.note.startswith(f"{size:,} deals read")


async def test_poll_hints_exactly_the_changed_deals() -> None:
    """An incremental poll hints the changed deals and nothing else, in one search call."""
    rows = await poll.run(TINY)
    (calls,) = [row for row in rows if row.metric == "API calls"]
    assert calls.value == 1.0
    assert calls.note.startswith(f"{TINY.poll_changed} deals hinted")


async def test_store_runs_a_deals_transactions_under_every_model() -> None:
    """Each way of running the store completes deals' transactions on SQLite, none failing."""
    rows = await store.run(TINY)
    rates = [row for row in rows if row.metric == "deals/s"]
    assert [row.setting for row in rates] == [
        f"sqlite {model} c={clients}" for model in store.MODELS["sqlite"] for clients in (1, 16)
    ]
    assert all(row.value and row.value > 0 for row in rates if row.setting.endswith("c=1"))
    assert all(row.note.startswith("failed 0") for row in rates)
