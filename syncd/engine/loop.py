"""Inbox → process → outbox, the executor, and dead letters.

The flow (docs/architecture.md), each arrow a committed row before the next step starts:

1. **Process an event** (claimed from the inbox with a lease): re-read the record from
   the source API (the hint is not the truth), map it, and in *one transaction*
   upsert the client and engagement, record the billing event (unique key) and queue
   the effect that creates its invoice (unique key). A duplicate or late event finds
   the billing event already there and queues nothing.
2. **Execute an effect** (claimed from the outbox with a lease and an attempt
   counter): find-or-create the customer, *look the invoice up by its key first*,
   create it only if absent (sending the key as the vendor's idempotency key), then
   record it and queue the CRM write-back, fenced on the attempt it claimed.
3. **Invoice changes** (payment webhooks, polls) re-read the invoice and queue a
   write-back of the current status onto the deal.

Failures are handled per record: retriable ones go back to the queue with capped
exponential back-off (``[daemon].retry_max_delay_s``, or the vendor's ``Retry-After``)
until ``[daemon].give_up_after_s`` has passed since the record's first attempt; mapping,
validation and fatal ones go to the dead-letter table with the reason and the place,
and the rest keep flowing.

Claims (docs/architecture.md, Leases and fencing): a worker claims only as many rows as
it can finish within the lease at the vendors' rate limits and at the pace it measured;
each row is worked under a :class:`~syncd.plumbing.leases.Lease`, renewed while its calls run and
checked before every vendor write. On shutdown a worker claims nothing more, finishes
the vendor call in flight (no further call of that row is started: it goes back to the
queue with its attempt counted) and hands the rest of its batch back uncounted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
import structlog
from sqlmodel import col

from syncd.core import billing, receivables
from syncd.core.errors import (
    AuthError,
    FatalError,
    LeaseLost,
    MappingError,
    NotFound,
    RecordError,
    RetriableError,
    Stopping,
    SyncdError,
)
from syncd.core.interfaces import (
    AllocatesCredit,
    BillingEvent,
    BillingEventKind,
    ChangeHint,
    Client,
    CreatesInvoicesInBatches,
    DealBillingStatus,
    DraftKind,
    Engagement,
    EngagementType,
    HasLockDates,
    InvoiceDraft,
    InvoiceState,
    InvoiceStatus,
    LedgerDocument,
    ReadsCustomersInBatches,
    ReadsDealsInBatches,
    SendsInvoices,
    SourceRecord,
    VoidsInvoices,
    WritesStatusInBatches,
)
from syncd.engine import alerts, batching, clients, collection, hours, recurring, selectors
from syncd.engine.batching import Batcher
from syncd.engine.runtime import Pipeline, Runtime
from syncd.plumbing import failpoints
from syncd.plumbing.leases import Lease
from syncd.store import trail
from syncd.store.db import (
    BillingEventRow,
    ClientRow,
    Connection,
    EffectRow,
    EngagementRow,
    EventRow,
    InvoiceRow,
    InvoiceTrailRow,
    OutcomeRow,
    Settle,
    SourceRecordRow,
    decimal_text,
    table_of,
)

log = structlog.get_logger("syncd.engine.loop")

STANDING = "standing"  # a _FollowUp's prefetched deal standing
CLIENT = "client"  # a _FollowUp's prefetched client row (the invoice's customer step)
CREATE_INVOICE = "create_invoice"
WRITE_CRM_STATUS = "write_crm_status"
VOID_INVOICE = "void_invoice"
ALLOCATE_CREDIT = "allocate_credit"
LOCK_DATES_TTL_S = 600  # lock dates are read at most every 10 minutes per connection (vendor quota)
DELAYED_KINDS = frozenset({BillingEventKind.DEAL_WON, BillingEventKind.DELIVERABLE_ACCEPTED})
AUTH_RETRY_MIN_S = 300.0  # rejected credentials are not fixed in seconds: look again in 5 minutes
CALLS_PER_ROW = 4  # vendor calls a row takes, until measured (a deal: its reads; an invoice: look-ups, create)
LEASE_SHARE = 0.5  # a claimed batch must fit in half the lease, at the pace expected
PACE_WEIGHT = 0.3  # weight of the latest row in the measured seconds per row (a moving average)
PG_ROWS_IN_FLIGHT = 9  # rows a process works at once on PostgreSQL: (pool 10 + overflow 10) / 2, less one


def backoff_s(attempts: int, retry_after_s: float | None = None, *, cap_s: float = 900.0) -> float:
    """Seconds before the next attempt: the vendor's ``Retry-After`` as given, else 5·2ⁿ⁻¹ capped at ``cap_s``."""
    if retry_after_s is not None:
        return retry_after_s
    return float(min(cap_s, 5 * 2 ** min(max(0, attempts - 1), 32)))


HAND_OFF_MAX = 10  # hints of one delivery handed to one idle worker at most (a worker's batch)


@dataclass(kw_only=True)
class _FollowUp:
    """An effect a worker queued already claimed, to execute next (see :class:`_Work`).

    ``prefetched`` holds what the queuing transaction already read for it: the deal's
    standing for a write-back.
    """

    row: EffectRow
    prefetched: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class _Work:
    """The row a worker is working on, found by the engine's transactions through :data:`_working`.

    Three things save a transaction each (BENCHMARKS.md, "Transactions per deal"):

    * the work's last transaction may settle the row itself (:meth:`Engine._settle_in`),
      fenced as :meth:`~syncd.store.db.Store.finish` is; ``settled`` is then set;
    * in a worker's loop (``chains``; :meth:`Engine.process_events`, ``execute_effects``
      and ``drain`` keep the steps apart), an effect the work queues due now is queued
      already claimed by this worker (:meth:`~syncd.store.db.Store.add_claimed_effect`)
      and executed right after this row (``followups``), instead of being claimed in a
      transaction of its own;
      it joins ``followups`` only once the transaction that queued it commits
      (``staged`` until then, dropped on a rollback);
    * a row done without a transaction of its own is settled in the worker's next
      claim (:meth:`~syncd.store.db.Store.claim_work`).
    """

    model: Any
    row: Any
    chains: bool = False  # a worker's loop runs it: effects due now are queued claimed, run next
    settled: bool = False
    depth: int = 0  # engine transactions open (Engine._transaction)
    staged: list[_FollowUp] = field(default_factory=list)
    followups: list[_FollowUp] = field(default_factory=list)
    prefetched: dict[str, Any] = field(default_factory=dict)


_working: ContextVar[_Work | None] = ContextVar("syncd_working", default=None)


class Engine:
    """Claims and processes inbox events and outbox effects for one :class:`Runtime`.

    Args:
        runtime: the process's runtime.
        stop: set when the process stops: workers claim nothing more (the daemon's).
    """

    def __init__(self, runtime: Runtime, *, stop: asyncio.Event | None = None) -> None:
        self.rt = runtime
        self.store = runtime.store
        self.stop = stop or asyncio.Event()
        self._idle: deque[asyncio.Future[list[EventRow]]] = deque()
        self._pending = False
        self._handed: deque[EventRow] = deque()
        self._lock_dates: dict[str, tuple[datetime, date | None]] = {}
        self._lock_dates_read: dict[str, asyncio.Lock] = {}
        self.collections = collection.Collections(runtime, self.notify)
        self._row_s: dict[str, float] = {}  # measured seconds per row, by source (event, effect)
        self._workers = 0
        self._poller: asyncio.Task[None] | None = None
        self._last_claim = 0.0
        daemon = runtime.config.daemon
        self.batcher = Batcher(
            max_size=daemon.batch_max,
            wait_s=daemon.batch_wait_ms / 1000,
            renew_all=self._renew_leases,
            on_sent=runtime.metrics.batch_sent,
        )
        # rows of one claim worked at once (batching); on PostgreSQL a row may hold two pooled
        # connections (a customer lock and a transaction), so fewer than half the pool's
        self._in_flight = batching.Slots(PG_ROWS_IN_FLIGHT if self.store.is_postgres else daemon.batch_max)

    def notify(self) -> None:
        """Wake one idle worker (new events or effects were stored).

        Waking every idle worker for each row cost an empty claim per worker (BENCHMARKS.md);
        a woken worker keeps claiming while there is work, and each further notify wakes
        one more. With no worker idle, the next one to go idle finds ``_pending`` and
        claims again at once.
        """
        waiter = self._idle_waiter()
        if waiter is not None:
            waiter.set_result([])
            return
        self._pending = True

    def _idle_waiter(self) -> asyncio.Future[list[EventRow]] | None:
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                return waiter
        return None

    async def store_events(self, hints: Sequence[ChangeHint], *, now: datetime) -> int:
        """Store change hints from a webhook or a poll; an idle worker gets them already claimed.

        With a worker waiting, the hints are stored claimed by it
        (:meth:`~syncd.store.db.Store.add_claimed_events`) and handed over: storing and
        claiming are one transaction. Otherwise they are stored pending and a worker is
        woken (:meth:`notify`). Nothing is acknowledged before this returns, either way.

        Returns:
            how many hints were new.
        """
        waiter = self._idle_waiter() if len(hints) <= HAND_OFF_MAX else None
        if waiter is None:
            new = await self.store.add_events(hints, now=now)
            if new:
                self.notify()
            return new
        try:
            rows = await self.store.add_claimed_events(
                hints, owner=self.rt.owner, lease_s=self.rt.config.daemon.lease_s, now=now
            )
        except BaseException:
            self._idle.appendleft(waiter)
            raise
        if not rows:  # all seen before: the worker waits on
            self._idle.appendleft(waiter)
        elif not waiter.done():
            self._last_claim = time.monotonic()
            waiter.set_result(rows)
        else:  # the worker stopped waiting meanwhile: the next worker to look takes them
            self._handed.extend(rows)
            self.notify()
        return len(rows)

    # -- workers --------------------------------------------------------------------------

    async def run_worker(self, stop: asyncio.Event | None = None, *, batch: int = 10, idle_s: float = 1.0) -> None:
        """Process events and effects until the engine's ``stop`` is set.

        Once it is set the worker claims nothing more, finishes the vendor call in flight and
        hands the rest of its claimed batch back (:meth:`_work_rows`). ``batch`` is the most
        rows one claim takes of each kind; fewer when they would not fit in the lease
        (:meth:`claim_size`).

        Each round settles the rows the previous one finished and claims the next
        events and effects in one transaction (:meth:`~syncd.store.db.Store.claim_work`).
        A worker that finds nothing waits for :meth:`notify` or for hints handed to it
        (:meth:`store_events`); one look every ``idle_s`` without any claim, by one
        worker, finds retries that came due and leases that ran out.
        """
        stop = stop or self.stop
        self._workers += 1
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll_while_idle(idle_s))
        later: list[Settle] = []
        handed: list[EventRow] = []
        try:
            while not stop.is_set():
                try:
                    done = await self._round(batch, handed, later)
                except Exception:  # the database is away, or a bug: keep the worker alive
                    log.exception("worker_error")
                    done = 0
                handed = []
                if done == 0:
                    handed = await self._idle_until_notified(stop)
            if later:
                for lost in await self.store.settle(later):
                    self._log_lost("settle", lost, "claimed again before its settling; not settled")
        finally:
            self._workers -= 1
            if self._workers == 0 and self._poller is not None:
                self._poller.cancel()

    async def _round(self, batch: int, handed: list[EventRow], later: list[Settle]) -> int:
        """Work what was handed over, else claim (settling ``later`` in the same transaction); how many rows."""
        events: list[EventRow] = handed or [self._handed.popleft() for _ in range(min(batch, len(self._handed)))]
        effects: list[EffectRow] = []
        if not events:
            if self.stop.is_set():
                return 0
            # Rows worked together: a claim as large as a batch, but no larger than the rows
            # this process works at once (on PostgreSQL nine): the rest would wait unrenewed.
            together = 1
            if self.batcher.enabled:
                together = batch = min(self.batcher.max_size, self._in_flight.size)
            limits = (
                self.claim_size("event", batch, together=together),
                self.claim_size("effect", batch, together=together),
            )
            claimed = await self.store.claim_work(
                owner=self.rt.owner,
                limits=limits,
                lease_s=self.rt.config.daemon.lease_s,
                now=self.rt.clock(),
                settle=later,
            )
            later.clear()
            self._last_claim = time.monotonic()
            for lost in claimed.fenced:
                self._log_lost("settle", lost, "claimed again before its settling; not settled")
            events, effects = claimed.events, claimed.effects
            if len(events) == limits[0] or len(effects) == limits[1]:
                self.notify()  # there may be more: one more worker looks
        if self.batcher.enabled and len(events) + len(effects) > 1:
            await self._work_together(events, effects, later)
        else:
            await self._work_rows(EventRow, "event", self._route_event, events, later)
            if self.stop.is_set():
                await self._release(EffectRow, "effect", effects, uncount=True)
            else:
                await self._work_rows(EffectRow, "effect", self._execute, effects, later)
        return len(events) + len(effects)

    async def _work_together(self, events: list[EventRow], effects: list[EffectRow], later: list[Settle]) -> None:
        """Work a claim's rows at once, each in a task of its own, so their vendor calls share requests.

        Each row is settled as :meth:`_work_rows` would (fenced on its own claim); the
        :class:`~syncd.engine.batching.Batcher` gathers their calls. A row not started when
        the process stops is handed back uncounted; on cancellation (the grace ran out) a
        started row goes back counted (it may have reached the vendor), as in
        :meth:`_work_rows`.
        """
        jobs: list[tuple[Any, str, Callable[[Any], Awaitable[bool]], Any]] = [
            (EventRow, "event", self._route_event, row) for row in events
        ]
        jobs += [(EffectRow, "effect", self._execute, row) for row in effects]
        started = time.monotonic()
        # The claim's rows start together: as many as the process's bound allows take their
        # slots at once (Slots). Their vendor calls wait for each other (a Cohort), but not for
        # rows that cannot get a slot until a batched call goes (_rows_blocked).
        first = min(len(jobs), self._in_flight.size)
        cohort = batching.Cohort(first, queued=len(jobs) - first, blocked=self._rows_blocked)
        await self._in_flight.take(first)
        began: set[int] = set()

        async def one(index: int, model: Any, source: str, work: Callable[[Any], Awaitable[bool]], row: Any) -> None:
            began.add(index)
            if index >= first:
                await self._in_flight.take(1)
            try:
                with self.batcher.member(cohort, admitted=index < first):
                    if self.stop.is_set():
                        await self._release(model, source, [row], uncount=True)
                        return
                    try:
                        await self._settle(model, row, source, work, later, measure=False)
                    except asyncio.CancelledError:
                        await asyncio.shield(self._release(model, source, [row], uncount=False))
                        raise
            finally:
                self._in_flight.give(1)

        tasks = [asyncio.create_task(one(index, *job)) for index, job in enumerate(jobs)]
        try:
            # a row's own failure is settled in it (_settle); one that escapes (the database away)
            # does not cut its siblings short: each finishes, then the first is raised to the worker
            results = await asyncio.gather(*tasks, return_exceptions=True)
        except asyncio.CancelledError:  # the worker itself (the grace ran out): every row stops
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:  # a task cancelled before it ran never gave back the slot taken for it
            self._in_flight.give(len([index for index in range(first) if index not in began]))
        for result in results:
            if isinstance(result, BaseException):
                raise result
        per_row_s = (time.monotonic() - started) / len(jobs)
        for source in {job[1] for job in jobs}:
            self._measured(source, per_row_s)

    def _rows_blocked(self) -> bool:
        """Whether a row waiting for a slot of :attr:`_in_flight` cannot get one until some batched call goes."""
        return self._in_flight.full and self.batcher.running == 0 and not self.batcher.busy

    def claim_size(self, source: str, limit: int, *, together: int = 1) -> int:
        """How many rows one claim takes: at most ``limit``, and only what fits in the lease.

        A batch must be finishable within the lease (half of it, :data:`LEASE_SHARE`),
        at the slower of the pace measured for this kind of row and the pace the
        vendors' rate limits allow (:data:`CALLS_PER_ROW` calls at the slowest
        connection's sustained rate). At least one row: a row longer than the lease
        is kept by renewing its lease while it runs. Rows worked together
        (:meth:`_work_together`, ``together`` = the batch size) share their calls where
        the connector batches, so there a row costs a ``together``-th of a call
        (:meth:`Runtime.call_interval_s`); rows worked one after another
        (:meth:`execute_effects`) or a connector without batch calls keep the full pace.
        """
        interval = self.rt.call_interval_s(batch=together)
        per_row_s = max(self._row_s.get(source, 0.0), CALLS_PER_ROW * interval)
        if per_row_s <= 0:
            return limit
        return max(1, min(limit, int(self.rt.config.daemon.lease_s * LEASE_SHARE / per_row_s)))

    def _measured(self, source: str, seconds: float) -> None:
        known = self._row_s.get(source)
        self._row_s[source] = seconds if known is None else (1 - PACE_WEIGHT) * known + PACE_WEIGHT * seconds

    async def _poll_while_idle(self, idle_s: float) -> None:
        """Wake one idle worker when nothing was claimed for ``idle_s``: due retries and run-out leases need a look."""
        while True:
            await asyncio.sleep(max(0.05, self._last_claim + idle_s - time.monotonic()))
            if time.monotonic() - self._last_claim >= idle_s:
                self._last_claim = time.monotonic()
                self.notify()

    async def _idle_until_notified(self, stop: asyncio.Event) -> list[EventRow]:
        """Sleep until :meth:`notify`, hints handed over (returned), or ``stop``."""
        if self._pending:
            self._pending = False
            return []
        waiter: asyncio.Future[list[EventRow]] = asyncio.get_running_loop().create_future()
        self._idle.append(waiter)
        stopping: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        await asyncio.wait([waiter, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if waiter.done():
            return waiter.result()
        waiter.cancel()
        return []

    async def work_round(self, batch: int = 100) -> int:
        """One round of a worker's loop (claim events and effects, work them as a worker does); rows claimed.

        With batching on, the claimed rows are worked at once and their vendor calls share
        requests, as in :meth:`run_worker`; tests drive batches through this.
        """
        later: list[Settle] = []
        claimed = await self._round(batch, [], later)
        if later:
            for lost in await self.store.settle(later):
                self._log_lost("settle", lost, "claimed again before its settling; not settled")
        return claimed

    async def drain(self, *, rounds: int = 50) -> None:
        """Process until nothing is due (tests and the demo use this instead of sleeping)."""
        for _ in range(rounds):
            if await self.process_events(100) + await self.execute_effects(100) == 0:
                return

    # -- inbox ----------------------------------------------------------------------------

    async def process_events(self, limit: int) -> int:
        """Claim and process up to ``limit`` due events; how many were claimed."""
        return await self._work(EventRow, "event", self._route_event, limit)

    async def _work(self, model: Any, source: str, work: Callable[[Any], Awaitable[bool]], limit: int) -> int:
        """Claim a batch (:meth:`claim_size`) and settle each row; how many were claimed.

        Once the engine stops, the rows not yet started are handed back uncounted
        (:meth:`~syncd.store.db.Store.release`). If the worker is cancelled (the shutdown
        grace ran out), the row in flight is handed back with its attempt counted (it
        may have reached the vendor: the next attempt looks up before creating) and
        the rest uncounted.
        """
        if self.stop.is_set():
            return 0
        daemon = self.rt.config.daemon
        rows = await self.store.claim(
            model,
            owner=self.rt.owner,
            limit=self.claim_size(source, limit),
            lease_s=daemon.lease_s,
            now=self.rt.clock(),
        )
        await self._work_rows(model, source, work, rows)
        return len(rows)

    async def _work_rows(
        self,
        model: Any,
        source: str,
        work: Callable[[Any], Awaitable[bool]],
        rows: Sequence[Any],
        later: list[Settle] | None = None,
        prefetched: Sequence[dict[str, Any]] = (),
    ) -> None:
        """Settle each claimed row in turn (:meth:`_settle`); on stop or cancellation hand the rest back."""
        for index, row in enumerate(rows):
            if self.stop.is_set():
                await self._release(model, source, list(rows[index:]), uncount=True)
                break
            try:
                await self._settle(model, row, source, work, later, prefetched[index] if prefetched else None)
            except asyncio.CancelledError:
                await self._release(model, source, [row], uncount=False)
                await self._release(model, source, list(rows[index + 1 :]), uncount=True)
                raise

    async def _release(self, model: Any, source: str, rows: list[Any], *, uncount: bool) -> None:
        if not rows:
            return
        error = None if uncount else "interrupted at shutdown"
        released = await self.store.release(model, rows, uncount=uncount, error=error)
        log.info(
            "claims_released" if uncount else "work_interrupted",
            source=source,
            ids=[row.id for row in rows],
            released=released,
        )

    async def _route_event(self, row: EventRow) -> bool:
        handled = False
        if row.object_type == "deal":
            handled = await self._route_deal(row)
        for pipeline in self.rt.pipelines:
            if row.object_type in ("invoice", "credit_note") and pipeline.invoicing_name == row.connection:
                await self.refresh_invoice(pipeline, row.object_id)
                handled = True
            elif row.object_type == "contact" and pipeline.invoicing_name == row.connection and not handled:
                await self.refresh_customer(pipeline, row.object_id)
                handled = True
            elif row.object_type == "time_entry" and pipeline.time_tracking_name == row.connection:
                await self.process_time_entry(pipeline, row)
                handled = True
        if not handled:
            log.debug("event_ignored", connection=row.connection, object_type=row.object_type, object_id=row.object_id)
        return False

    async def _route_deal(self, row: EventRow) -> bool:
        """Read a deal once and hand it to the one pipeline that takes it.

        A won deal that no pipeline takes is a recorded skip (``no_pipeline``); a deal
        that two pipelines take is refused (dead-lettered) naming both filters, since
        invoicing it twice or picking one silently would both be wrong.
        """
        candidates = [p for p in self.rt.pipelines if p.crm_name == row.connection]
        if not candidates:
            return False
        if row.version is not None:
            seen = await self.store.get(SourceRecordRow, row.connection, "deal", row.object_id)
            if seen is not None and seen.version == row.version:
                log.debug("deal_version_already_read", connection=row.connection, deal_id=row.object_id)
                return True
        wanted: dict[str, set[str]] = {}
        for pipeline in candidates:
            for object_type, names in pipeline.mapping.source_properties.items():
                wanted.setdefault(object_type, set()).update(names)
        try:
            record = await self._fetch_deal(candidates[0], row.object_id, {k: sorted(v) for k, v in wanted.items()})
        except NotFound:
            log.info("deal_gone", connection=row.connection, deal_id=row.object_id)
            return True
        chosen = selectors.choose([p.mapping for p in candidates], record)
        if chosen is not None:
            pipeline = next(p for p in candidates if p.mapping is chosen)
            await self.process_deal(pipeline, row.object_id, record=record, settle=True)
            return True
        async with self._transaction() as conn:
            await self._remember(record, self.rt.clock(), conn)
            if any(self._won_in(p, record) for p in candidates):
                await self.record_outcome(
                    conn=conn,
                    key=f"skip:no_pipeline:{record.connection}:{record.object_id}:{record.version}",
                    kind="skip",
                    reason="no_pipeline",
                    detail=f"won deal {record.object_id} is outside every pipeline's `when` filter",
                    place=", ".join(p.mapping.rules.when_place for p in candidates),
                    connection=record.connection,
                    object_type="deal",
                    object_id=record.object_id,
                    trigger_at=record.stage_changed_at or record.modified_at,
                )
            await self._settle_in(conn)
        return True

    def _won_in(self, pipeline: Pipeline, record: SourceRecord) -> bool:
        try:
            return pipeline.mapping.won_at(record, defaults=self.rt.defaults) is not None
        except MappingError:
            return False

    async def process_deal(
        self, pipeline: Pipeline, deal_id: str, *, record: SourceRecord | None = None, settle: bool = False
    ) -> str | None:
        """Re-read a deal, map it, and queue its invoice if a billing event is due.

        The engagement is stored with the history the source does not keep (amount
        changes, when a cancellation was first seen: :func:`syncd.engine.recurring.keep_history`),
        then every billing event due for it is queued (:func:`syncd.engine.recurring.bill_engagement`):
        ``deal_won`` as before, and the periods, changes, milestones and hours of the
        other engagement types. A won one-time deal whose move into the won stage was
        recorded before ``billing_start`` is a recorded skip.

        It is one transaction after the read (the deal as read, the client, the
        engagement, the billing events and their effects, and the event being worked
        on, settled: :meth:`_settle_in`) when billing needs no further vendor read;
        a pipeline with a time tracker reads it after that transaction, and queues
        what is due in transactions of its own.

        Args:
            pipeline: the pipeline that takes the deal.
            deal_id: the CRM deal id.
            record: the deal as just read (read here when ``None``).
            settle: settle the event being worked on in the same transaction (the
                caller has nothing left to do for it).

        Returns:
            the billing event key queued (``deal_won`` first), or ``None``.

        Raises:
            MappingError: the deal does not fit the mapping (dead-lettered by the caller).
        """
        now = self.rt.clock()
        if record is None:
            try:
                record = await self._fetch_deal(pipeline, deal_id, pipeline.mapping.source_properties)
            except NotFound:
                log.info("deal_gone", connection=pipeline.crm_name, deal_id=deal_id)
                return None
            if not pipeline.mapping.selects(record):
                await self._remember(record, now)
                return None
        try:
            mapped = pipeline.mapping.map_deal(record, defaults=self.rt.defaults)
        except SyncdError:
            await self._remember(record, now)  # previews compare mappings over the deals as read
            raise
        current = mapped.engagement
        if current.won_at is not None:
            current = current.model_copy(update={"won_recorded_at": record.stage_changed_at})
        reads_tracker = pipeline.time_tracker is not None
        keys: list[str] = []
        async with self._transaction() as conn:
            # Two events of one deal on two workers would each read the engagement and
            # write back their own history, the second losing the first's amount change:
            # the second waits here until the first commits, then reads what it wrote.
            await self.store.lock_for_transaction(conn, f"deal:{pipeline.crm_name}:{deal_id}")
            await self._remember(record, now, conn)
            await self._save_client(conn, mapped.client, now, pipeline=pipeline, engagement=current)
            previous = await self.store.get(EngagementRow, current.key, conn=conn)
            engagement = recurring.keep_history(
                Engagement.model_validate(previous.data) if previous is not None else None,
                current,
                recorded_at=record.modified_at,
                timezone=mapped.client.timezone,
            )
            await self.store.upsert(EngagementRow, _engagement_values(engagement, pipeline, deal_id, now), conn)
            await self._check_divergence(pipeline, current, record, conn)
            event = billing.deal_won_event(
                current, billing_start=self.rt.billing_start, timezone=mapped.client.timezone
            )
            won = None
            if event is not None:
                won = await self.queue_invoice(pipeline, event, current, mapped.client, deal_id, conn=conn)
            elif current.won_at is not None and current.type is EngagementType.ONE_TIME and current.bill_on == "won":
                await self._skip_before_start(current, record, conn)
            if not reads_tracker:
                keys = await recurring.bill_engagement(self, pipeline, engagement, mapped.client, deal_id, conn=conn)
                if settle:
                    await self._settle_in(conn)
        if reads_tracker:
            keys = await recurring.bill_engagement(self, pipeline, engagement, mapped.client, deal_id)
        return won or (keys[0] if keys else None)

    async def _skip_before_start(self, engagement: Engagement, record: SourceRecord, conn: Connection) -> None:
        won = engagement.won_recorded_at or engagement.won_at
        await self.record_outcome(
            conn=conn,
            key=f"skip:before_billing_start:{engagement.key}",
            kind="skip",
            reason="before_billing_start",
            detail=f"won at {won.isoformat() if won else '?'}, before billing_start "
            f"{self.rt.billing_start.isoformat()}: billed by other means",
            connection=record.connection,
            object_type="deal",
            object_id=record.object_id,
            engagement_key=engagement.key,
            client_key=engagement.client_key,
            trigger_at=won,
        )

    async def record_outcome(
        self, *, key: str, kind: str, reason: str, detail: str, conn: Any = None, **ctx: Any
    ) -> bool:
        """Record a skip, a simulated event or an outcome that needs attention, once per ``key``.

        Every trigger that ends without an invoice ends here or as a dead letter, so
        an admin can list it (``syncd outcomes``), with its reason.

        Returns:
            whether it was new.
        """
        new = await self.store.add_outcome(
            conn, key=key, kind=kind, reason=reason, detail=detail, created_at=self.rt.clock(), **ctx
        )
        if new:
            emit = log.warning if kind == "attention" else log.info
            emit("outcome_recorded", kind=kind, reason=reason, detail=detail, **{k: v for k, v in ctx.items() if v})
        return new

    async def process_time_entry(self, pipeline: Pipeline, row: EventRow) -> None:
        """Read a time tracker's new hours on a hint, and queue what they make due.

        The first hint of a batch reads every entry changed since the last read
        (:func:`syncd.engine.hours.sync_entries`); a hint whose entry version is already stored
        reads nothing more. The pipeline's hourly engagements billing the projects
        concerned are then billed (cap steps, periods: :func:`syncd.engine.recurring.bill_projects`;
        only what is due and not yet recorded).
        """
        tracker, connection = pipeline.time_tracker, pipeline.time_tracking_name
        if tracker is None or connection is None:
            return
        known = await hours.stored_project(self.store, connection, row.object_id, row.occurred_at)
        projects = {known} if known is not None else await hours.sync_entries(self.rt, connection, tracker)
        if await recurring.bill_projects(self, pipeline, projects):
            return
        project = known or await hours.stored_project(self.store, connection, row.object_id, row.occurred_at)
        linked = await hours.linked_engagements(self.store, pipeline, [project] if project else [])
        engagement = linked.get(project or "")
        if engagement is None or engagement.cap_hours is None or engagement.won_at is None or project is None:
            return
        tracked = await hours.project_hours(self.store, connection, project)
        logged = sum((e.hours for e in tracked.entries if e.billable), Decimal(0))
        if logged > engagement.cap_hours and engagement.over_cap == "hold":
            await self.record_outcome(
                key=f"attention:over_cap:{connection}:{row.event_id}",
                kind="attention",
                reason="hours_over_cap",
                detail=f"time entry {row.object_id} of {engagement.name}: {logged} billable hours logged, over the "
                f"cap of {engagement.cap_hours} h; held: raise the cap, or `syncd hours release ENTRY_ID`",
                connection=connection,
                object_type="time_entry",
                object_id=row.object_id,
                engagement_key=engagement.key,
                client_key=engagement.client_key,
                trigger_at=row.occurred_at,
            )
        else:
            await self.record_outcome(
                key=f"skip:under_cap:{connection}:{row.event_id}",
                kind="skip",
                reason="under_cap",
                detail=f"time entry {row.object_id} of {engagement.name}: {logged} of {engagement.cap_hours} h, "
                "no cap step reached yet; billed at the next cap step or at the period's end",
                connection=connection,
                object_type="time_entry",
                object_id=row.object_id,
                engagement_key=engagement.key,
                client_key=engagement.client_key,
                trigger_at=row.occurred_at,
            )

    async def record_event(self, event: BillingEvent, client_key: str, *, conn: Connection | None = None) -> str | None:
        """Record a billing event that has nothing to invoice (an hourly period without hours).

        Recording it keeps it from being computed again; hours logged late for that
        period are billed by the next period or cap step.

        Returns:
            the event key if it was new, else ``None``.
        """
        row = self._event_row(event, live=self.rt.pilot_allows(client_key))
        async with self._transaction(conn) as conn:
            if not await self.store.add_billing_event(conn, row):
                return None
            await self.record_outcome(
                conn=conn,
                key=f"skip:nothing_to_bill:{event.key}",
                kind="skip",
                reason="nothing_to_bill",
                detail=f"{event.kind} {event.occurrence}: no billable hours to invoice",
                engagement_key=event.engagement_key,
                client_key=client_key,
                billing_event_key=event.key,
                trigger_at=event.occurred_at,
            )
        log.info("billing_event_settled", key=event.key, kind=str(event.kind), engagement=event.engagement_key)
        return str(event.key)

    async def surface_credit(
        self, pipeline: Pipeline, credit: billing.ManualCredit, *, conn: Connection | None = None
    ) -> str | None:
        """Record a credit the invoicing tool cannot issue, as a dead letter a person acts on.

        The billing event and the dead letter (source ``manual_credit``, its reason the
        credit to issue by hand) are written in one transaction; for a client outside the
        pilot the dead letter has status ``simulated`` (``syncd backfill`` opens it).

        Returns:
            the event key if it was new, else ``None``.
        """
        live = self.rt.pilot_allows(credit.client_key)
        now = self.rt.clock()
        event = credit.event
        letter = {
            "source": "manual_credit",
            "ref": event.key,
            "connection": pipeline.invoicing_name,
            "reason": credit.message(),
            "place": f"engagement {event.engagement_key}: {event.kind}:{event.occurrence}",
            "payload": {
                "key": event.key,
                "client": credit.client_key,
                "currency": credit.currency,
                "total": decimal_text(credit.total()),
                "lines": [line.model_dump(mode="json") for line in credit.lines],
            },
            "status": "open" if live else "simulated",
            "created_at": now,
        }
        async with self._transaction(conn) as conn:
            if not await self.store.add_billing_event(conn, self._event_row(event, live=live)):
                return None
            await self.store.add_dead_letter(conn, letter)
            if not live:
                await self._record_simulated(conn, event, credit.client_key)
        log.warning("manual_credit_owed", key=event.key, live=live, detail=credit.message())
        return str(event.key)

    async def _record_simulated(self, conn: Connection, event: BillingEvent, client_key: str) -> None:
        await self.record_outcome(
            conn=conn,
            key=f"simulated:{event.key}",
            kind="simulated",
            reason="not_in_pilot",
            detail=f"{event.kind} {event.occurrence}: client {client_key} is not in [pilot] clients; "
            "recorded, nothing sent (syncd backfill makes it real)",
            engagement_key=event.engagement_key,
            client_key=client_key,
            billing_event_key=event.key,
            trigger_at=event.occurred_at,
        )

    def _event_row(self, event: BillingEvent, *, live: bool) -> BillingEventRow:
        return BillingEventRow(
            key=event.key,
            kind=str(event.kind),
            engagement_key=event.engagement_key,
            occurrence=event.occurrence,
            occurred_at=event.occurred_at,
            created_at=self.rt.clock(),
            simulated=not live,
        )

    async def queue_invoice(
        self,
        pipeline: Pipeline,
        event: BillingEvent,
        engagement: Engagement,
        client: Client,
        crm_object_id: str,
        *,
        conn: Connection | None = None,
    ) -> str | None:
        """Draft the invoice for ``event`` (:func:`syncd.core.billing.draft_for_event`) and queue it.

        Returns:
            the event key if it was new, else ``None`` (already recorded: nothing queued).

        Raises:
            ValidationFailed: the draft cannot be valid (pre-flight: nothing was queued).
        """
        options = pipeline.mapping.invoice
        draft = billing.draft_for_event(
            event,
            engagement,
            client,
            issue_date=billing.issue_date_for(self.rt.clock(), client.timezone),
            status=options.status,
            send=options.send,
            line_amount_types=options.line_amount_types,
        )
        return await self.queue_draft(pipeline, event, draft, crm_object_id, conn=conn)

    async def queue_draft(
        self,
        pipeline: Pipeline,
        event: BillingEvent,
        draft: InvoiceDraft,
        crm_object_id: str,
        *,
        on_recorded: Callable[[Connection], Awaitable[None]] | None = None,
        conn: Connection | None = None,
    ) -> str | None:
        """Record a billing event and, in the same transaction, queue the effect creating ``draft``.

        For drafts built elsewhere (hours, credit notes). In pilot mode a client outside
        the pilot gets its event recorded as simulated and its effect parked, so the
        period is never invoiced after the fact unless an admin backfills it.

        Args:
            pipeline: the pipeline the event belongs to.
            event: the billing event; its key is the draft's key.
            draft: the invoice or credit note to create.
            crm_object_id: the CRM record (deal) the status is written back to.
            on_recorded: runs in the same transaction once the event is new (e.g. to
                mark time entries as invoiced by this key).
            conn: the caller's transaction, else one of its own.

        Returns:
            the event key if it was new, else ``None`` (already recorded: nothing queued).
        """
        draft = recurring.ledger_ready(self.rt, pipeline, draft)
        if pipeline.mapping.invoice.require_po and not draft.reference and draft.kind is DraftKind.INVOICE:
            await self._hold_for_po(pipeline, event, draft, crm_object_id, conn)
            return None
        now = self.rt.clock()
        live = self.rt.pilot_allows(draft.client.key)
        row = BillingEventRow(
            key=event.key,
            kind=str(event.kind),
            engagement_key=event.engagement_key,
            occurrence=event.occurrence,
            occurred_at=event.occurred_at,
            created_at=now,
            simulated=not live,
        )
        payload: dict[str, Any] = {
            "draft": draft.model_dump(mode="json"),
            "crm": pipeline.crm_name,
            "crm_object_id": crm_object_id,
            "triggered_at": event.occurred_at.isoformat(),
            "pipeline": pipeline.name,
        }
        delay = pipeline.settings.invoice_delay_s if event.kind in DELAYED_KINDS else 0
        if delay:
            payload["recheck_won"] = True
        current = _working.get()
        chains = current is not None and current.chains
        async with self._transaction(conn) as tx:
            if not await self.store.add_billing_event(tx, row):
                return None
            if live and not delay:
                # this worker creates the invoice next: its customer step gets the client row as of now
                client_row = await self.store.get(ClientRow, draft.client.key, conn=tx) if chains else None
                await self._queue_effect(
                    tx,
                    key=event.key,
                    kind=CREATE_INVOICE,
                    connection=pipeline.invoicing_name,
                    payload=payload,
                    now=now,
                    client_key=draft.client.key,
                    prefetched={CLIENT: client_row} if chains else None,
                )
            else:
                await self.store.add_effect(
                    tx,
                    key=event.key,
                    kind=CREATE_INVOICE,
                    connection=pipeline.invoicing_name,
                    payload=payload,
                    now=now,
                    client_key=draft.client.key,
                    status="pending" if live else "simulated",
                    next_at=now + timedelta(seconds=delay),
                )
            if on_recorded is not None:
                await on_recorded(tx)
            if not live:
                await self._record_simulated(tx, event, draft.client.key)
            await self._resolve(tx, f"attention:missing_po:{event.key}", "the PO number arrived", now)
        log.info(
            "billing_event_recorded", key=event.key, kind=str(event.kind), engagement=event.engagement_key, live=live
        )
        self._notify_unless_claimed()
        return str(event.key)

    async def _hold_for_po(
        self, pipeline: Pipeline, event: BillingEvent, draft: InvoiceDraft, deal_id: str, conn: Connection | None
    ) -> None:
        """No invoice without the PO number the mapping requires: held, needing attention.

        Nothing is recorded for the event, so it is invoiced as soon as the deal (or the
        client) has a PO number and the deal is processed again or the hourly tick runs.
        """
        await self.record_outcome(
            conn=conn,
            key=f"attention:missing_po:{event.key}",
            kind="attention",
            reason="missing_po",
            detail=f"{event.kind} {event.occurrence} of {draft.client.legal_name}: the mapping requires a PO "
            "number ([invoice].require_po) and the deal and client have none; the invoice is held until one is set",
            place=f"{pipeline.mapping.path} [invoice].require_po",
            connection=pipeline.crm_name,
            object_type="deal",
            object_id=deal_id,
            engagement_key=event.engagement_key,
            client_key=draft.client.key,
            billing_event_key=event.key,
            trigger_at=event.occurred_at,
        )

    async def _resolve(self, conn: Connection, key: str, why: str, now: datetime) -> None:
        """Close an open outcome that the engine itself settled (e.g. a held invoice that went out)."""
        table = table_of(OutcomeRow)
        await conn.execute(
            sa.update(table)
            .where(table.c.key == key, table.c.status == "open")
            .values(status="resolved", resolved_at=now, detail=table.c.detail + f" — resolved: {why}")
        )

    async def _remember(self, record: SourceRecord, now: datetime, conn: Connection | None = None) -> None:
        await self.store.upsert(
            SourceRecordRow,
            {
                "connection": record.connection,
                "object_type": record.object_type,
                "object_id": record.object_id,
                "version": record.version,
                "data": dict(record.data),
                "fetched_at": now,
            },
            conn,
        )

    async def _save_client(
        self,
        conn: Any,
        client: Client,
        now: datetime,
        *,
        pipeline: Pipeline | None = None,
        engagement: Engagement | None = None,
    ) -> None:
        """Store the client as the CRM maps it, and settle what the CRM holds against the client record.

        The CRM's values (and the deal's hourly rate) are observed (:mod:`syncd.engine.clients`):
        a change at the CRM of a field it owns is in force at once (and reaches the ledger
        before the next invoice); a change of a field it does not own is a conflict.
        """
        existing = await self.store.get(ClientRow, client.key, conn=conn)
        ids = dict(existing.external_ids) if existing is not None else {}
        ids.update(client.external_ids)
        values = {
            "key": client.key,
            "legal_name": client.legal_name,
            "data": client.model_dump(mode="json", exclude={"external_ids"}),
            "external_ids": ids,
            "updated_at": now,
        }
        await self.store.upsert(ClientRow, values, conn)
        if pipeline is None:
            return
        if self.store.is_postgres:  # another replica may have changed the row since it was read: read it locked
            row = await clients.locked_row(self.store, conn, client.key)
        else:  # SQLite's one writer: the row is what was read, with what was just written
            kept = {name: getattr(existing, name) for name in ("pushed", "record", "seen")} if existing else {}
            row = ClientRow.model_validate({**kept, **values})
        if row is None:
            return
        settled = await clients.record_observation(
            self.store,
            conn,
            row,
            system=pipeline.crm_name,
            role="crm",
            observed=clients.crm_view(client, engagement),
            owners=self.rt.config.settings.clients,
            owner_systems={"crm": pipeline.crm_name, "ledger": pipeline.invoicing_name},
            now=now,
        )
        name = settled.record.get("legal_name")
        if isinstance(name, str) and name != client.legal_name:
            await conn.execute(
                sa.update(table_of(ClientRow)).where(table_of(ClientRow).c.key == client.key).values(legal_name=name)
            )

    async def _check_divergence(
        self, pipeline: Pipeline, engagement: Engagement, record: SourceRecord, conn: Connection
    ) -> None:
        """A deal edited, reopened or lost after it was invoiced: record it, never re-invoice or void.

        Only invoices of the deal's own lines (won or accepted deliverables) are compared;
        period, milestone and hours invoices bill other amounts by design.
        """
        line_kinds = [str(BillingEventKind.DEAL_WON), str(BillingEventKind.DELIVERABLE_ACCEPTED)]
        billed_lines = sa.select(col(BillingEventRow.key)).where(col(BillingEventRow.kind).in_(line_kinds))
        invoices = await self.store.select(
            InvoiceRow,
            col(InvoiceRow.engagement_key) == engagement.key,
            col(InvoiceRow.kind) == "invoice",
            col(InvoiceRow.key).in_(billed_lines),
            conn=conn,
        )
        for invoice in invoices:
            notes = []
            if engagement.won_at is None:
                notes.append("deal is no longer won")
            subtotal = sum((line.amount(engagement.currency) for line in engagement.lines), Decimal(0))
            if invoice.subtotal is not None and engagement.lines and subtotal != Decimal(invoice.subtotal):
                notes.append(f"deal lines now total {subtotal} {engagement.currency}, invoiced {invoice.subtotal}")
            divergence = "; ".join(notes) or None
            if engagement.won_at is None:
                await self._on_unwon(pipeline, invoice, conn)
            if divergence != invoice.divergence:
                await self.store.update(
                    InvoiceRow, [col(InvoiceRow.key) == invoice.key], {"divergence": divergence}, conn=conn
                )
                if divergence:
                    log.warning(
                        "invoice_divergence",
                        invoice=invoice.number,
                        engagement=engagement.key,
                        version=record.version,
                        divergence=divergence,
                    )

    async def _on_unwon(self, pipeline: Pipeline, invoice: InvoiceRow, conn: Connection) -> None:
        """An invoiced deal left the won stage: needs attention, or a void (``on_unwon``)."""
        if invoice.state == str(InvoiceState.VOIDED):
            return
        if pipeline.settings.on_unwon != "void":
            await self._unwon_attention(invoice, conn=conn)
            return
        await self._queue_effect(
            conn,
            key=f"void:{invoice.key}",
            kind=VOID_INVOICE,
            connection=invoice.invoicing_connection,
            payload={"invoice_key": invoice.key},
            now=self.rt.clock(),
            client_key=invoice.client_key,
        )
        self._notify_unless_claimed()

    async def refresh_invoice(self, pipeline: Pipeline, invoice_id: str) -> None:
        """Re-read an invoice syncd created and queue a write-back if its status changed.

        One syncd did not create is read only with ``[collections] track_ledger_documents``
        (:meth:`syncd.engine.collection.Collections.track_ledger_document`).
        """
        rows = await self.store.select(
            InvoiceRow,
            InvoiceRow.invoice_id == invoice_id,
            InvoiceRow.invoicing_connection == pipeline.invoicing_name,
        )
        if not rows:
            await self._link_reissue(pipeline, invoice_id)
            if self.rt.config.settings.collections.track_ledger_documents:
                await self.collections.track_ledger_document(pipeline, invoice_id)
            return
        status = await pipeline.invoicing.get_invoice(invoice_id)
        await self._record_status(rows[0], status)

    async def _link_reissue(self, pipeline: Pipeline, invoice_id: str) -> None:
        """A document syncd did not create, read while one of syncd's invoices stands voided by hand.

        If it bills the voided invoice's customer it is that invoice's reissue, and the
        trail says so. It is read only while such a void waits for its reissue, so the
        documents a person makes at the ledger for other reasons cost no call.
        """
        trails = table_of(InvoiceTrailRow)
        voids = await self.store.select(
            InvoiceTrailRow, trails.c.kind == "correction", trails.c.classes == "void", order_by=trails.c.id
        )
        linked = {row.invoice_key for row in await self.store.select(InvoiceTrailRow, trails.c.kind == "reissue")}
        waiting = [
            row for row in voids if row.invoice_key not in linked and (row.detail or {}).get("customer_id") is not None
        ]
        if not waiting:
            return
        try:
            status = await pipeline.invoicing.get_invoice(invoice_id)
        except NotFound:
            return
        customer = status.document.customer_id if status.document is not None else None
        for void in waiting:
            original = await self.store.get(InvoiceRow, void.invoice_key)
            if original is None or original.invoicing_connection != pipeline.invoicing_name:
                continue
            if (void.detail or {}).get("customer_id") != customer or status.state is InvoiceState.VOIDED:
                continue
            async with self.store.begin() as conn:
                await trail.add_step(
                    conn,
                    key=f"{original.key}:reissue:{invoice_id}",
                    invoice_key=original.key,
                    kind="reissue",
                    actor="person",
                    summary=f"reissued by hand as {status.number or invoice_id} "
                    f"({decimal_text(status.total)} {status.currency}) after the hand void",
                    detail={"invoice_id": invoice_id, "number": status.number},
                    at=self.rt.clock(),
                    is_postgres=self.store.is_postgres,
                )
            log.warning("invoice_reissued_by_hand", invoice=original.number, reissue=status.number)
            return

    async def _record_status(self, row: InvoiceRow, status: InvoiceStatus) -> None:
        """Store the ledger's newer state of a document, its trail, and queue the deal's write-back.

        A state older than the one stored (by the ledger's own update time) is ignored,
        so a late or reordered read never moves the deal backwards; a newer one is
        written even when it reverses an earlier state (a payment deleted). The content
        read is compared with the copy before it: a change syncd did not make is a hand
        correction (:func:`syncd.store.trail.compare`). The first read in an approved state
        dates the invoice's issue; a paid one its paid day.
        """
        now = self.rt.clock()
        values = _status_values(status)
        if (
            status.updated_at is not None
            and row.source_updated_at is not None
            and status.updated_at < row.source_updated_at
        ):
            log.info("invoice_status_stale", invoice=row.number, seen=str(status.updated_at))
            return
        document = status.document.model_dump(mode="json") if status.document is not None else None
        changed = any(str(getattr(row, k)) != str(v) for k, v in values.items())
        if not changed and (document is None or document == row.document):
            return
        extra = await self._status_extras(row, status, now)
        version = f"{row.key}:{(status.updated_at or now).isoformat()}:{values['state']}:{values['amount_due']}"
        async with self._transaction() as conn:
            await conn.execute(
                sa.update(table_of(InvoiceRow))
                .where(table_of(InvoiceRow).c.key == row.key)
                .values(
                    **values,
                    **extra,
                    document=document or row.document,
                    source_updated_at=status.updated_at,
                    updated_at=now,
                )
            )
            await self._trail_status(conn, row, status, version, now)
            if changed:
                await self._queue_crm_status(conn, row.crm_connection, row.crm_object_id, version, now)
                await self.collections.on_document(
                    conn,
                    row,
                    before=(row.state, row.amount_due),
                    after=(values["state"], values["amount_due"]),
                    version=version.removeprefix(f"{row.key}:"),
                    last_payment=status.last_payment_date,
                    now=now,
                )
        if changed:
            self._notify_unless_claimed()
            log.info(
                "invoice_status_changed",
                invoice=row.number,
                state=values["state"],
                amount_due=values["amount_due"],
                previous=row.state,
            )

    async def _status_extras(self, row: InvoiceRow, status: InvoiceStatus, now: datetime) -> dict[str, Any]:
        """The issue time and the paid day a new state gives the invoice."""
        extra: dict[str, Any] = {}
        if row.issued_at is None and status.state not in _UNISSUED:
            extra["issued_at"] = now  # a draft approved at the ledger: issued when syncd first sees it so
        if status.state is InvoiceState.PAID:
            client = await self.store.get(ClientRow, row.client_key)
            zone = client.data.get("timezone", "UTC") if client else "UTC"
            extra["paid_on"] = row.paid_on or self._paid_on(status, zone)
        elif row.paid_on is not None:
            extra["paid_on"] = None  # a payment deleted: not paid any more
        return extra

    def _paid_on(self, status: InvoiceStatus, zone: str) -> date:
        """The ledger's fully-paid day, else the day (in the client's zone) syncd saw it paid."""
        if status.document is not None and status.document.fully_paid_on is not None:
            return status.document.fully_paid_on
        return receivables.today_in(self.rt.clock(), zone)

    async def _trail_status(
        self, conn: Connection, row: InvoiceRow, status: InvoiceStatus, version: str, now: datetime
    ) -> None:
        """The trail steps of a new read: a state change, a hand correction, a hand void."""
        state = str(status.state)
        postgres = self.store.is_postgres
        if state != row.state:
            by_syncd = state == str(InvoiceState.VOIDED) and await self._voided_by_syncd(conn, row.key)
            await trail.add_step(
                conn,
                key=f"{version}:status",
                invoice_key=row.key,
                kind="status",
                actor="syncd" if by_syncd else "ledger",
                summary=f"{row.state} → {state}; amount due {decimal_text(status.amount_due)} {status.currency}",
                at=now,
                is_postgres=postgres,
            )
            if state == str(InvoiceState.VOIDED) and not by_syncd and row.state != str(InvoiceState.VOIDED):
                await trail.add_step(
                    conn,
                    key=f"{version}:void",
                    invoice_key=row.key,
                    kind="correction",
                    actor="person",
                    summary="voided at the ledger by hand",
                    classes=("void",),
                    detail={"changes": ["voided at the ledger, not by syncd"], "customer_id": _customer_of(row)},
                    at=now,
                    is_postgres=postgres,
                )
                log.warning("invoice_corrected", invoice=row.number, classes=["void"])
        if status.document is None or row.document is None:
            return
        before = LedgerDocument.model_validate(row.document)
        own = await trail.own_credit_notes(conn, row.invoicing_connection)
        correction = trail.compare(before, status.document, own)
        if correction is None:
            return
        await trail.add_step(
            conn,
            key=f"{version}:correction:{hashlib.sha256(repr(correction).encode()).hexdigest()[:12]}",
            invoice_key=row.key,
            kind="correction",
            actor="person",
            summary=f"corrected at the ledger ({', '.join(correction.classes)}): " + "; ".join(correction.changes),
            classes=correction.classes,
            detail={"changes": list(correction.changes)},
            at=now,
            is_postgres=postgres,
        )
        log.warning("invoice_corrected", invoice=row.number, classes=list(correction.classes))

    async def _voided_by_syncd(self, conn: Connection, key: str) -> bool:
        table = table_of(EffectRow)
        found = await conn.scalar(sa.select(sa.func.count()).select_from(table).where(table.c.key == f"void:{key}"))
        return bool(found)

    async def _queue_crm_status(self, conn: Connection, crm: str, deal_id: str, version: str, now: datetime) -> bool:
        """Queue a write-back of the deal's standing, once per ``version`` of what changed.

        The effect computes the standing from every document of the deal when it runs
        (:meth:`_write_crm_status`), so an older queued write-back still writes the
        newest state. One this worker runs next (:class:`_Work`) gets the standing
        as of this transaction instead, which is the same thing one step earlier.
        The caller notifies a worker after its commit (:meth:`_notify_unless_claimed`).
        """
        key = "crm:" + hashlib.sha256(f"{crm}:{deal_id}:{version}".encode()).hexdigest()[:32]
        current = _working.get()
        claims = current is not None and current.chains
        return await self._queue_effect(
            conn,
            key=key,
            kind=WRITE_CRM_STATUS,
            connection=crm,
            payload={"crm_object_id": deal_id},
            now=now,
            prefetched={STANDING: await self.deal_standing(crm, deal_id, conn=conn)} if claims else None,
        )

    def _notify_unless_claimed(self) -> None:
        """After a commit that queued effects: wake a worker, unless a worker queued them (claimed, :class:`_Work`)."""
        current = _working.get()
        if current is None or not current.chains:
            self.notify()

    async def refresh_aging(self) -> int:
        """Queue a write-back for every deal with an unpaid invoice past due (daily: overdue days grow).

        Returns:
            how many write-backs were queued (one per deal per day at most).
        """
        now = self.rt.clock()
        open_states = [str(state) for state in receivables.OPEN_STATES]
        rows = await self.store.select(
            InvoiceRow,
            col(InvoiceRow.state).in_(open_states),
            col(InvoiceRow.due_date) < now.date(),
        )
        deals = {(row.crm_connection, row.crm_object_id) for row in rows}
        queued = 0
        for crm, deal_id in sorted(deals):
            async with self._transaction() as conn:
                queued += await self._queue_crm_status(conn, crm, deal_id, f"aging:{now.date().isoformat()}", now)
        if queued:
            self._notify_unless_claimed()
        return queued

    # -- outbox ---------------------------------------------------------------------------

    async def execute_effects(self, limit: int) -> int:
        """Claim and execute up to ``limit`` due effects; how many were claimed."""
        return await self._work(EffectRow, "effect", self._execute, limit)

    async def _execute(self, row: EffectRow) -> bool:
        """Run one effect; ``True`` when it settled its own row (in its own transaction)."""
        if row.kind == CREATE_INVOICE:
            await self._create_invoice(row)
            return True
        if row.kind == WRITE_CRM_STATUS:
            await self._write_crm_status(row)
            return False
        if row.kind == VOID_INVOICE:
            await self._void_unwon(row)
            return False
        if row.kind == ALLOCATE_CREDIT:
            await self._allocate_credit(row)
            return False
        if row.kind in collection.EFFECT_KINDS:
            await self.collections.execute(row)
            return False
        raise FatalError(f"unknown effect kind {row.kind!r}", place=f"effects.id={row.id}")

    async def _create_invoice(self, row: EffectRow) -> None:
        failpoints.hit("after_claim")
        draft = InvoiceDraft.model_validate(row.payload["draft"])
        replayed = bool(row.payload.get("redraft"))
        invoicing = self.rt.connectors[row.connection]
        # Only a retry can follow a create whose answer was lost (or a crash after it):
        # the first attempt skips the lookup, every later one looks up before creating,
        # and so does a replay (`syncd replay` counts attempts from 0 again).
        looked_up = row.attempts > 1 or replayed
        status = await self._find_invoice(row.connection, invoicing, draft) if looked_up else None
        if status is None and replayed:
            draft = await self._redraft(row, draft)
        if status is None and row.payload.get("recheck_won") and not await self._still_won(row):
            await self._skip_unwon(row, draft)
            return
        customer_id, billed = await self._customer_id(row.connection, invoicing, draft.client)
        created = status is None
        if status is None:
            draft = await self._after_lock_date(row.connection, invoicing, _billed_as(draft, billed))
            failpoints.hit("before_vendor_call")
            status = await self._create(row.connection, invoicing, draft, customer_id)
            failpoints.hit("after_vendor_2xx")
        elif draft.send and status.state is InvoiceState.AUTHORISED and isinstance(invoicing, SendsInvoices):
            # created by an earlier attempt that stopped before emailing it
            await invoicing.send_invoice(status.invoice_id, draft.key)
            status = status.model_copy(update={"state": InvoiceState.SENT})
        now = self.rt.clock()
        mismatch = _totals_mismatch(draft, status)
        triggered_at = datetime.fromisoformat(row.payload["triggered_at"])
        values = {
            "key": draft.key,
            "kind": str(draft.kind),
            "engagement_key": draft.engagement_key,
            "client_key": draft.client.key,
            "crm_connection": row.payload["crm"],
            "crm_object_id": row.payload["crm_object_id"],
            "invoicing_connection": row.connection,
            "invoice_id": status.invoice_id,
            **_status_values(status),
            "source_updated_at": status.updated_at,
            "triggered_at": triggered_at,
            "created_at": now,
            "updated_at": now,
            "totals_mismatch": mismatch,
            "issued_at": now if status.state not in _UNISSUED else None,
            "paid_on": self._paid_on(status, draft.client.timezone) if status.state is InvoiceState.PAID else None,
            "sent": trail.sent_payload(draft, customer_id),
            "document": status.document.model_dump(mode="json") if status.document is not None else None,
        }
        async with self._transaction() as conn:
            await self.store.upsert(InvoiceRow, values, conn)
            await trail.add_step(
                conn,
                key=f"{draft.key}:sent",
                invoice_key=draft.key,
                kind="sent",
                actor="syncd",
                summary=f"{'sent' if created else 'found after a lost answer'}: {status.number or status.invoice_id}, "
                f"{status.state}, {decimal_text(status.total)} {status.currency}, due {status.due_date or '-'}",
                detail={
                    "sent": trail.sent_payload(draft, customer_id),
                    "answer": status.model_dump(mode="json", exclude={"document"}),
                    "document": values["document"],
                },
                at=now,
                is_postgres=self.store.is_postgres,
            )
            await self._settle_in(conn, result={"invoice_id": status.invoice_id})
            await conn.execute(
                sa.update(table_of(BillingEventRow))
                .where(table_of(BillingEventRow).c.key == draft.key)
                .values(invoice_key=draft.key)
            )
            await self._queue_crm_status(
                conn, row.payload["crm"], row.payload["crm_object_id"], f"{draft.key}:created", now
            )
            await self.collections.on_document(
                conn,
                InvoiceRow.model_validate(values),
                before=None,
                after=(str(status.state), decimal_text(status.amount_due)),
                version="created",
                last_payment=status.last_payment_date,
                now=now,
            )
            if draft.kind is DraftKind.CREDIT_NOTE and isinstance(invoicing, AllocatesCredit):
                await self._queue_effect(
                    conn,
                    key=f"allocate:{draft.key}",
                    kind=ALLOCATE_CREDIT,
                    connection=row.connection,
                    payload={"credit_key": draft.key},
                    now=now,
                    client_key=draft.client.key,
                )
        failpoints.hit("after_local_commit")
        self._notify_unless_claimed()
        self.rt.metrics.invoice_created(self._pipeline_name(row), (now - triggered_at).total_seconds())
        if mismatch:
            log.warning("invoice_totals_mismatch", key=draft.key, invoice=status.number, detail=mismatch)
        log.info(
            "invoice_created" if created else "invoice_found",
            key=draft.key,
            invoice=status.number,
            client=draft.client.key,
            total=decimal_text(status.total),
            currency=status.currency,
            seconds_since_trigger=round((now - triggered_at).total_seconds(), 3),
        )

    async def _redraft(self, row: EffectRow, draft: InvoiceDraft) -> InvoiceDraft:
        """A replayed invoice drafted again from the current mapping, under the same key.

        ``syncd replay`` marks a dead ``create_invoice`` effect for this
        (:mod:`syncd.engine.replay`): the deal is read again and mapped with the pipeline's
        mapping as it is now, so a fixed mapping is what the ledger gets; the billing
        event, and with it the key (the vendor's idempotency key and the stamp a retry
        looks up), stays the same, as do the issue date and the lines of an hours event
        (time entries and rate cards, not the mapping, make those; their account codes
        are resolved again). The new draft replaces the stored one before anything is
        sent, so every later attempt sends the same request.

        Raises:
            MappingError: the deal still does not fit the mapping.
            RecordError: the billing event is not recorded, the deal is gone, or the
                mapping now gives the deal another engagement.
            LeaseLost: the effect was claimed again meanwhile.
        """
        place = f"effects.id={row.id}"
        pipeline = self._pipeline_for(row.payload["crm"], row.connection)
        deal_id = str(row.payload["crm_object_id"])
        recorded = await self.store.get(BillingEventRow, draft.key)
        if recorded is None:
            raise RecordError(f"billing event {draft.key} is not recorded: nothing to draft again", place=place)
        try:
            record = await pipeline.crm.fetch_deal(deal_id, pipeline.mapping.source_properties)
        except NotFound as exc:
            raise RecordError(
                f"deal {deal_id} is gone at {pipeline.crm_name}: its invoice cannot be drafted again", place=place
            ) from exc
        mapped = pipeline.mapping.map_deal(record, defaults=self.rt.defaults)
        if mapped.engagement.key != draft.engagement_key:
            raise RecordError(
                f"the mapping now makes deal {deal_id} engagement {mapped.engagement.key}, not "
                f"{draft.engagement_key} that billing event {draft.key} belongs to; not drafted again",
                place=place,
            )
        stored = await self.store.get(EngagementRow, draft.engagement_key)
        engagement = recurring.keep_history(
            Engagement.model_validate(stored.data) if stored is not None else None,
            mapped.engagement,
            recorded_at=record.modified_at,
            timezone=mapped.client.timezone,
        )
        event = BillingEvent(
            key=recorded.key,
            kind=BillingEventKind(recorded.kind),
            engagement_key=recorded.engagement_key,
            occurrence=recorded.occurrence,
            occurred_at=recorded.occurred_at,
        )
        options = pipeline.mapping.invoice
        if recurring.is_hours_event(engagement, event):
            fresh = draft.model_copy(
                update={
                    "client": mapped.client,
                    "reference": engagement.po_number or mapped.client.po_number,
                    "lines": tuple(
                        line.model_copy(update={"account_code": None, "tax_type": None}) for line in draft.lines
                    ),
                }
            )
        else:
            fresh = billing.draft_for_event(
                event,
                engagement,
                mapped.client,
                issue_date=draft.issue_date,
                status=options.status,
                send=options.send,
                line_amount_types=options.line_amount_types,
            )
        fresh = recurring.ledger_ready(self.rt, pipeline, fresh)
        payload = {k: v for k, v in row.payload.items() if k != "redraft"} | {"draft": fresh.model_dump(mode="json")}
        if not await self.store.update(
            EffectRow, [col(EffectRow.id) == row.id, col(EffectRow.attempts) == row.attempts], {"payload": payload}
        ):
            raise LeaseLost("claimed again meanwhile; not drafted again", place=place)
        log.info("invoice_redrafted", key=fresh.key, effect=row.id, mapping=str(pipeline.mapping.path))
        return fresh

    async def _after_lock_date(self, connection: str, invoicing: Any, draft: InvoiceDraft) -> InvoiceDraft:
        """A draft dated inside a period the ledger has locked, dated on the first open day instead.

        The due date keeps its distance from the issue date, and each line says which
        day the trigger fell on; the record keeps the trigger time. The ledger never
        gets a document it would refuse for its date.
        """
        if not isinstance(invoicing, HasLockDates):
            return draft
        now = self.rt.clock()
        cached = self._lock_dates.get(connection)
        if cached is None or (now - cached[0]).total_seconds() > LOCK_DATES_TTL_S:
            # one read for the rows of a batch that all find the cache empty or stale
            async with self._lock_dates_read.setdefault(connection, asyncio.Lock()):
                cached = self._lock_dates.get(connection)
                if cached is None or (now - cached[0]).total_seconds() > LOCK_DATES_TTL_S:
                    cached = (now, (await invoicing.lock_dates()).closed_until())
                    self._lock_dates[connection] = cached
        closed = cached[1]
        if closed is None or draft.issue_date > closed:
            return draft
        issue = closed + timedelta(days=1)
        lines = tuple(
            line.model_copy(update={"description": f"{line.description} (for {draft.issue_date.isoformat()})"})
            for line in draft.lines
        )
        log.info("invoice_dated_after_lock", key=draft.key, trigger_day=str(draft.issue_date), issue_day=str(issue))
        return draft.model_copy(
            update={"issue_date": issue, "due_date": issue + (draft.due_date - draft.issue_date), "lines": lines}
        )

    async def _allocate_credit(self, row: EffectRow) -> None:
        """Apply a new credit note to the invoice it credits: min(credit left, the invoice's amount due).

        The invoice is the engagement's latest approved invoice with something still due.
        Credit left over stays on the contact and is an outcome that needs attention.
        """
        credit = await self.store.get(InvoiceRow, row.payload["credit_key"])
        if credit is None:
            raise RecordError(f"credit note {row.payload['credit_key']} is not recorded", place=f"effects.id={row.id}")
        invoicing = self.rt.connectors[row.connection]
        invoices = await self.store.select(
            InvoiceRow,
            col(InvoiceRow.engagement_key) == credit.engagement_key,
            col(InvoiceRow.kind) == "invoice",
            col(InvoiceRow.state).in_([str(state) for state in receivables.OPEN_STATES]),
            col(InvoiceRow.currency) == credit.currency,
            order_by=col(InvoiceRow.created_at).desc(),
        )
        left = Decimal(credit.amount_due)
        target = next((invoice for invoice in invoices if Decimal(invoice.amount_due) > 0), None)
        if target is not None and left > 0:
            amount = min(left, Decimal(target.amount_due))
            done = await invoicing.allocate_credit_note(
                credit.invoice_id, target.invoice_id, amount, f"allocate:{credit.key}:{target.invoice_id}"
            )
            left = done.remaining_credit
            log.info("credit_allocated", credit_note=credit.number, invoice=target.number, amount=str(amount))
            for document in (target, credit):
                await self._record_status(document, await invoicing.get_invoice(document.invoice_id))
        if left > 0:
            await self.record_outcome(
                key=f"attention:credit_remainder:{credit.key}",
                kind="attention",
                reason="credit_remainder",
                detail=f"credit note {credit.number}: {left} {credit.currency} is not allocated to an invoice and "
                "stays as credit on the contact; refund it or allocate it at the ledger",
                connection=row.connection,
                object_type="deal",
                object_id=credit.crm_object_id,
                engagement_key=credit.engagement_key,
                client_key=credit.client_key,
                billing_event_key=credit.key,
            )

    def _pipeline_name(self, row: EffectRow) -> str:
        """The ``pipeline`` label of an invoice effect (queued before effects named it: the first on its route)."""
        named = row.payload.get("pipeline")
        if isinstance(named, str) and named:
            return named
        crm = row.payload.get("crm")
        route = (p.name for p in self.rt.pipelines if p.crm_name == crm and p.invoicing_name == row.connection)
        return next(route, "")

    def _pipeline_for(self, crm: str, invoicing: str) -> Pipeline:
        for pipeline in self.rt.pipelines:
            if pipeline.crm_name == crm and pipeline.invoicing_name == invoicing:
                return pipeline
        raise FatalError(f"no pipeline from {crm} to {invoicing} in the config", place="[[pipelines]]")

    async def _still_won(self, row: EffectRow) -> bool:
        """Whether the deal of a delayed invoice is still won (re-read at the CRM)."""
        pipeline = self._pipeline_for(row.payload["crm"], row.connection)
        try:
            record = await pipeline.crm.fetch_deal(row.payload["crm_object_id"], pipeline.mapping.source_properties)
        except NotFound:
            return False
        return pipeline.mapping.selects(record) and self._won_in(pipeline, record)

    async def _skip_unwon(self, row: EffectRow, draft: InvoiceDraft) -> None:
        """A deal that left the won stage within ``invoice_delay_s``: no invoice, a recorded skip.

        The billing event and its effect are removed, so winning the deal again invoices it.
        """
        now = self.rt.clock()
        async with self.store.begin() as conn:
            if not await self.store.finish(EffectRow, row, status="skipped", now=now, conn=conn):
                raise LeaseLost(f"effects.id={row.id}: claimed again meanwhile; the skip is not recorded")
            await conn.execute(sa.delete(table_of(EffectRow)).where(table_of(EffectRow).c.id == row.id))
            await conn.execute(sa.delete(table_of(BillingEventRow)).where(table_of(BillingEventRow).c.key == draft.key))
            await self.record_outcome(
                conn=conn,
                key=f"skip:not_won:{draft.key}:{row.id}",
                kind="skip",
                reason="not_won",
                detail=f"deal {row.payload['crm_object_id']} left the won stage within invoice_delay_s; not invoiced",
                connection=row.payload["crm"],
                object_type="deal",
                object_id=row.payload["crm_object_id"],
                engagement_key=draft.engagement_key,
                client_key=draft.client.key,
                trigger_at=datetime.fromisoformat(row.payload["triggered_at"]),
            )

    async def _void_unwon(self, row: EffectRow) -> None:
        """Void the invoice of a deal that left the won stage (``on_unwon = "void"``)."""
        invoice = await self.store.get(InvoiceRow, row.payload["invoice_key"])
        invoicing = self.rt.connectors[row.connection]
        if invoice is None:
            raise RecordError(f"invoice {row.payload['invoice_key']} is not recorded", place=f"effects.id={row.id}")
        if not isinstance(invoicing, VoidsInvoices) or Decimal(invoice.amount_paid) > 0:
            await self._unwon_attention(invoice, "it cannot be voided (payments applied, or the tool cannot void)")
            return
        status = await invoicing.void_invoice(invoice.invoice_id, invoice.key)
        await self._record_status(invoice, status)
        log.warning("invoice_voided_deal_unwon", invoice=invoice.number, deal=invoice.crm_object_id)

    async def _unwon_attention(self, invoice: InvoiceRow, why: str = "", *, conn: Connection | None = None) -> None:
        await self.record_outcome(
            conn=conn,
            key=f"attention:unwon:{invoice.key}",
            kind="attention",
            reason="unwon_after_invoice",
            detail=f"deal {invoice.crm_object_id} left the won stage after invoice {invoice.number} was created"
            + (f"; {why}" if why else "; void or credit it at the ledger if the deal is lost"),
            connection=invoice.crm_connection,
            object_type="deal",
            object_id=invoice.crm_object_id,
            engagement_key=invoice.engagement_key,
            client_key=invoice.client_key,
            billing_event_key=invoice.key,
        )

    async def _customer_id(self, connection: str, invoicing: Any, client: Client) -> tuple[str, Client]:
        """The client's customer id at the invoicing tool (created at most once), and the client to bill.

        Two effects of the same client may run at once (on two replicas): the lock makes
        the second wait and then read the id the first stored. An invoice created by the
        worker that queued it (a follow-up) starts from the client row read in that
        transaction instead (one transaction fewer); if another effect created the
        customer since, the connector's look-up finds it by its stamp (Xero: the
        ContactNumber), nothing is created twice, and the id is merged into the client's
        (:func:`~syncd.engine.clients.settle_ledger`). The customer record is
        then settled against the client record (:func:`syncd.engine.clients.settle_ledger`):
        changes at their owner flow to the other system, a change at a non-owner is a
        conflict, and the client comes back with the values in force (the ledger's
        payment terms, by default).
        """
        current = _working.get()
        prefetched = current.prefetched if current is not None else {}
        async with self.store.named_lock(f"customer:{connection}:{client.key}"):
            # Read in the transaction that queued this invoice, just before (one transaction
            # fewer): if another record of the client created the customer since, the
            # look-up finds it (connectors stamp their customers) and the id is merged.
            row = prefetched[CLIENT] if CLIENT in prefetched else await self.store.get(ClientRow, client.key)
            known = row.external_ids.get(connection) if row is not None else None
            created: Client | None = None
            ids: dict[str, str] | None = None
            if known:
                customer_id = str(known)
            else:
                created = clients.applied(client, row.record if row is not None else None)
                customer_id = str(await self._upsert_customer(connection, invoicing, created))
                if row is not None:
                    ids = {connection: customer_id}
            settled = await clients.settle_ledger(
                self.rt,
                connection=connection,
                invoicing=invoicing,
                client_key=client.key,
                customer_id=customer_id,
                created=created,
                external_ids=ids,
                read_details=lambda customer: self._customer_details(connection, invoicing, customer),
            )
            return customer_id, settled or client

    async def refresh_customer(self, pipeline: Pipeline, customer_id: str) -> None:
        """A customer record changed at the ledger (a contact webhook): settle it against its client's record."""
        rows = [
            row
            for row in await self.store.select(ClientRow)
            if str(row.external_ids.get(pipeline.invoicing_name, "")) == customer_id
        ]
        for row in rows:
            async with self.store.named_lock(f"customer:{pipeline.invoicing_name}:{row.key}"):
                await clients.settle_ledger(
                    self.rt,
                    connection=pipeline.invoicing_name,
                    invoicing=pipeline.invoicing,
                    client_key=row.key,
                    customer_id=customer_id,
                )

    async def _write_crm_status(self, row: EffectRow) -> None:
        """Write the deal's standing across all its documents (:func:`syncd.core.receivables.deal_status`)."""
        deal_id = row.payload.get("crm_object_id")
        if deal_id is None:  # queued before write-backs were per deal
            invoice = await self.store.get(InvoiceRow, row.payload["invoice_key"])
            if invoice is None:
                raise RecordError(f"invoice {row.payload['invoice_key']} is not recorded", place=f"effects.id={row.id}")
            deal_id = invoice.crm_object_id
        current = _working.get()
        prefetched = current.prefetched if current is not None else {}
        if STANDING in prefetched:
            status = prefetched[STANDING]
        else:
            status = await self.deal_standing(row.connection, str(deal_id))
        if status is None:
            return
        await self._write_status(row.connection, str(deal_id), status)
        log.info("crm_status_written", deal=deal_id, invoice=status.invoice_number, state=status.state)

    async def deal_standing(
        self, crm: str, deal_id: str, *, conn: Connection | None = None
    ) -> DealBillingStatus | None:
        """The standing of a deal across every document syncd created for it, as of now (in ``conn`` if given)."""
        rows = await self.store.select(
            InvoiceRow,
            InvoiceRow.crm_connection == crm,
            InvoiceRow.crm_object_id == deal_id,
            order_by=InvoiceRow.created_at,
            conn=conn,
        )
        if not rows:
            return None
        client = await self.store.get(ClientRow, rows[0].client_key, conn=conn)
        zone = client.data.get("timezone", "UTC") if client else "UTC"
        today = receivables.today_in(self.rt.clock(), zone)
        return receivables.deal_status((_document(r) for r in rows), today)

    # -- vendor calls that share requests (syncd/engine/batching.py) ------------------------

    async def _fetch_deal(
        self, pipeline: Pipeline, deal_id: str, properties: Mapping[str, Sequence[str]]
    ) -> SourceRecord:
        crm = pipeline.crm
        if not isinstance(crm, ReadsDealsInBatches):
            return await crm.fetch_deal(deal_id, properties)
        wanted = tuple(sorted((kind, tuple(sorted(names))) for kind, names in properties.items()))

        async def many(deal_ids: list[str]) -> Mapping[str, Any]:
            return await crm.fetch_deals(deal_ids, properties)

        record: SourceRecord = await self.batcher.call(
            ("fetch_deals", pipeline.crm_name, wanted),
            deal_id,
            deal_id,
            one=lambda one_id: crm.fetch_deal(one_id, properties),
            many=many,
        )
        return record

    async def _write_status(self, connection: str, deal_id: str, status: DealBillingStatus) -> None:
        crm = single = self.rt.connectors[connection]
        if not isinstance(crm, WritesStatusInBatches):
            await single.write_billing_status(deal_id, status)
            return

        async def one(item: tuple[str, DealBillingStatus]) -> None:
            await single.write_billing_status(*item)

        async def many(items: list[tuple[str, DealBillingStatus]]) -> Mapping[str, Any]:
            return await crm.write_billing_statuses(dict(items))

        await self.batcher.call(("write_billing_statuses", connection), deal_id, (deal_id, status), one=one, many=many)

    async def _upsert_customer(self, connection: str, invoicing: Any, client: Client) -> str:
        single = invoicing
        if not isinstance(invoicing, CreatesInvoicesInBatches):
            return str(await invoicing.upsert_customer(client))

        async def many(clients: list[Client]) -> Mapping[str, Any]:
            return await invoicing.upsert_customers(clients)

        customer_id = await self.batcher.call(
            ("upsert_customers", connection), client.key, client, one=single.upsert_customer, many=many
        )
        return str(customer_id)

    async def _customer_details(self, connection: str, invoicing: Any, customer_id: str) -> dict[str, str | None]:
        single = invoicing
        if not isinstance(invoicing, ReadsCustomersInBatches):
            found: dict[str, str | None] = await single.customer_details(customer_id)
            return found

        async def many(ids: list[str]) -> Mapping[str, Any]:
            return await invoicing.customers_details(ids)

        details: dict[str, str | None] = await self.batcher.call(
            ("customers_details", connection), customer_id, customer_id, one=single.customer_details, many=many
        )
        return details

    async def _find_invoice(self, connection: str, invoicing: Any, draft: InvoiceDraft) -> InvoiceStatus | None:
        single = invoicing
        if not isinstance(invoicing, CreatesInvoicesInBatches):
            found: InvoiceStatus | None = await invoicing.find_invoice(draft.key, kind=draft.kind)
            return found

        async def one(key: str) -> InvoiceStatus | None:
            result: InvoiceStatus | None = await single.find_invoice(key, kind=draft.kind)
            return result

        async def many(keys: list[str]) -> Mapping[str, Any]:
            found = await invoicing.find_invoices(keys, kind=draft.kind)
            return {key: found.get(key) for key in keys}

        status: InvoiceStatus | None = await self.batcher.call(
            ("find_invoices", connection, str(draft.kind)), draft.key, draft.key, one=one, many=many
        )
        return status

    async def _create(self, connection: str, invoicing: Any, draft: InvoiceDraft, customer_id: str) -> InvoiceStatus:
        single = invoicing
        if not isinstance(invoicing, CreatesInvoicesInBatches):
            created: InvoiceStatus = await invoicing.create_invoice(draft, customer_id)
            return created

        async def one(item: tuple[InvoiceDraft, str]) -> InvoiceStatus:
            result: InvoiceStatus = await single.create_invoice(*item)
            return result

        async def many(items: list[tuple[InvoiceDraft, str]]) -> Mapping[str, Any]:
            return await invoicing.create_invoices(items)

        status: InvoiceStatus = await self.batcher.call(
            ("create_invoices", connection), draft.key, (draft, customer_id), one=one, many=many
        )
        return status

    async def _renew_leases(self, held: list[Lease]) -> list[datetime | None]:
        """Renew several rows' leases, one transaction per table (a batch's write guard)."""
        lease_s = self.rt.config.daemon.lease_s
        now = self.rt.clock()
        by_model: dict[Any, list[tuple[int, Any]]] = {}
        for index, lease in enumerate(held):
            ref: tuple[Any, Any] = lease.ref  # type: ignore[assignment]
            model, row = ref
            by_model.setdefault(model, []).append((index, row))
        ends: list[datetime | None] = [None] * len(held)
        for model, rows in by_model.items():
            renewed = await self.store.renew_many(model, [row for _, row in rows], lease_s=lease_s, now=now)
            for (index, _), until in zip(rows, renewed, strict=True):
                ends[index] = until
        return ends

    # -- settling -------------------------------------------------------------------------

    async def _settle(
        self,
        model: Any,
        row: Any,
        source: str,
        work: Callable[[Any], Awaitable[bool]],
        later: list[Settle] | None = None,
        prefetched: dict[str, Any] | None = None,
        *,
        measure: bool = True,
    ) -> None:
        """Run ``work`` for a claimed row under its lease and settle it: done, retry later, or dead-letter.

        ``work`` returns ``True`` when it already settled the row in its own transaction
        (or settles it through :meth:`_settle_in`). A row done otherwise is settled in
        the worker's next claim when ``later`` is given (the worker's loop), else at once.
        Then the effects the work queued claimed (:class:`_Work`) are executed, in order.
        A worker whose lease was taken over settles nothing and retries nothing: it
        logs ``lease_lost`` and leaves the row to the claim that holds it.
        """
        lease_s = self.rt.config.daemon.lease_s
        lease = Lease(
            where=f"{table_of(model).name}.id={row.id} attempt {row.attempts}",
            until=row.lease_until,
            lease_s=lease_s,
            renew=lambda: self.store.renew(model, row, lease_s=lease_s, now=self.rt.clock()),
            clock=self.rt.clock,
            stopping=self.stop.is_set,
        )
        lease.ref = (model, row)
        with self.batcher.working():
            await self._settle_held(model, row, source, work, later, prefetched, lease, measure=measure)

    async def _settle_held(
        self,
        model: Any,
        row: Any,
        source: str,
        work: Callable[[Any], Awaitable[bool]],
        later: list[Settle] | None,
        prefetched: dict[str, Any] | None,
        lease: Lease,
        *,
        measure: bool,
    ) -> None:
        lease_s = lease.lease_s
        if lease.remaining_s() < lease_s * LEASE_SHARE and not await lease.renew():
            # its turn in the batch came after its lease ran out, and another worker took it
            self._log_lost(source, row, "claimed again before its turn in this worker's batch")
            return
        current = _Work(model=model, row=row, chains=later is not None, prefetched=prefetched or {})
        token = _working.set(current)
        started = time.monotonic()
        failed = False
        try:
            async with lease.held():
                settled = await work(row)
        except Exception as exc:
            await self._failed(model, row, source, exc, lost=lease.lost)
            settled = failed = True
        finally:
            _working.reset(token)
            if measure:
                self._measured(source, time.monotonic() - started)
        if not failed:
            self.rt.health.succeeded(row.connection)
        if not (settled or current.settled):
            now = self.rt.clock()
            if later is not None and not current.followups:
                later.append(Settle(model=model, row=row, status="done", now=now))
            elif not await self.store.finish(model, row, status="done", now=now):
                self._log_lost(source, row, "claimed again meanwhile; its result is discarded")
        if current.followups:
            rows, known = [f.row for f in current.followups], [f.prefetched for f in current.followups]
            await self._work_rows(EffectRow, "effect", self._execute, rows, later, known)

    @contextlib.asynccontextmanager
    async def _transaction(self, conn: Connection | None = None) -> AsyncIterator[Connection]:
        """The caller's transaction, or a new one; effects queued claimed in it run once it commits (:class:`_Work`)."""
        if conn is not None:
            yield conn
            return
        current = _working.get()
        if current is None:
            async with self.store.begin() as own:
                yield own
            return
        mark = len(current.staged)
        current.depth += 1
        try:
            async with self.store.begin() as own:
                yield own
        except BaseException:
            del current.staged[mark:]
            raise
        finally:
            current.depth -= 1
        current.followups += current.staged[mark:]
        del current.staged[mark:]

    async def _settle_in(
        self, conn: Connection, *, status: str = "done", result: Mapping[str, Any] | None = None
    ) -> None:
        """Settle the row being worked on in ``conn``, fenced on its attempt.

        Raises:
            LeaseLost: the row was claimed again meanwhile (``conn``'s transaction rolls back).
        """
        current = _working.get()
        if current is None or current.settled:
            return
        if not await self.store.finish(
            current.model, current.row, status=status, now=self.rt.clock(), result=result, conn=conn
        ):
            where = f"{table_of(current.model).name}.id={current.row.id}"
            raise LeaseLost(f"{where}: claimed again meanwhile; its result is discarded", place=where)
        current.settled = True

    async def _queue_effect(
        self,
        conn: Connection,
        *,
        key: str,
        kind: str,
        connection: str,
        payload: Mapping[str, Any],
        now: datetime,
        client_key: str | None = None,
        prefetched: dict[str, Any] | None = None,
    ) -> bool:
        """Queue an effect due now in ``conn``: claimed by this worker when it runs in one (:class:`_Work`).

        Returns:
            whether it was new. An effect queued unclaimed needs :meth:`notify` after the commit.
        """
        current = _working.get()
        if current is None or current.depth == 0 or not current.chains:
            return await self.store.add_effect(
                conn, key=key, kind=kind, connection=connection, payload=payload, now=now, client_key=client_key
            )
        row = await self.store.add_claimed_effect(
            conn,
            key=key,
            kind=kind,
            connection=connection,
            payload=payload,
            now=now,
            client_key=client_key,
            owner=self.rt.owner,
            lease_s=self.rt.config.daemon.lease_s,
        )
        if row is None:
            return False
        current.staged.append(_FollowUp(row=row, prefetched=prefetched or {}))
        return True

    async def _failed(self, model: Any, row: Any, source: str, exc: Exception, *, lost: bool) -> None:
        if isinstance(exc, LeaseLost) or lost:
            self._log_lost(source, row, str(exc))
        elif isinstance(exc, Stopping):  # the call in flight finished; the row goes back as it is
            await self._release(model, source, [row], uncount=False)
        elif isinstance(exc, RetriableError | AuthError):
            if isinstance(exc, AuthError):
                await self._needs_reauthorisation(row, exc)
            await self._note_failure(row.connection, exc)
            await self._retry_or_bury(model, row, source, exc)
        elif isinstance(exc, SyncdError):  # mapping, record, fatal, not found: retrying would not help
            if isinstance(exc, RecordError | FatalError):
                self.rt.health.succeeded(row.connection)  # the vendor answered; the record is at fault
            await self._bury(model, row, source, exc)
        else:  # a bug or an untranslated library error: retry, then bury
            log.error("work_crashed", source=source, id=row.id, attempt=row.attempts, exc_info=exc)
            await self._retry_or_bury(model, row, source, RetriableError(f"unexpected {type(exc).__name__}: {exc}"))

    def _log_lost(self, source: str, row: Any, why: str) -> None:
        log.warning("lease_lost", source=source, id=row.id, attempt=row.attempts, detail=why)

    async def _needs_reauthorisation(self, row: Any, exc: AuthError) -> None:
        """Credentials refused (a spent refresh token, a revoked app): an outcome a person must act on.

        The work itself is retried as before (a person may reconnect meanwhile); the
        outcome is recorded once a day per connection, so ``syncd outcomes list`` and
        ``syncd status`` show it without a line per record. The message says what to do
        (``run `syncd auth xero` to reconnect``) and never holds a secret.
        """
        day = self.rt.clock().date().isoformat()
        if await self.record_outcome(
            key=f"attention:auth_refused:{row.connection}:{day}",
            kind="attention",
            reason="auth_refused",
            detail=exc.message,
            place=exc.place,
            connection=row.connection,
        ):
            log.error("reauthorisation_needed", connection=row.connection, error=exc.message)

    async def _note_failure(self, connection: str, exc: SyncdError) -> None:
        """Lost authorisation, or one more failure of a streak (:mod:`syncd.engine.alerts`)."""
        now = self.rt.clock()
        if isinstance(exc, AuthError):
            await alerts.auth_lost(self.store, connection, exc.message, now)
            return
        after_s = self.rt.config.settings.alerts.vendor_errors_after_s
        await self.rt.health.failed(self.store, connection, exc.message, now, after_s=after_s)

    async def _retry_or_bury(self, model: Any, row: Any, source: str, exc: SyncdError) -> None:
        """Retry later with back-off, or dead-letter once ``give_up_after_s`` has passed since the first attempt.

        The wait is the vendor's ``Retry-After`` as given, else 5·2ⁿ⁻¹ seconds capped at
        ``retry_max_delay_s``; a retry never waits past the give-up moment, so the last
        attempt is made then.
        """
        daemon = self.rt.config.daemon
        now = self.rt.clock()
        first = row.first_attempt_at or now
        elapsed_s = (now - first).total_seconds()
        if elapsed_s >= daemon.give_up_after_s:
            note = (
                f"given up: still failing {_span(elapsed_s)} after the first attempt at {first.isoformat()} "
                f"({row.attempts} attempts; [daemon].give_up_after_s = {daemon.give_up_after_s})"
            )
            await self._bury(model, row, source, exc, note=note)
            return
        wait = backoff_s(row.attempts, getattr(exc, "retry_after_s", None), cap_s=daemon.retry_max_delay_s)
        if isinstance(exc, AuthError):
            wait = max(wait, AUTH_RETRY_MIN_S)
        next_at = min(now + timedelta(seconds=wait), first + timedelta(seconds=daemon.give_up_after_s))
        if not await self.store.finish(model, row, status="pending", now=now, error=str(exc), next_at=next_at):
            self._log_lost(source, row, f"claimed again meanwhile; not retried: {exc}")
            return
        wait_s = round((next_at - now).total_seconds(), 3)
        log.warning("work_retry", source=source, id=row.id, attempt=row.attempts, wait_s=wait_s, error=str(exc))

    async def _bury(self, model: Any, row: Any, source: str, exc: SyncdError, *, note: str | None = None) -> None:
        now = self.rt.clock()
        reason = f"{exc.message}; {note}" if note else exc.message
        payload = {
            k: getattr(row, k)
            for k in ("connection", "object_type", "object_id", "event_id", "kind", "key")
            if hasattr(row, k)
        }
        async with self.store.begin() as conn:
            if not await self.store.finish(model, row, status="dead", now=now, error=str(exc), conn=conn):
                self._log_lost(source, row, f"claimed again meanwhile; not dead-lettered: {exc}")
                return
            await self.store.dead_letter(
                source=source,
                ref=str(row.id),
                connection=row.connection,
                reason=reason,
                place=exc.place,
                payload=payload,
                now=now,
                conn=conn,
            )
        if model is EffectRow and row.kind == CREATE_INVOICE:
            self.rt.metrics.invoice_failed(self._pipeline_name(row))
        log.error("dead_lettered", source=source, id=row.id, reason=reason, place=exc.place)


def _span(seconds: float) -> str:
    """``49.5 h`` or ``12 min``: a give-up span for a dead letter's reason."""
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def _engagement_values(engagement: Engagement, pipeline: Pipeline, deal_id: str, now: datetime) -> dict[str, Any]:
    return {
        "key": engagement.key,
        "client_key": engagement.client_key,
        "type": str(engagement.type),
        "crm_connection": pipeline.crm_name,
        "crm_object_id": deal_id,
        "data": engagement.model_dump(mode="json"),
        "won_at": engagement.won_at,
        "source_version": engagement.source_version,
        "updated_at": now,
    }


_UNISSUED = frozenset({InvoiceState.DRAFT, InvoiceState.VOIDED})  # states in which a document was never payable


def _customer_of(row: InvoiceRow) -> str | None:
    """The ledger customer an invoice was sent for (from what syncd sent)."""
    sent = row.sent or {}
    found = sent.get("customer_id") if isinstance(sent, dict) else None
    return str(found) if found else None


def _billed_as(draft: InvoiceDraft, billed: Client) -> InvoiceDraft:
    """``draft`` with the client record's values in force (``billed``): the legal name, tax id and
    payment terms another system may own; a due date set by the terms follows the terms in
    force (changed at their owner since the draft was queued)."""
    client = draft.client.model_copy(
        update={
            "legal_name": billed.legal_name,
            "tax_id": billed.tax_id,
            "payment_terms_days": billed.payment_terms_days,
        }
    )
    update: dict[str, Any] = {"client": client}
    by_terms = draft.due_date - draft.issue_date == timedelta(days=draft.client.payment_terms_days)
    if by_terms and client.payment_terms_days != draft.client.payment_terms_days:
        update["due_date"] = draft.issue_date + timedelta(days=client.payment_terms_days)
        log.info("due_date_from_terms", key=draft.key, terms_days=client.payment_terms_days)
    return draft.model_copy(update=update)


def _document(row: InvoiceRow) -> receivables.Document:
    return receivables.Document(
        kind=row.kind,
        number=row.number,
        state=row.state,
        currency=row.currency,
        total=Decimal(row.total),
        amount_due=Decimal(row.amount_due),
        due_date=row.due_date,
        last_payment_date=row.last_payment_date,
    )


def _status_values(status: InvoiceStatus) -> dict[str, Any]:
    return {
        "number": status.number,
        "state": str(status.state),
        "currency": status.currency,
        "total": decimal_text(status.total),
        "subtotal": decimal_text(status.subtotal) if status.subtotal is not None else None,
        "amount_due": decimal_text(status.amount_due),
        "amount_paid": decimal_text(status.amount_paid),
        "due_date": status.due_date,
        "last_payment_date": status.last_payment_date,
    }


def _totals_mismatch(draft: InvoiceDraft, status: InvoiceStatus) -> str | None:
    """Compare the tool's subtotal with the draft's; a difference is flagged, not fixed."""
    if status.subtotal is None:
        return None
    expected = draft.subtotal()
    if status.subtotal == expected:
        return None
    return f"draft subtotal {expected} {draft.currency}, {status.currency} tool subtotal {status.subtotal}"
