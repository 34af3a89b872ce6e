"""The engine side of recurring billing: what is due, queued, simulated and backfilled.

The billing rules are pure (:mod:`syncd.core.billing`, :mod:`syncd.core.periods`,
:mod:`syncd.core.proration`); this module feeds them the state the store holds and hands
their events to the :class:`~syncd.engine.loop.Engine`:

* :func:`keep_history` keeps an engagement's amount history (and the moment a
  cancellation was first seen) from one mapping of the deal to the next, because the
  source only holds the *current* amount;
* :func:`with_tracker_state` reads what the time tracker holds for an engagement (the
  cap from its project's budget, milestones done there) before the pure rules run;
* :func:`bill_engagement` computes every billing event due now
  (:func:`syncd.core.billing.due_events`, plus :func:`syncd.core.billing.cap_events` for hours)
  with the keys already recorded as ``billed``, and queues each: an invoice or credit
  note (:meth:`~syncd.engine.api.BillingQueue.queue_invoice`), an hours invoice
  (:meth:`~syncd.engine.api.BillingQueue.queue_draft`, stamping the entries in the same
  transaction), or a record with nothing to invoice (an hourly period without hours);
* :func:`run_due` does that for every stored engagement: the hourly scheduler tick
  (:func:`syncd.engine.scheduler.tick_recurring`) calls it, so retainers and subscriptions are
  invoiced on their calendar date with no change at the CRM. ``Engine.process_deal``
  calls :func:`bill_engagement` for the deal it just mapped.

Because the events and their keys depend only on the engagement, ``as_of`` and the keys
already recorded, running every hour, once a day or once a month gives the same
invoices (docs/architecture.md: a key never depends on wall-clock time).

**Credits without credit notes.** For an invoicing tool that does not declare
:attr:`~syncd.core.interfaces.Capability.CREDIT_NOTES`, a credit owed (a downgrade or a
cancellation after a period was invoiced) becomes a *dead letter* with source
``manual_credit``: its reason says whom to credit and how much, a person issues it by hand
at the tool, and its billing event is recorded so it is surfaced once. ``syncd
dead-letters list`` shows it; ``syncd replay`` leaves it alone. No negative invoice is
ever created.

**Pilot mode.** A client outside ``[pilot] clients`` gets its billing events recorded as
simulated and its effects parked (see :meth:`~syncd.engine.api.BillingQueue.queue_draft`); its
manual credits are dead letters with status ``simulated``. Because those keys are
recorded, a client that joins the pilot is billed from then on and never for the
simulated periods, unless :func:`backfill` (``syncd backfill``) makes them real.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa
import structlog

from syncd.core import billing
from syncd.core.errors import RecordError, SyncdError
from syncd.core.interfaces import (
    BillingEvent,
    BillingEventKind,
    Capability,
    Client,
    Engagement,
    EngagementType,
    InvoiceDraft,
    RateChange,
    SourceRecord,
    TimeEntry,
)
from syncd.core.periods import start_of_day
from syncd.core.proration import with_history
from syncd.engine import hours
from syncd.engine.runtime import Pipeline, Runtime
from syncd.store.db import (
    BillingEventRow,
    ClientRow,
    DeadLetterRow,
    EffectRow,
    EngagementRow,
    OutcomeRow,
    SourceRecordRow,
    Store,
    table_of,
)

if TYPE_CHECKING:
    from syncd.engine.api import BillingQueue
    from syncd.store.db import Connection

log = structlog.get_logger("syncd.engine.recurring")

HOURS_KINDS = frozenset({BillingEventKind.PERIOD_DUE, BillingEventKind.HOURS_CAP_REACHED})
PAGE_SIZE = 200
"""Engagements read per page by :func:`run_due` (keyset pagination: ``syncd/store/db.py``, ``Store.pages``)."""


# ---------------------------------------------------------------------------
# History kept between mappings
# ---------------------------------------------------------------------------


def keep_history(
    previous: Engagement | None, current: Engagement, *, recorded_at: datetime, timezone: str
) -> Engagement:
    """``current`` (as just mapped) with the history the source does not keep.

    * An amount that differs from the one in force becomes an
      :class:`~syncd.core.interfaces.AmountChange` (:func:`syncd.core.proration.with_history`)
      effective on ``current.amount_effective``, else on the day of ``recorded_at`` in
      ``timezone``; its version (the change sequence in its billing key) is the source's.
    * An hourly rate that differs from the one in force becomes a
      :class:`~syncd.core.interfaces.RateChange` effective on the day of ``recorded_at`` in
      ``timezone`` (:func:`with_rate_history`): hours dated from then on are billed at it.
    * A cancellation date seen for the first time is taken as recorded at
      ``recorded_at``; the moment is kept while the date stays the same.

    Nothing is kept before the deal is won: the terms at winning are the starting point.

    Args:
        previous: the engagement as last stored (``None`` the first time).
        current: the engagement as just mapped.
        recorded_at: when the source recorded this version (its modification time).
        timezone: the client's IANA zone.
    """
    if previous is None or previous.won_at is None:
        return current
    effective = current.amount_effective or billing.issue_date_for(recorded_at, timezone)
    kept = with_history(previous, current, recorded_at=recorded_at, effective=effective)
    kept = with_rate_history(
        previous, kept, recorded_at=recorded_at, effective=billing.issue_date_for(recorded_at, timezone)
    )
    if kept.cancel_date is None or kept.cancelled_at is not None:
        return kept
    seen = previous.cancelled_at if previous.cancel_date == kept.cancel_date else None
    return kept.model_copy(update={"cancelled_at": seen or recorded_at})


def with_rate_history(
    previous: Engagement, current: Engagement, *, recorded_at: datetime, effective: date
) -> Engagement:
    """``current`` carrying the rate history of ``previous``, plus the change it makes.

    The mapping yields the rate the source holds now; hours logged before a change keep
    the rate of their day, so the history is kept here from one mapping to the next:
    ``rate`` stays the rate before the first change, and a new rate is appended as a
    :class:`~syncd.core.interfaces.RateChange` effective on ``effective``. Hours already
    invoiced are never billed again whatever the rate (``time_entries.invoice_key``).
    """
    if current.rate is None or current.rate_changes:
        return current
    in_force = previous.current_rate()
    if in_force is None:
        return current
    history = previous.rate_changes
    if in_force != current.rate:
        history = (*history, RateChange(effective=effective, rate=current.rate, recorded_at=recorded_at))
    return current.model_copy(update={"rate": previous.rate, "rate_changes": history})


# ---------------------------------------------------------------------------
# What is due
# ---------------------------------------------------------------------------


def is_hours_event(engagement: Engagement, event: BillingEvent) -> bool:
    """Whether ``event`` bills time entries (an hourly period or a cap step)."""
    return engagement.type is EngagementType.HOURLY and event.kind in HOURS_KINDS


def events_due(
    engagement: Engagement,
    *,
    as_of: datetime,
    timezone: str,
    billing_start: datetime,
    billed: Iterable[str],
    credit_notes: bool,
    entries: Sequence[TimeEntry] | None,
) -> list[BillingEvent]:
    """Every billing event of ``engagement`` due by ``as_of`` and not in ``billed``, in order.

    :func:`syncd.core.billing.due_events`, plus :func:`syncd.core.billing.cap_events` over
    ``entries``. An hourly engagement whose hours are not read (``entries`` is ``None``:
    no linked project or no time tracker) has no hours events yet; they come due once
    its hours are read.
    """
    done = frozenset(billed)
    events = billing.due_events(
        engagement, as_of=as_of, timezone=timezone, billing_start=billing_start, billed=done, credit_notes=credit_notes
    )
    if entries is None:
        events = [event for event in events if not is_hours_event(engagement, event)]
    else:
        events += billing.cap_events(engagement, entries, billing_start=billing_start, billed=done)
    due = [event for event in events if event.occurred_at <= as_of]
    return sorted(due, key=lambda event: (event.occurred_at, event.kind, event.occurrence))


async def billed_keys(store: Store, engagement_key: str, *, conn: Connection | None = None) -> frozenset[str]:
    """The keys of every billing event recorded for the engagement (simulated ones too), in ``conn`` if given."""
    rows = await store.select(BillingEventRow, table_of(BillingEventRow).c.engagement_key == engagement_key, conn=conn)
    return frozenset(row.key for row in rows)


def ledger_ready(runtime: Runtime, pipeline: Pipeline, draft: InvoiceDraft) -> InvoiceDraft:
    """``draft`` with every line's account code and tax type resolved, as it is sent.

    The engine queues drafts through here, and ``syncd simulate`` and ``syncd preview``
    show them through here, so what they show is what the ledger gets.

    Raises:
        MappingError: a client's own code is unknown at the ledger.
    """
    return billing.with_ledger_codes(
        draft, pipeline.mapping.ledger, known=billing.known_codes(runtime.extra, pipeline.invoicing_name)
    )


def draft_options(pipeline: Pipeline, issue_date: date) -> billing.DraftOptions:
    """The pipeline's ``[invoice]`` options for a draft issued on ``issue_date``."""
    options = pipeline.mapping.invoice
    return billing.DraftOptions(
        issue_date=issue_date, status=options.status, send=options.send, line_amount_types=options.line_amount_types
    )


# ---------------------------------------------------------------------------
# Billing one engagement, and every stored one
# ---------------------------------------------------------------------------


async def tracked_hours(runtime: Runtime, pipeline: Pipeline, engagement: Engagement) -> hours.ProjectHours | None:
    """The stored hours of an hourly engagement's project (``None``: its hours are not read)."""
    if engagement.type is not EngagementType.HOURLY or engagement.time_project_id is None:
        return None
    if pipeline.time_tracker is None or pipeline.time_tracking_name is None:
        log.warning("hours_not_read", engagement=engagement.key, reason="the pipeline has no time_tracking connection")
        return None
    return await hours.project_hours(runtime.store, pipeline.time_tracking_name, engagement.time_project_id)


async def with_tracker_state(
    pipeline: Pipeline, engagement: Engagement, tracked: hours.ProjectHours | None, now: datetime
) -> Engagement:
    """``engagement`` with what its time tracker holds, read before the pure rules run.

    That is the cap from the project's budget (an hourly engagement whose hours are read,
    :func:`syncd.engine.hours.with_tracker_cap`) and the milestones done there
    (:func:`syncd.engine.hours.with_tracker_milestones`).
    """
    tracker = pipeline.time_tracker
    if tracker is None:
        if any(milestone.from_tracker for milestone in engagement.milestones):
            log.warning("milestones_not_read", engagement=engagement.key, reason="the pipeline has no time_tracking")
        return engagement
    if tracked is not None:
        engagement = await hours.with_tracker_cap(tracker, engagement)
    return await hours.with_tracker_milestones(tracker, engagement, now=now)


async def bill_engagement(
    engine: BillingQueue,
    pipeline: Pipeline,
    engagement: Engagement,
    client: Client,
    crm_object_id: str,
    *,
    conn: Connection | None = None,
) -> list[str]:
    """Queue every billing event of ``engagement`` that is due now and not yet recorded.

    With ``conn``, everything is read and queued in the caller's transaction: only for
    a pipeline without a time tracker, whose billing reads no vendor (no call may run
    while a transaction holds the database).

    Returns:
        the keys recorded by this call.

    Raises:
        ValidationFailed: a draft cannot be valid, or an hour has no rate.
        RetriableError: hours were invoiced by another run meanwhile (run again).
    """
    runtime = engine.rt
    now = runtime.clock()
    if conn is not None and pipeline.time_tracker is not None:
        raise ValueError("bill_engagement: a pipeline with a time tracker reads it, outside any transaction")
    tracked = await tracked_hours(runtime, pipeline, engagement)
    engagement = await with_tracker_state(pipeline, engagement, tracked, now)
    credit_notes = Capability.CREDIT_NOTES in pipeline.invoicing.capabilities
    billed = await billed_keys(runtime.store, engagement.key, conn=conn)
    events = events_due(
        engagement,
        as_of=now,
        timezone=client.timezone,
        billing_start=runtime.billing_start,
        billed=billed,
        credit_notes=credit_notes,
        entries=tracked.entries if tracked is not None else None,
    )
    keys = await _queue(engine, pipeline, engagement, client, crm_object_id, events, tracked, conn)
    if not credit_notes:
        keys += await _surface_credits(engine, pipeline, engagement, client, billed, now, conn)
    return keys


async def _queue(
    engine: BillingQueue,
    pipeline: Pipeline,
    engagement: Engagement,
    client: Client,
    crm_object_id: str,
    events: Sequence[BillingEvent],
    tracked: hours.ProjectHours | None,
    conn: Connection | None,
) -> list[str]:
    keys: list[str] = []
    hourly = _HoursRun(engine, pipeline, engagement, client, crm_object_id, tracked) if tracked is not None else None
    for event in events:
        if hourly is not None and is_hours_event(engagement, event):
            key = await hourly.queue(event)
        else:
            key = await engine.queue_invoice(pipeline, event, engagement, client, crm_object_id, conn=conn)
        if key is not None:
            keys.append(key)
    return keys


async def _surface_credits(
    engine: BillingQueue,
    pipeline: Pipeline,
    engagement: Engagement,
    client: Client,
    billed: frozenset[str],
    now: datetime,
    conn: Connection | None,
) -> list[str]:
    credits = billing.manual_credits(
        engagement,
        as_of=now,
        timezone=client.timezone,
        billing_start=engine.rt.billing_start,
        handled=billed,
    )
    keys = [await engine.surface_credit(pipeline, credit, conn=conn) for credit in credits]
    return [key for key in keys if key is not None]


class _HoursRun:
    """Queues the hours events of one engagement in order, each billing what is left."""

    def __init__(
        self,
        engine: BillingQueue,
        pipeline: Pipeline,
        engagement: Engagement,
        client: Client,
        crm_object_id: str,
        tracked: hours.ProjectHours,
    ) -> None:
        self.engine = engine
        self.pipeline = pipeline
        self.engagement = engagement
        self.client = client
        self.crm_object_id = crm_object_id
        self.entries = tracked.entries
        self.invoiced = set(tracked.invoiced)
        self.rates: billing.RateCard | None = None

    async def queue(self, event: BillingEvent) -> str | None:
        runtime = self.engine.rt
        now = runtime.clock()
        options = draft_options(self.pipeline, billing.issue_date_for(now, self.client.timezone))
        found = billing.hours_draft(
            event,
            self.engagement,
            self.client,
            self.entries,
            invoiced=self.invoiced,
            options=options,
            rates=await self._rates(),
        )
        if found is None:
            held = billing.held_over_cap(self.engagement, self.entries, self.invoiced)
            if held:
                await self._held(event, frozenset(entry.id for entry in held))
            return await self.engine.record_event(event, self.client.key)
        connection = str(self.pipeline.time_tracking_name)
        stamp = hours.mark_invoiced(runtime.store, connection, event.key, found.entry_ids, now, found.split)
        key = await self.engine.queue_draft(self.pipeline, event, found.draft, self.crm_object_id, on_recorded=stamp)
        if key is not None:
            self.invoiced |= found.entry_ids
            if found.held:
                await self._held(event, found.held)
        return key

    async def _held(self, event: BillingEvent, held: frozenset[str]) -> None:
        """Hours held over the cap need a person: raise the cap, or ``syncd hours release``."""
        hours_held = sum((e.hours for e in self.entries if e.id in held), Decimal(0))
        await self.engine.record_outcome(
            key=f"attention:over_cap:{event.key}",
            kind="attention",
            reason="hours_over_cap",
            detail=f"{hours_held} billable hours of {self.engagement.name} are over its cap of "
            f"{self.engagement.cap_hours} hours and held: raise the cap, or release them with "
            "`syncd hours release ENTRY_ID` (see `syncd unbilled`)",
            engagement_key=self.engagement.key,
            client_key=self.client.key,
            billing_event_key=event.key,
            trigger_at=event.occurred_at,
        )

    async def _rates(self) -> billing.RateCard:
        """The project's rate card, read from the tracker once and only if hours wait."""
        if self.rates is not None:
            return self.rates
        pending = [e for e in self.entries if e.billable and not e.invoiced and e.id not in self.invoiced]
        tracker, project = self.pipeline.time_tracker, self.engagement.time_project_id
        if not pending or tracker is None or project is None:
            return billing.RateCard()
        self.rates = await hours.rate_card(tracker, project)
        return self.rates


async def stored_client(store: Store, client_key: str, *, conn: Connection | None = None) -> Client:
    """The stored client, as a :class:`~syncd.core.interfaces.Client` (read in ``conn`` if given).

    Raises:
        RecordError: no client with that key is stored (the message lists some that are).
    """
    row = await store.get(ClientRow, client_key, conn=conn)
    if row is None:
        by_key = table_of(ClientRow).c.key
        known = [r.key for r in await store.select(ClientRow, order_by=by_key, limit=10, conn=conn)]
        raise RecordError(f"no client {client_key!r} is stored; known: {', '.join(known) or 'none'}")
    return Client.model_validate({**row.data, "external_ids": row.external_ids})


async def pipeline_for(runtime: Runtime, row: EngagementRow) -> Pipeline | None:
    """The pipeline a stored engagement belongs to: the one reading its CRM that takes its deal."""
    candidates = [p for p in runtime.pipelines if p.crm_name == row.crm_connection]
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    stored = await runtime.store.get(SourceRecordRow, row.crm_connection, "deal", row.crm_object_id)
    if stored is None:
        return None
    record = SourceRecord(
        connection=stored.connection,
        object_type=stored.object_type,
        object_id=stored.object_id,
        version=stored.version,
        modified_at=stored.fetched_at,
        data=stored.data,
    )
    for pipeline in candidates:
        try:
            if pipeline.mapping.selects(record):
                return pipeline
        except SyncdError:
            continue
    return None


async def bill_row(
    engine: BillingQueue, pipeline: Pipeline, row: EngagementRow, *, conn: Connection | None = None
) -> list[str]:
    """:func:`bill_engagement` for a stored engagement (with its stored client), in ``conn`` if given."""
    client = await stored_client(engine.rt.store, row.client_key, conn=conn)
    engagement = Engagement.model_validate(row.data)
    return await bill_engagement(engine, pipeline, engagement, client, row.crm_object_id, conn=conn)


async def run_due(engine: BillingQueue, *, page_size: int = PAGE_SIZE) -> int:
    """Read every time tracker's new hours, then queue what is due for every stored engagement.

    Only won engagements on a CRM some pipeline reads are read (nothing is ever due for
    one that is not won: every rule of :mod:`syncd.billing` starts from ``won_at``), in
    pages of ``page_size`` by key, so the hourly run holds one page in memory, not the
    table; each is handled once per run. A failure is logged per engagement (the deal's
    own processing dead-letters it) and the others go on. Returns how many billing
    events were recorded.

    Engagements of a pipeline without a time tracker (nothing to read from a vendor)
    are queued ``[daemon] batch_max`` to a transaction, each in a savepoint of its own
    (:func:`_bill_together`): the invoices of a month start reach the outbox together,
    so the workers claim them together and the ledger's calls carry full batches
    (BENCHMARKS.md, "Month start"). With batching off (``batch_max = 1``) each is its
    own transaction, as the rest are.
    """
    runtime = engine.rt
    for each in runtime.pipelines:
        await _read_hours(runtime, each)
    table = table_of(EngagementRow)
    crms = sorted({pipeline.crm_name for pipeline in runtime.pipelines})
    won = (table.c.won_at.is_not(None), table.c.crm_connection.in_(crms))
    together = max(1, runtime.config.daemon.batch_max)
    seen = recorded = 0
    async for page in runtime.store.pages(EngagementRow, *won, key="key", size=page_size):
        seen += len(page)
        untracked: list[tuple[Pipeline, EngagementRow]] = []
        for row in page:
            pipeline = await pipeline_for(runtime, row)
            if pipeline is None:
                continue
            if pipeline.time_tracker is None and together > 1:
                untracked.append((pipeline, row))
            else:
                recorded += await _bill_stored(engine, pipeline, row)
        for start in range(0, len(untracked), together):
            recorded += await _bill_together(engine, untracked[start : start + together])
    log.info("recurring_run_done", engagements=seen, recorded=recorded)
    return recorded


async def _bill_stored(engine: BillingQueue, pipeline: Pipeline, row: EngagementRow) -> int:
    """:func:`bill_row` in a transaction of its own; a failure is logged, not raised."""
    try:
        return len(await bill_row(engine, pipeline, row))
    except SyncdError as exc:
        log.warning("recurring_billing_failed", engagement=row.key, error=str(exc))
        return 0


async def _bill_together(engine: BillingQueue, rows: Sequence[tuple[Pipeline, EngagementRow]]) -> int:
    """:func:`bill_row` for each of ``rows`` in one transaction, each in a savepoint; a failure is logged.

    A failing engagement's savepoint is rolled back (nothing of it recorded) and the
    others are kept; the workers are woken once the transaction commits.
    """
    recorded = 0
    async with engine.rt.store.begin() as conn:
        for pipeline, row in rows:
            try:
                async with conn.savepoint():
                    recorded += len(await bill_row(engine, pipeline, row, conn=conn))
            except SyncdError as exc:
                log.warning("recurring_billing_failed", engagement=row.key, error=str(exc))
    if recorded:
        engine.notify()
    return recorded


async def _read_hours(runtime: Runtime, pipeline: Pipeline) -> set[str]:
    if pipeline.time_tracker is None or pipeline.time_tracking_name is None:
        return set()
    try:
        return await hours.sync_entries(runtime, pipeline.time_tracking_name, pipeline.time_tracker)
    except SyncdError as exc:
        log.warning("time_entries_read_failed", connection=pipeline.time_tracking_name, error=str(exc))
        return set()


async def bill_projects(engine: BillingQueue, pipeline: Pipeline, project_ids: Iterable[str]) -> list[str]:
    """Queue what is due for the pipeline's hourly engagements that bill ``project_ids``."""
    wanted = set(project_ids)
    rows = await hours.hourly_engagements(engine.rt.store, pipeline.crm_name, wanted)
    keys: list[str] = []
    for row in rows:
        if Engagement.model_validate(row.data).time_project_id not in wanted:
            continue
        owner = await pipeline_for(engine.rt, row)
        if owner is not None and owner.settings == pipeline.settings:
            keys += await bill_row(engine, owner, row)
    return keys


# ---------------------------------------------------------------------------
# Simulation
# ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Simulated:
    """One billing event a simulation found, and what it would create.

    Attributes:
        event: the billing event.
        day: the day it arises, in the client's zone (a draft's issue date).
        status: ``new`` (not recorded yet), ``recorded`` (already handled for real) or
            ``simulated`` (recorded in pilot mode, not invoiced).
        draft: the invoice or credit note it would create (``None``: nothing to invoice,
            or a credit the tool cannot issue).
        note: why there is no draft.
    """

    event: BillingEvent
    day: date
    status: Literal["new", "recorded", "simulated"]
    draft: InvoiceDraft | None
    note: str = ""


async def simulate(runtime: Runtime, client_key: str, start: date, end: date) -> list[Simulated]:
    """The full billing cycle of one client's stored engagements from ``start`` up to ``end``.

    Nothing is written and nothing is sent. Events from the start of ``start`` up to
    (not including) the start of ``end``, in the client's zone, are computed as if syncd
    had billed from ``start`` (earlier periods count as invoiced by other means). Hours
    are stepped day by day: an entry counts from its ``updated_at``, and entries invoiced
    by events before ``start`` count as invoiced. Drafts are issued on their event's day.

    Raises:
        RecordError: the client is not stored.
        ValidationFailed: an engagement's draft cannot be valid.
    """
    client = await stored_client(runtime.store, client_key)
    table = table_of(EngagementRow)
    rows = await runtime.store.select(EngagementRow, table.c.client_key == client_key, order_by=table.c.key)
    found: list[Simulated] = []
    for row in rows:
        pipeline = await pipeline_for(runtime, row)
        if pipeline is not None:
            engagement = Engagement.model_validate(row.data)
            found += await _simulate_one(runtime, pipeline, engagement, client, (start, end))
    return sorted(found, key=lambda item: (item.event.occurred_at, item.event.engagement_key, item.event.kind))


async def _simulate_one(
    runtime: Runtime,
    pipeline: Pipeline,
    engagement: Engagement,
    client: Client,
    span: tuple[date, date],
) -> list[Simulated]:
    begin = start_of_day(span[0], client.timezone)
    tracked = await tracked_hours(runtime, pipeline, engagement)
    recorded = await _recorded(runtime.store, engagement.key, tracked)
    engagement = await with_tracker_state(pipeline, engagement, tracked, runtime.clock())
    run = _Simulation(runtime, pipeline, engagement, client, begin, recorded, tracked)
    entry_times = [entry.updated_at for entry in tracked.entries] if tracked is not None else None
    for as_of in _steps(span, client.timezone, entry_times):
        await run.step(as_of)
    return run.found


async def _recorded(
    store: Store, engagement_key: str, tracked: hours.ProjectHours | None
) -> dict[str, BillingEventRow]:
    """The billing events a simulation of one engagement looks up: its own, and those that invoiced its hours.

    Read by engagement and by key in SQL, never the whole table.
    """
    table = table_of(BillingEventRow)
    rows = await store.select(BillingEventRow, table.c.engagement_key == engagement_key)
    if tracked is not None:
        rows += await store.select_in(BillingEventRow, "key", tracked.keys.values())
    return {row.key: row for row in rows}


def _steps(span: tuple[date, date], timezone: str, entry_times: Sequence[datetime] | None) -> list[datetime]:
    """The ``as_of`` moments a simulation runs at: the moments the daemon would act.

    The daemon bills an engagement's due events on its hourly tick and whenever new
    hours arrive. Without hours, only the end of the span matters. With hours, the
    simulation runs at the start of each day (where period events fall) and at each
    entry's ``updated_at`` (when its hint arrives), in order, so a cap step and a period
    end on the same day bill the same hours in the same order as the daemon does.
    """
    tick = timedelta(microseconds=1)
    first, last = start_of_day(span[0], timezone), start_of_day(span[1], timezone) - tick
    if entry_times is None:
        return [last]
    days = (span[1] - span[0]).days
    moments = {start_of_day(span[0] + timedelta(days=offset), timezone) for offset in range(1, days)}
    moments |= {moment for moment in entry_times if first <= moment <= last}
    return sorted(moments | {last})


class _Simulation:
    """One engagement's simulated run: the keys and entries it has billed so far."""

    def __init__(
        self,
        runtime: Runtime,
        pipeline: Pipeline,
        engagement: Engagement,
        client: Client,
        begin: datetime,
        recorded: dict[str, BillingEventRow],
        tracked: hours.ProjectHours | None,
    ) -> None:
        self.runtime = runtime
        self.pipeline = pipeline
        self.engagement = engagement
        self.client = client
        self.begin = begin
        self.recorded = recorded
        self.tracked = tracked
        self.credit_notes = Capability.CREDIT_NOTES in pipeline.invoicing.capabilities
        self.billed: set[str] = set()
        self.invoiced = _invoiced_before(tracked, recorded, begin)
        self.split: dict[str, Decimal] = {}
        self.rates: billing.RateCard | None = None
        self.found: list[Simulated] = []

    async def step(self, as_of: datetime) -> None:
        entries = None
        if self.tracked is not None:
            arrived = [e for e in self.tracked.entries if e.updated_at <= as_of]
            entries = billing.split_entries(arrived, billed=self.split)
        events = events_due(
            self.engagement,
            as_of=as_of,
            timezone=self.client.timezone,
            billing_start=self.begin,
            billed=self.billed,
            credit_notes=self.credit_notes,
            entries=entries,
        )
        for event in events:
            self.billed.add(event.key)
            self.found.append(await self._draft(event, entries or []))
        if not self.credit_notes:
            self._credits(as_of)

    async def _draft(self, event: BillingEvent, entries: Sequence[TimeEntry]) -> Simulated:
        options = draft_options(self.pipeline, billing.issue_date_for(event.occurred_at, self.client.timezone))
        status = _status(self.recorded.get(event.key))
        if not is_hours_event(self.engagement, event):
            draft = billing.draft_for_event(
                event,
                self.engagement,
                self.client,
                issue_date=options.issue_date,
                status=options.status,
                send=options.send,
                line_amount_types=options.line_amount_types,
            )
            return Simulated(
                event=event,
                day=options.issue_date,
                status=status,
                draft=ledger_ready(self.runtime, self.pipeline, draft),
            )
        found = billing.hours_draft(
            event,
            self.engagement,
            self.client,
            entries,
            invoiced=self.invoiced,
            options=options,
            rates=await self._rates(),
        )
        if found is None:
            return Simulated(
                event=event, day=options.issue_date, status=status, draft=None, note="no billable hours left to invoice"
            )
        self.invoiced |= found.entry_ids
        self.split.update(found.split)
        draft = ledger_ready(self.runtime, self.pipeline, found.draft)
        return Simulated(event=event, day=options.issue_date, status=status, draft=draft)

    def _credits(self, as_of: datetime) -> None:
        credits = billing.manual_credits(
            self.engagement,
            as_of=as_of,
            timezone=self.client.timezone,
            billing_start=self.begin,
            handled=frozenset(self.billed),
        )
        for credit in credits:
            self.billed.add(credit.event.key)
            status = _status(self.recorded.get(credit.event.key))
            day = billing.issue_date_for(credit.event.occurred_at, self.client.timezone)
            self.found.append(Simulated(event=credit.event, day=day, status=status, draft=None, note=credit.message()))

    async def _rates(self) -> billing.RateCard:
        tracker, project = self.pipeline.time_tracker, self.engagement.time_project_id
        if self.rates is None:
            self.rates = await hours.rate_card(tracker, project) if tracker and project else billing.RateCard()
        return self.rates


def _invoiced_before(
    tracked: hours.ProjectHours | None, recorded: dict[str, BillingEventRow], begin: datetime
) -> set[str]:
    if tracked is None:
        return set()
    return {entry_id for entry_id, key in tracked.keys.items() if key in recorded and recorded[key].occurred_at < begin}


def _status(row: BillingEventRow | None) -> Literal["new", "recorded", "simulated"]:
    if row is None:
        return "new"
    return "simulated" if row.simulated else "recorded"


# ---------------------------------------------------------------------------
# Backfill
# ---------------------------------------------------------------------------


async def backfill(store: Store, client_key: str, *, since: date | None, now: datetime) -> list[str]:
    """Make a client's simulated (pilot) billing events real, from ``since`` on.

    Each simulated event whose day (in the client's zone) is on or after ``since`` (all
    when ``None``) is marked real; its parked effect is queued, re-dated to today (the
    day it is actually issued) with the client's payment terms, and a simulated manual
    credit becomes an open dead letter. Run it once the client is in the pilot (or the
    pilot has ended); the daemon then creates the invoices.

    Returns:
        the keys made real.

    Raises:
        RecordError: the client is not stored.
    """
    client = await stored_client(store, client_key)
    table = table_of(EngagementRow)
    engagements = [row.key for row in await store.select(EngagementRow, table.c.client_key == client_key)]
    events = table_of(BillingEventRow)
    rows = await store.select(
        BillingEventRow, events.c.simulated, events.c.engagement_key.in_(engagements), order_by=events.c.occurred_at
    )
    chosen = [row for row in rows if since is None or billing.issue_date_for(row.occurred_at, client.timezone) >= since]
    for row in chosen:
        await _make_real(store, row.key, client, now)
    log.info("backfill_done", client=client_key, events=len(chosen))
    return [row.key for row in chosen]


async def _make_real(store: Store, key: str, client: Client, now: datetime) -> None:
    effects, letters, events = table_of(EffectRow), table_of(DeadLetterRow), table_of(BillingEventRow)
    async with store.begin() as conn:
        effect = (await conn.execute(sa.select(effects).where(effects.c.key == key))).mappings().first()
        if effect is not None and effect["status"] == "simulated":
            await conn.execute(
                sa.update(effects)
                .where(effects.c.key == key)
                .values(
                    status="pending",
                    next_at=now,
                    updated_at=now,
                    payload=_redated(dict(effect["payload"]), client, now),
                )
            )
        await conn.execute(
            sa.update(letters)
            .where(letters.c.source == "manual_credit", letters.c.ref == key, letters.c.status == "simulated")
            .values(status="open", created_at=now)
        )
        await conn.execute(sa.update(events).where(events.c.key == key).values(simulated=False))
        outcomes = table_of(OutcomeRow)
        await conn.execute(
            sa.update(outcomes)
            .where(outcomes.c.key == f"simulated:{key}", outcomes.c.status == "open")
            .values(status="resolved", resolved_at=now)
        )


def _redated(payload: dict[str, Any], client: Client, now: datetime) -> dict[str, Any]:
    if not isinstance(payload.get("draft"), dict):
        return payload
    draft = dict(payload["draft"])
    issue = billing.issue_date_for(now, client.timezone)
    draft["issue_date"] = issue.isoformat()
    draft["due_date"] = (issue + timedelta(days=client.payment_terms_days)).isoformat()
    return {**payload, "draft": draft}
