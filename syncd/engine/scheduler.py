"""APScheduler ticks that enqueue work; the database makes each window run once.

Ticks only *enqueue*: a poll reads a connection's change feed from its stored cursor
and puts the hints in the inbox. Before running, a tick inserts a row per
(job, window) under a unique constraint (:meth:`~syncd.store.db.Store.claim_tick`), so
with several replicas each window runs on exactly one of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import structlog
from apscheduler.executors.asyncio import AsyncIOExecutor
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from syncd.core.errors import AuthError, RetriableError, SyncdError
from syncd.engine import alerts, audit, drift
from syncd.engine.runtime import Runtime
from syncd.store import retention
from syncd.store.db import CursorRow

log = structlog.get_logger("syncd.engine.scheduler")

CHANGES = "changes"
RECURRING_INTERVAL_S = 3600  # the recurring-billing tick runs once an hour across replicas
COLLECTIONS_INTERVAL_S = 3600  # the collections tick too
AUDIT_INTERVAL_S = 3600  # the monthly audit is looked at hourly; it runs once per closed month


def polled_connections(runtime: Runtime) -> list[str]:
    """Connections whose change feeds the pipelines read (CRM, invoicing, time tracking)."""
    names: list[str] = []
    for pipeline in runtime.pipelines:
        for name in (pipeline.crm_name, pipeline.invoicing_name, pipeline.time_tracking_name):
            if name and name not in names:
                names.append(name)
    return names


async def poll_connection(runtime: Runtime, name: str, *, max_pages: int = 100) -> int:
    """Read one connection's change feed into the inbox; how many new events.

    The cursor is saved after every page, so a crash resumes where it stopped. An error
    is recorded on the cursor row (``syncd status`` shows it) and logged.
    """
    connector = runtime.connectors[name]
    row = await runtime.store.get(CursorRow, name, CHANGES)
    cursor = row.cursor if row is not None else None
    new = 0
    try:
        for _ in range(max_pages):
            page = await connector.poll_changes(cursor, since=runtime.billing_start)
            now = runtime.clock()
            new += await runtime.store.add_events(page.hints, now=now)
            cursor = page.cursor
            await _save_cursor(runtime, name, cursor, now, None)
            if not page.more:
                break
    except SyncdError as exc:
        await _save_cursor(runtime, name, cursor, None, str(exc))
        log.warning("poll_failed", connection=name, error=str(exc))
        await _note_failure(runtime, name, exc)
        return new
    runtime.health.succeeded(name)
    if new:
        log.info("poll_done", connection=name, new=new)
    return new


async def _note_failure(runtime: Runtime, name: str, exc: SyncdError) -> None:
    """A poll that failed for want of authorisation, or again at a vendor (:mod:`syncd.engine.alerts`)."""
    now = runtime.clock()
    if isinstance(exc, AuthError):
        await alerts.auth_lost(runtime.store, name, exc.message, now)
    elif isinstance(exc, RetriableError):
        after_s = runtime.config.settings.alerts.vendor_errors_after_s
        await runtime.health.failed(runtime.store, name, exc.message, now, after_s=after_s)


async def _save_cursor(
    runtime: Runtime, name: str, cursor: str | None, ok_at: datetime | None, error: str | None
) -> None:
    values: dict[str, object] = {"connection": name, "stream": CHANGES, "cursor": cursor, "last_error": error}
    if ok_at is not None:
        values["last_success_at"] = ok_at
    await runtime.store.upsert(CursorRow, values)


def window_of(now: datetime, interval_s: int) -> str:
    """The tick window ``now`` falls in (its index since the epoch)."""
    return str(int(now.timestamp()) // interval_s)


async def tick_poll(runtime: Runtime, name: str, notify: object = None) -> None:
    """One poll tick for ``name``, run only by the replica that claims the window."""
    interval = runtime.config.daemon.poll_interval_s
    now = runtime.clock()
    if not await runtime.store.claim_tick(f"poll:{name}", window_of(now, interval), owner=runtime.owner, now=now):
        return
    if await poll_connection(runtime, name) and callable(notify):
        notify()


async def tick_aging(runtime: Runtime, refresh: Callable[[], Awaitable[int]]) -> None:
    """Once a day across replicas: write overdue days back for unpaid invoices past due."""
    now = runtime.clock()
    if await runtime.store.claim_tick("aging", now.date().isoformat(), owner=runtime.owner, now=now):
        await refresh()


async def tick_retention(runtime: Runtime) -> dict[str, int] | None:
    """Once a day across replicas: delete what ``[retention]`` lets go (:func:`syncd.store.retention.prune`).

    Returns:
        rows deleted per rule, or ``None`` when another run (or replica) had the day.
    """
    now = runtime.clock()
    if not await runtime.store.claim_tick("retention", now.date().isoformat(), owner=runtime.owner, now=now):
        return None
    return await retention.prune(runtime.store, runtime.config.settings.retention, now=now)


async def tick_recurring(runtime: Runtime, run: Callable[[], Awaitable[int]]) -> bool:
    """Once per hour across replicas: read new hours and queue every billing event due.

    ``run`` is :func:`syncd.engine.recurring.run_due` bound to the engine. Retainers and
    subscriptions are invoiced on their calendar date this way, with no CRM change.

    Returns:
        whether this replica ran the window.
    """
    now = runtime.clock()
    if not await runtime.store.claim_tick(
        "recurring", window_of(now, RECURRING_INTERVAL_S), owner=runtime.owner, now=now
    ):
        return False
    await run()
    return True


async def tick_collections(runtime: Runtime, run: Callable[[], Awaitable[int]]) -> bool:
    """Once per hour across replicas: company receivables for each client's new local day,
    and the follow-up tasks due (:meth:`syncd.engine.collection.Collections.run`).

    Hourly, not daily: a client's day starts at its own midnight, and aging moves then.

    Returns:
        whether this replica ran the window.
    """
    now = runtime.clock()
    if not await runtime.store.claim_tick(
        "collections", window_of(now, COLLECTIONS_INTERVAL_S), owner=runtime.owner, now=now
    ):
        return False
    await run()
    return True


async def tick_audit(runtime: Runtime) -> bool:
    """The monthly audit (:func:`syncd.audit.run_monthly`), once per closed month across replicas.

    Looked at every hour: the first look after a month closes (in the company's zone)
    claims the month's window, logs its audit and records an alert for each rising share.

    Returns:
        whether this replica ran it.
    """
    return await audit.run_monthly(runtime) is not None


async def tick_drift(runtime: Runtime) -> int:
    """The drift guard (:func:`syncd.engine.drift.run_drift_check`), on every replica.

    Not claimed per window like the other ticks: it only reads, and its result is this
    process's ``/metrics`` gauge, which each replica should report. Its cost is one
    properties read per CRM object type and three code lists per invoicing connection.
    It runs once at start, then every ``drift_check_interval_s``.
    """
    return await drift.run_drift_check(runtime)


class SettlingExecutor(AsyncIOExecutor):  # type: ignore[misc]  # apscheduler ships no types
    """APScheduler's asyncio executor, whose cancelled jobs can be waited for.

    ``AsyncIOExecutor.shutdown`` only cancels the jobs in flight (an at-start drift or
    poll tick, say). A job cancelled while it holds a database connection returns it only
    when it runs again; closing the store before that leaves the connection open, and
    aiosqlite's worker thread (not a daemon thread) then keeps the process from exiting.
    The daemon awaits :meth:`settled` before it closes the store.
    """

    def __init__(self) -> None:
        super().__init__()
        self._cancelled: list[asyncio.Future[Any]] = []

    def shutdown(self, wait: bool = True) -> None:
        self._cancelled = [f for f in self._pending_futures if not f.done()]
        super().shutdown(wait)

    async def settled(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) for the jobs cancelled by :meth:`shutdown` to end."""
        if self._cancelled:
            await asyncio.wait(self._cancelled, timeout=timeout_s)


def build_scheduler(
    runtime: Runtime,
    notify: object = None,
    aging: Callable[[], Awaitable[int]] | None = None,
    recurring: Callable[[], Awaitable[int]] | None = None,
    collections: Callable[[], Awaitable[int]] | None = None,
) -> AsyncIOScheduler:
    """An AsyncIOScheduler with a poll job per polled connection, the daily aging and
    retention jobs, the hourly recurring-billing and collections jobs and the monthly audit
    (not yet started).

    Recurring billing, aging, retention, collections, the audit and the drift guard run once as
    soon as the scheduler starts, then on their interval, so a daemon restarted more often than an interval
    still bills and ages (the per-window tick rows keep a window from running twice
    across restarts and replicas). Polls run every ``poll_interval_s``; a fresh
    connection's first poll reads from ``billing_start``.
    """
    scheduler = AsyncIOScheduler(timezone="UTC", executors={"default": SettlingExecutor()})
    first = {"next_run_time": datetime.now(UTC)}
    if aging is not None:
        scheduler.add_job(
            tick_aging, "interval", hours=1, args=[runtime, aging], id="aging", max_instances=1, coalesce=True, **first
        )
    if recurring is not None:
        scheduler.add_job(
            tick_recurring,
            "interval",
            seconds=RECURRING_INTERVAL_S,
            args=[runtime, recurring],
            id="recurring",
            max_instances=1,
            coalesce=True,
            **first,
        )
    if collections is not None:
        scheduler.add_job(
            tick_collections,
            "interval",
            seconds=COLLECTIONS_INTERVAL_S,
            args=[runtime, collections],
            id="collections",
            max_instances=1,
            coalesce=True,
            **first,
        )
    scheduler.add_job(
        tick_retention, "interval", hours=1, args=[runtime], id="retention", max_instances=1, coalesce=True, **first
    )
    scheduler.add_job(
        tick_audit,
        "interval",
        seconds=AUDIT_INTERVAL_S,
        args=[runtime],
        id="audit",
        max_instances=1,
        coalesce=True,
        **first,
    )
    if runtime.config.daemon.drift_check_interval_s:
        scheduler.add_job(
            tick_drift,
            "interval",
            seconds=runtime.config.daemon.drift_check_interval_s,
            args=[runtime],
            id="drift",
            max_instances=1,
            coalesce=True,
            **first,
        )
    for name in polled_connections(runtime):
        scheduler.add_job(
            tick_poll,
            "interval",
            seconds=runtime.config.daemon.poll_interval_s,
            args=[runtime, name, notify],
            id=f"poll:{name}",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=runtime.config.daemon.poll_interval_s,
        )
    return scheduler


async def scheduler_jobs_settled(scheduler: AsyncIOScheduler, timeout_s: float) -> None:
    """After ``scheduler.shutdown``: wait (at most ``timeout_s``) for the jobs it cancelled."""
    executor = scheduler._lookup_executor("default")
    if isinstance(executor, SettlingExecutor):
        await executor.settled(timeout_s)
