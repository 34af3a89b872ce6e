"""Hours from the time tracker: stored time entries, rate cards, and what is unbilled.

An hourly engagement names its time-tracker project (``Engagement.time_project_id``,
mapped from a deal property). syncd reads the tracker's time entries incrementally
(:meth:`~syncd.core.interfaces.TimeTracker.time_entries` with ``updated_since``) into the
``time_entries`` table (:class:`~syncd.store.db.TimeEntryRow`), and the billing rules
(:func:`syncd.core.billing.cap_events`, :func:`syncd.core.billing.hours_draft`) read them from there.

**Invoiced once.** An entry an invoice bills is stamped with that invoice's billing-event
key in the same transaction that records the billing event (the ``on_recorded`` hook of
:meth:`syncd.engine.loop.Engine.queue_draft`, built by :func:`mark_invoiced`). The stamp is
never cleared or overwritten, and the hook refuses (rolling the whole transaction back)
when another event stamped one of the entries first, so two runs at once cannot bill the
same hours. Harvest cannot be told that time was invoiced from outside its own invoices:
its "update a time entry" call takes no ``is_billed``
(https://help.getharvest.com/api-v2/timesheets-api/timesheets/time-entries/#update-a-time-entry,
see ``connectors/harvest/connector.py``), so syncd's store is the only record of which
entries syncd invoiced; entries Harvest itself marks billed are never invoiced by syncd.

**Rates.** When the tracker also lists its project set-up (:class:`ProjectSetup`; Harvest
does), :func:`rate_card` builds a :class:`~syncd.core.billing.RateCard` from the project's
``bill_by``: the project's rate, the task assignments' rates, or the people's custom
rates. A person billed at their default rates is left to the rate the tracker holds on
each entry, because Harvest dates default rates (an entry keeps the rate of its day).
Harvest can also date a project's rate; the card holds the current one.

**Milestones.** A ``milestone`` engagement's milestone may name a task of the
engagement's tracker project: :func:`with_tracker_milestones` reads whether that task (or
the whole project) is archived into the milestone's ``done_at`` before the pure rules run.

Limits: the tracker's ``updated_since`` feed does not report deleted entries, so an entry
deleted at the tracker stays in the table (and in ``syncd unbilled``) until it is removed
by hand; a running timer's entry is billed with the hours it had when read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol, runtime_checkable

import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from syncd.core import billing
from syncd.core.errors import RetriableError
from syncd.core.interfaces import OVER_CAP_SUFFIX, Engagement, EngagementType, Milestone, TimeEntry, TimeTracker
from syncd.engine.runtime import Pipeline, Runtime
from syncd.store.db import BillingEventRow, CursorRow, EngagementRow, Store, TimeEntryRow, decimal_text, table_of

log = structlog.get_logger("syncd.engine.hours")

TIME_ENTRIES = "time_entries"
"""The cursor stream of a tracker's time entries (beside its change feed, ``changes``)."""

PAGE_SIZE = 200
"""Tracker projects read per page by :func:`unbilled` (keyset pagination: ``Store.values_pages``)."""

OVERLAP = timedelta(minutes=5)
"""Each read starts this long before the newest ``updated_at`` seen, so an entry the
tracker saved while the previous read was paging is still read."""


@runtime_checkable
class ProjectSetup(Protocol):
    """A time tracker that also lists projects and their rate assignments (Harvest does).

    The records are the tracker's own payloads; :func:`rate_card` reads the Harvest API v2
    fields named in its docstring.
    """

    def projects(self, *, is_active: bool | None = None) -> AsyncIterator[Any]:
        """Every project."""
        ...

    def task_assignments(self, project_id: str) -> AsyncIterator[Any]:
        """A project's tasks with their rates."""
        ...

    def user_assignments(self, project_id: str) -> AsyncIterator[Any]:
        """A project's people with their rates."""
        ...


# ---------------------------------------------------------------------------
# Reading entries into the store
# ---------------------------------------------------------------------------


async def sync_entries(runtime: Runtime, connection: str, tracker: TimeTracker) -> set[str]:
    """Read the entries changed since the last read into the store.

    The cursor (``cursors`` row ``(connection, "time_entries")``) is the newest
    ``updated_at`` seen; each read starts :data:`OVERLAP` before it. An entry's data is
    refreshed; the invoice stamp is left as it is.

    Returns:
        the project ids of the entries read.
    """
    row = await runtime.store.get(CursorRow, connection, TIME_ENTRIES)
    since = datetime.fromisoformat(row.cursor) - OVERLAP if row is not None and row.cursor else None
    now = runtime.clock()
    entries = [entry async for entry in tracker.time_entries(since)]
    async with runtime.store.begin() as conn:
        for entry in entries:
            await runtime.store.upsert(TimeEntryRow, _entry_values(connection, entry, now), conn)
        newest = max((entry.updated_at for entry in entries), default=None)
        cursor = max(newest, datetime.fromisoformat(row.cursor)) if newest and row and row.cursor else newest
        values: dict[str, Any] = {"connection": connection, "stream": TIME_ENTRIES, "last_success_at": now}
        if cursor is not None:
            values["cursor"] = cursor.isoformat()
        await runtime.store.upsert(CursorRow, values, conn)
    if entries:
        log.info("time_entries_read", connection=connection, entries=len(entries))
    return {entry.project_id for entry in entries}


def _entry_values(connection: str, entry: TimeEntry, now: datetime) -> dict[str, Any]:
    return {
        "connection": connection,
        "entry_id": entry.id,
        "project_id": entry.project_id,
        "data": entry.model_dump(mode="json"),
        "updated_at": entry.updated_at,
        "fetched_at": now,
    }


async def stored_project(store: Store, connection: str, entry_id: str, updated_at: datetime) -> str | None:
    """The project of an entry when the store holds this version of it (or a newer one), else ``None``."""
    row = await store.get(TimeEntryRow, connection, entry_id)
    return str(row.project_id) if row is not None and row.updated_at >= updated_at else None


@dataclass(frozen=True, kw_only=True)
class ProjectHours:
    """The stored entries of one tracker project and which of them are invoiced.

    Attributes:
        entries: every entry of the project, invoiced or not.
        invoiced: ids of the entries stamped with an invoice key.
        keys: entry id → the billing-event key that invoiced it.
    """

    entries: tuple[TimeEntry, ...]
    invoiced: frozenset[str]
    keys: dict[str, str]


async def project_hours(store: Store, connection: str, project_id: str) -> ProjectHours:
    """The stored entries of ``project_id`` at ``connection``."""
    table = table_of(TimeEntryRow)
    rows = await store.select(
        TimeEntryRow, table.c.connection == connection, table.c.project_id == project_id, order_by=table.c.entry_id
    )
    keys: dict[str, str] = {}
    for row in rows:
        if row.invoice_key:
            keys[row.entry_id] = row.invoice_key
        if row.remainder_key:
            keys[row.entry_id + OVER_CAP_SUFFIX] = row.remainder_key
    entries = billing.split_entries(
        [TimeEntry.model_validate(row.data) for row in rows],
        billed={row.entry_id: Decimal(row.billed_hours) for row in rows if row.billed_hours is not None},
        released={row.entry_id for row in rows if row.released_at is not None},
    )
    return ProjectHours(entries=tuple(entries), invoiced=frozenset(keys), keys=keys)


def mark_invoiced(
    store: Store,
    connection: str,
    key: str,
    entry_ids: Collection[str],
    now: datetime,
    split: Mapping[str, Decimal] | None = None,
) -> Callable[[AsyncConnection], Awaitable[None]]:
    """The ``on_recorded`` hook that stamps ``entry_ids`` with the billing-event ``key``.

    An entry in ``split`` is stamped with the hours billed (the part under a cap); an
    id ending in :data:`~syncd.core.interfaces.OVER_CAP_SUFFIX` stamps the rest of such an
    entry. Each part is stamped at most once.

    Raises (inside the caller's transaction, which then rolls back):
        RetriableError: an entry was stamped by another event meanwhile; computing
            again from the store drafts the hours that are left.
    """
    table = table_of(TimeEntryRow)
    split = split or {}
    whole = sorted(entry for entry in entry_ids if not entry.endswith(OVER_CAP_SUFFIX) and entry not in split)
    rests = sorted(entry.removesuffix(OVER_CAP_SUFFIX) for entry in entry_ids if entry.endswith(OVER_CAP_SUFFIX))
    mine = sa.and_(table.c.connection == connection, table.c.invoice_key.is_(None))

    async def stamp(conn: AsyncConnection) -> None:
        stamped = (
            await conn.execute(
                sa.update(table).where(mine, table.c.entry_id.in_(whole)).values(invoice_key=key, invoiced_at=now)
            )
        ).rowcount
        for entry_id, part in sorted(split.items()):
            stamped += (
                await conn.execute(
                    sa.update(table)
                    .where(mine, table.c.entry_id == entry_id)
                    .values(invoice_key=key, invoiced_at=now, billed_hours=decimal_text(part))
                )
            ).rowcount
        stamped += (
            await conn.execute(
                sa.update(table)
                .where(table.c.connection == connection, table.c.entry_id.in_(rests))
                .where(table.c.invoice_key.is_not(None), table.c.remainder_key.is_(None))
                .values(remainder_key=key)
            )
        ).rowcount
        if stamped != len(entry_ids):
            raise RetriableError(
                f"{len(entry_ids) - stamped} of {len(entry_ids)} time entries were invoiced by another billing "
                "event meanwhile; the hours left are drafted again on the next run",
                place=f"{connection}: billing event {key}",
            )

    return stamp


# ---------------------------------------------------------------------------
# Project set-up: rates and budget
# ---------------------------------------------------------------------------


async def _project(tracker: ProjectSetup, project_id: str) -> Any | None:
    """The project with that id; every page is read (a generator left open is not closed in time)."""
    found = None
    async for project in tracker.projects():
        if str(project.id) == project_id:
            found = project
    return found


async def rate_card(tracker: TimeTracker, project_id: str) -> billing.RateCard:
    """The rates of one tracker project, by its ``bill_by`` (Harvest API v2).

    The field descriptions quoted below are the reference's, as also carried by
    ``specs/harvest/harvest-openapi.yaml``.

    * ``Project``: the project's ``hourly_rate`` ("Rate for projects billed by Project
      Hourly Rate",
      https://help.getharvest.com/api-v2/projects-api/projects/projects/#the-project-object);
    * ``Tasks``: each task assignment's ``hourly_rate`` ("Rate used when the project's
      bill_by is Tasks",
      https://help.getharvest.com/api-v2/projects-api/projects/task-assignments/#the-task-assignment-object);
    * ``People``: each user assignment's ``hourly_rate`` where ``use_default_rates`` is
      false ("Custom rate used when the project's bill_by is People and
      use_default_rates is false",
      https://help.getharvest.com/api-v2/projects-api/projects/user-assignments/#the-user-assignment-object).

    A tracker that does not list its set-up gives an empty card (the engagement's rate,
    then the entry's, apply).
    """
    if not isinstance(tracker, ProjectSetup):
        return billing.RateCard()
    project = await _project(tracker, project_id)
    if project is None:
        return billing.RateCard()
    if project.bill_by == "Project" and project.hourly_rate is not None:
        return billing.RateCard(projects={project_id: Decimal(project.hourly_rate)})
    if project.bill_by == "Tasks":
        tasks = {
            a.task.name: Decimal(a.hourly_rate)
            async for a in tracker.task_assignments(project_id)
            if a.hourly_rate is not None and a.task.name
        }
        return billing.RateCard(tasks=tasks)
    if project.bill_by == "People":
        people = {
            a.user.name: Decimal(a.hourly_rate)
            async for a in tracker.user_assignments(project_id)
            if not a.use_default_rates and a.hourly_rate is not None and a.user.name
        }
        return billing.RateCard(people=people)
    return billing.RateCard()


async def with_tracker_cap(tracker: TimeTracker, engagement: Engagement) -> Engagement:
    """``engagement`` with ``cap_hours`` from its project's budget when it says so.

    Only a budget in hours counts: Harvest's ``budget`` is "The budget in hours for the
    project when budgeting by time" (``budget_by`` ``project``;
    https://help.getharvest.com/api-v2/projects-api/projects/projects/#the-project-object).
    Without such a budget the engagement keeps its own ``cap_hours``.
    """
    if not engagement.cap_from_tracker or engagement.time_project_id is None or not isinstance(tracker, ProjectSetup):
        return engagement
    project = await _project(tracker, engagement.time_project_id)
    if project is None or project.budget_by != "project" or project.budget is None:
        log.warning("tracker_budget_missing", engagement=engagement.key, project=engagement.time_project_id)
        return engagement
    return engagement.model_copy(update={"cap_hours": Decimal(project.budget)})


async def with_tracker_milestones(tracker: TimeTracker, engagement: Engagement, *, now: datetime) -> Engagement:
    """``engagement`` with the ``done_at`` of its tracker milestones read from its project.

    A :class:`~syncd.core.interfaces.Milestone` that names a tracker task (or says
    ``project_archived``) is done when, on the project ``time_project_id``, that task's
    assignment is archived or the project is: ``is_active`` false on the task
    assignment ("Whether the task assignment is active or archived",
    https://help.getharvest.com/api-v2/projects-api/projects/task-assignments/#the-task-assignment-object)
    or on the project (https://help.getharvest.com/api-v2/projects-api/projects/projects/#the-project-object).
    It is done at the record's ``updated_at`` ("Date and time the task assignment was
    last updated"), else at ``now`` when the record carries none. While the record is
    active, or missing, ``done_at`` is ``None``, whatever the source said. Other
    milestones keep their mapped ``done_at``. The billing key stays the milestone's id,
    so a milestone invoices once whatever says it is done.
    """
    wanted = [m for m in engagement.milestones if m.from_tracker]
    if engagement.type is not EngagementType.MILESTONE or not wanted:
        return engagement
    project_id = engagement.time_project_id
    if project_id is None or not isinstance(tracker, ProjectSetup):
        log.warning("milestones_not_read", engagement=engagement.key, reason="no project or the tracker lists none")
        return engagement
    project = await _project(tracker, project_id)
    if project is None:
        log.warning("tracker_project_missing", engagement=engagement.key, project=project_id)
    tasks: dict[str, Any] = {}
    if project is not None and any(m.tracker_done_when == "task_inactive" for m in wanted):
        tasks = {str(a.task.id): a async for a in tracker.task_assignments(project_id)}
    milestones = tuple(
        m.model_copy(update={"done_at": _tracker_done_at(m, project, tasks, now)}) if m.from_tracker else m
        for m in engagement.milestones
    )
    return engagement.model_copy(update={"milestones": milestones})


def _tracker_done_at(
    milestone: Milestone, project: Any | None, tasks: dict[str, Any], now: datetime
) -> datetime | None:
    """When the tracker record behind ``milestone`` was archived (``None``: it is not)."""
    archived = milestone.tracker_done_when == "project_archived"
    record = project if archived else tasks.get(str(milestone.tracker_task_id))
    if record is None or record.is_active:
        return None
    # Read with getattr: connectors/harvest/models.py's HarvestTaskAssignment does not
    # parse ``updated_at`` yet, though Harvest sends it (the page cited above).
    stamp = getattr(record, "updated_at", None)
    return stamp if isinstance(stamp, datetime) else now


# ---------------------------------------------------------------------------
# Unbilled hours
# ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Unbilled:
    """Billable hours of one tracker project that are on no invoice.

    Attributes:
        connection: the time tracker connection.
        project_id: the tracker's project id.
        client_key: the client the linked engagement bills (``None``: no engagement
            links the project, so syncd does not bill it).
        engagement_key: the linked hourly engagement.
        hours: billable hours on no invoice (simulated pilot invoices included).
        amount: what they are worth at the engagement's rates, rounded per line as an
            invoice would be (``None`` without an engagement).
        currency: the engagement's currency.
        simulated_hours: of ``hours``, those only on simulated (pilot) invoices.
        over_cap_hours: of ``hours``, those held because they are over the engagement's
            cap (reason ``over_cap``): billed once the cap is raised or they are released.
        over_cap_entries: the ids to pass to ``syncd hours release``.
    """

    connection: str
    project_id: str
    client_key: str | None
    engagement_key: str | None
    hours: Decimal
    amount: Decimal | None
    currency: str | None
    simulated_hours: Decimal = Decimal(0)
    over_cap_hours: Decimal = Decimal(0)
    over_cap_entries: tuple[str, ...] = ()


async def unbilled(runtime: Runtime, *, page_size: int = PAGE_SIZE) -> list[Unbilled]:
    """Every tracker project with billable hours on no (real) invoice, per client and project.

    Only projects with an entry that may be open are read (:func:`maybe_open`, in SQL), a
    page of ``page_size`` projects at a time; a project whose hours are all invoiced is
    never loaded.

    Raises:
        ValidationFailed: an entry of a linked project has no rate.
    """
    found: list[Unbilled] = []
    for pipeline in runtime.pipelines:
        if pipeline.time_tracker is None or pipeline.time_tracking_name is None:
            continue
        found += await _pipeline_unbilled(
            runtime, pipeline, pipeline.time_tracker, pipeline.time_tracking_name, page_size
        )
    return sorted(found, key=lambda item: (item.client_key or "~", item.project_id))


def maybe_open(connection: str) -> Any:
    """The entries of ``connection`` that may hold hours on no real invoice (a SQL condition).

    Not stamped, stamped by a simulated (pilot) billing event, or billed only up to a cap
    with the rest not (really) invoiced. Whether an entry is billable, and its hours, are
    read from its data afterwards; this only keeps fully invoiced projects unread.
    """
    table, events = table_of(TimeEntryRow), table_of(BillingEventRow)
    simulated = sa.select(events.c.key).where(events.c.simulated.is_(True))
    rest_open = sa.and_(
        table.c.billed_hours.is_not(None),
        sa.or_(table.c.remainder_key.is_(None), table.c.remainder_key.in_(simulated)),
    )
    return sa.and_(
        table.c.connection == connection,
        sa.or_(table.c.invoice_key.is_(None), table.c.invoice_key.in_(simulated), rest_open),
    )


async def _pipeline_unbilled(
    runtime: Runtime, pipeline: Pipeline, tracker: TimeTracker, connection: str, page_size: int
) -> list[Unbilled]:
    store = runtime.store
    found = []
    column = table_of(TimeEntryRow).c.project_id
    async for projects in store.values_pages(column, maybe_open(connection), size=page_size):
        linked = await linked_engagements(store, pipeline, projects)
        for project_id in projects:
            hours = await project_hours(store, connection, project_id)
            simulated = await _simulated(store, hours.keys.values())
            open_entries = [
                entry
                for entry in _billable(hours.entries)
                if entry.id not in hours.invoiced or hours.keys[entry.id] in simulated
            ]
            if open_entries:
                engagement = linked.get(project_id)
                found.append(await _unbilled_line(tracker, connection, project_id, engagement, open_entries, hours))
    return found


async def _simulated(store: Store, keys: Iterable[str]) -> set[str]:
    """Which of ``keys`` are simulated (pilot) billing events."""
    rows = await store.select_in(BillingEventRow, "key", keys, table_of(BillingEventRow).c.simulated.is_(True))
    return {row.key for row in rows}


async def _unbilled_line(
    tracker: TimeTracker,
    connection: str,
    project_id: str,
    engagement: Engagement | None,
    entries: list[TimeEntry],
    hours: ProjectHours,
) -> Unbilled:
    amount = None
    held: list[TimeEntry] = []
    if engagement is not None:
        lines = billing.hours_lines(engagement, entries, await rate_card(tracker, project_id))
        amount = sum((line.amount(engagement.currency) for line in lines), Decimal(0))
        held = billing.held_over_cap(engagement, hours.entries, hours.invoiced)
    return Unbilled(
        over_cap_hours=sum((entry.hours for entry in held), Decimal(0)),
        over_cap_entries=tuple(entry.id.removesuffix(OVER_CAP_SUFFIX) for entry in held),
        connection=connection,
        project_id=project_id,
        client_key=engagement.client_key if engagement is not None else None,
        engagement_key=engagement.key if engagement is not None else None,
        hours=sum((entry.hours for entry in entries), Decimal(0)),
        amount=amount,
        currency=engagement.currency if engagement is not None else None,
        simulated_hours=sum((entry.hours for entry in entries if entry.id in hours.invoiced), Decimal(0)),
    )


def _billable(entries: Iterable[TimeEntry]) -> list[TimeEntry]:
    return [entry for entry in entries if entry.billable and entry.hours > 0 and not entry.invoiced]


async def release_over_cap(store: Store, connection: str, entry_id: str, now: datetime) -> bool:
    """Let the hours of ``entry_id`` held over a cap be billed (``syncd hours release``).

    The rest of an entry billed up to the cap, or an entry held whole, is billed by the
    next hours invoice of its engagement although the cap is reached.

    Returns:
        whether an entry was found to release.
    """
    table = table_of(TimeEntryRow)
    async with store.begin() as conn:
        result = await conn.execute(
            sa.update(table)
            .where(table.c.connection == connection, table.c.entry_id == entry_id, table.c.released_at.is_(None))
            .values(released_at=now)
        )
    return bool(result.rowcount)


async def hourly_engagements(store: Store, crm: str, project_ids: Collection[str]) -> list[EngagementRow]:
    """The stored hourly engagements of ``crm`` that bill one of ``project_ids``, by key.

    The project is read from the engagement's JSON in SQL (``data.time_project_id``:
    ``json_extract`` on SQLite, ``->>`` on PostgreSQL), so only those rows are loaded.
    """
    table = table_of(EngagementRow)
    project = table.c.data["time_project_id"].as_string()
    wanted = sorted(set(project_ids))
    found: list[EngagementRow] = []
    for start in range(0, len(wanted), 500):  # under every driver's limit on bound parameters
        found += await store.select(
            EngagementRow,
            table.c.type == str(EngagementType.HOURLY),
            table.c.crm_connection == crm,
            project.in_(wanted[start : start + 500]),
        )
    return sorted(found, key=lambda row: row.key)


async def linked_engagements(store: Store, pipeline: Pipeline, project_ids: Collection[str]) -> dict[str, Engagement]:
    """The pipeline's hourly engagements billing ``project_ids``, by the tracker project they bill."""
    rows = await hourly_engagements(store, pipeline.crm_name, project_ids)
    linked: dict[str, Engagement] = {}
    for row in rows:
        engagement = Engagement.model_validate(row.data)
        if engagement.time_project_id is not None:
            linked.setdefault(engagement.time_project_id, engagement)
    return linked
