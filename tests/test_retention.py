"""Retention (syncd/store/retention.py): old work rows go in bounded batches; billing records stay.

Each test runs on SQLite and on PostgreSQL against the emulators (``tests/harness.py``),
with a clock the test moves past the configured ages.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from syncd.core.errors import ConfigError
from syncd.engine import scheduler
from syncd.plumbing.settings import RetentionSettings, load_config
from syncd.store import retention
from syncd.store.db import (
    BillingEventRow,
    EffectRow,
    EventRow,
    InvoiceRow,
    OutcomeRow,
    SourceRecordRow,
    Store,
    TickRow,
    table_of,
)
from tests.harness import Stack, seed_deal, stack

T0 = datetime(2026, 12, 1, 15, 0, tzinfo=UTC)
START = f'billing_start = "{(T0 - timedelta(days=1)).isoformat()}"'


class Clock:
    """A clock the test moves by hand, shared by the emulators and syncd."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


async def counts(store: Store) -> dict[str, int]:
    effects = table_of(EffectRow)
    return {
        "events": await store.count(EventRow),
        "write_backs": await store.count(EffectRow, effects.c.kind != "create_invoice"),
        "sent_payloads": await store.count(EffectRow, effects.c.kind == "create_invoice"),
        "billing_events": await store.count(BillingEventRow),
        "invoices": await store.count(InvoiceRow),
        "source_records": await store.count(SourceRecordRow),
        "outcomes": await store.count(OutcomeRow),
        "ticks": await store.count(TickRow),
    }


async def invoiced_deal(s: Stack) -> str:
    deal = seed_deal(s.hub)
    await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
    await s.drain()
    assert len(s.xero.invoices()) == 1
    return deal


async def test_work_rows_go_after_their_age_and_billing_records_stay(tmp_path: Path, db_url: str) -> None:
    """After 30 days events, write-backs and ticks go; invoices, billing events and the newest snapshot stay."""
    clock = Clock(T0)
    async with stack(tmp_path, db_url, clock=clock, daemon_extra=START) as s:
        runtime = s.daemon.runtime
        store = runtime.store
        deal = await invoiced_deal(s)
        await store.claim_tick("aging", T0.date().isoformat(), owner="test", now=T0)
        before = await counts(store)
        assert before["events"] >= 1
        assert before["write_backs"] >= 1
        assert (before["sent_payloads"], before["invoices"], before["billing_events"]) == (1, 1, 1)
        assert before["source_records"] == 1

        clock.at = T0 + timedelta(days=29)
        assert await scheduler.tick_retention(runtime) == {
            "events": 0,
            "effects": 0,
            "ticks": 1,  # 7 days
            "outcomes": 0,
            "sent_payloads": 0,
        }
        clock.at = T0 + timedelta(days=31)
        pruned = await scheduler.tick_retention(runtime)
        assert pruned == {
            "events": before["events"],
            "effects": before["write_backs"],
            "ticks": 0,  # the previous run's own tick row is 2 days old
            "outcomes": 0,
            "sent_payloads": 0,
        }
        after = await counts(store)
        assert (after["events"], after["write_backs"]) == (0, 0)
        assert (after["sent_payloads"], after["invoices"], after["billing_events"]) == (1, 1, 1)
        assert after["source_records"] == 1  # the newest snapshot of its deal, a month old, is kept

        # A re-delivered webhook for the deal is taken as new, re-read, and invoices nothing twice.
        await s.hub.set_deal_properties(deal, {"dealname": "Website rebuild (phase 2)"})
        await s.drain()
        assert len(s.xero.invoices()) == 1
        assert (await counts(store))["billing_events"] == 1


async def test_the_payload_sent_and_outcomes_stay_13_months_and_open_attention_stays(
    tmp_path: Path, db_url: str
) -> None:
    """With the 13-month minimum: the payload sent and settled outcomes go after it; open attention never does."""
    clock = Clock(T0)
    extra = "\n[retention]\noutcomes_months = 13\nsent_payloads_months = 13\n"
    async with stack(tmp_path, db_url, clock=clock, daemon_extra=START, extra=extra) as s:
        runtime = s.daemon.runtime
        store = runtime.store
        await invoiced_deal(s)
        engine = s.daemon.engine
        for key, kind in (("skip:a", "skip"), ("attention:open", "attention"), ("attention:done", "attention")):
            await engine.record_outcome(key=key, kind=kind, reason="test", detail="recorded by the test")
        table = table_of(OutcomeRow)
        await store.update(OutcomeRow, [table.c.key == "attention:done"], {"status": "resolved", "resolved_at": T0})

        clock.at = T0 + timedelta(days=365)  # 12 months: everything billing is kept
        pruned = await retention.prune(store, runtime.config.settings.retention, now=clock.at)
        assert (pruned["outcomes"], pruned["sent_payloads"]) == (0, 0)
        clock.at = T0 + timedelta(days=31 * 13)
        pruned = await retention.prune(store, runtime.config.settings.retention, now=clock.at)
        assert (pruned["outcomes"], pruned["sent_payloads"]) == (2, 1)
        left = await store.select(OutcomeRow)
        assert [(row.key, row.status) for row in left] == [("attention:open", "open")]
        assert (await counts(store))["invoices"] == 1
        assert (await counts(store))["billing_events"] == 1


async def test_deletes_run_in_bounded_batches(tmp_path: Path, db_url: str) -> None:
    """2,500 old tick rows go in 25 deletes of 100 and one short one; the recent ones stay."""
    clock = Clock(T0)
    extra = "\n[retention]\nbatch_size = 100\n"
    async with stack(tmp_path, db_url, clock=clock, extra=extra) as s:
        store = s.daemon.runtime.store
        old = [{"job": "poll:hubspot", "window": str(n), "owner": "t", "started_at": T0} for n in range(2500)]
        new = [{"job": "poll:hubspot", "window": "new0", "owner": "t", "started_at": T0 + timedelta(days=8)}]
        async with store.begin() as conn:
            await conn.execute(sa.insert(table_of(TickRow)), old + new)
        clock.at = T0 + timedelta(days=8)
        with deletes(store) as seen:
            pruned = await retention.prune(store, s.daemon.runtime.config.settings.retention, now=clock.at)
        assert pruned["ticks"] == 2500
        ticks = [n for table, n in seen if table == "ticks"]
        assert ticks == [100] * 25 + [0]
        assert [row.window for row in await store.select(TickRow)] == ["new0"]


@contextlib.contextmanager
def deletes(store: Store) -> Iterator[list[tuple[str, int]]]:
    """Records every DELETE the store runs: (table, rows deleted)."""
    seen: list[tuple[str, int]] = []

    def after(conn: Any, clause: Any, multiparams: Any, params: Any, options: Any, result: Any) -> None:
        if isinstance(clause, sa.Delete):
            seen.append((clause.table.name, int(result.rowcount)))

    engine = store.engine.sync_engine
    event.listen(engine, "after_execute", after)
    try:
        yield seen
    finally:
        event.remove(engine, "after_execute", after)


async def test_the_daily_tick_runs_once_a_day(tmp_path: Path, db_url: str) -> None:
    """The retention tick claims its day: a second run that day (a restart, a replica) does nothing."""
    clock = Clock(T0)
    async with stack(tmp_path, db_url, clock=clock) as s:
        runtime = s.daemon.runtime
        assert await scheduler.tick_retention(runtime) is not None
        assert await scheduler.tick_retention(runtime) is None
        clock.at += timedelta(days=1)
        assert await scheduler.tick_retention(runtime) is not None


def test_a_retention_shorter_than_13_months_for_billing_records_is_a_config_error(tmp_path: Path) -> None:
    """outcomes_months / sent_payloads_months under 13 are refused with file, line and key; 0 keeps forever."""
    config = tmp_path / "config.toml"
    config.write_text("[retention]\nevents_days = 3\noutcomes_months = 12\nsent_payloads_months = 1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert caught.value.problems == [
        f"{config}:3 [retention].outcomes_months: 12 months is too short: billing records are kept at least "
        "13 months (0 keeps them forever)",
        f"{config}:4 [retention].sent_payloads_months: 1 months is too short: billing records are kept at least "
        "13 months (0 keeps them forever)",
    ]
    config.write_text("[retention]\noutcomes_months = 0\nsent_payloads_months = 13\n")
    assert load_config(config).settings.retention == RetentionSettings(outcomes_months=0, sent_payloads_months=13)
