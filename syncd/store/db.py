"""Every piece of syncd's state: SQLModel tables and the queries on them.

SQLite (WAL) is the embedded default; PostgreSQL lets several replicas share the work.
Work rows (events in the inbox, effects in the outbox) are *claimed* with a lease:

* a claim sets ``lease_owner``/``lease_until`` and increments ``attempts`` in one
  ``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING``
  (SQLite has no row locks; its single writer serialises claims instead);
* a worker that dies leaves its lease to expire, and the row is claimed again;
* a late writer whose lease expired is *fenced*: it finishes a row only
  ``WHERE attempts = <the attempt it claimed>``, so a newer claim wins.

The schema evolves with Alembic (``syncd/store/migrations``); :meth:`Store.migrate` runs the
migrations under a database lock (a PostgreSQL advisory lock; SQLite's write lock).
Timestamps are stored in UTC and come back aware; money is stored as decimal text.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import threading
from collections.abc import AsyncIterator, Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import sqlalchemy as sa
import structlog
from alembic import command
from alembic.config import Config as AlembicConfig
from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import event
from sqlmodel import JSON, Column, Field, SQLModel

from syncd.core.errors import ConfigError
from syncd.core.interfaces import ChangeHint, SourceRecord
from syncd.plumbing.logging import redact_value
from syncd.plumbing.logging import scrub as redact_text

log = structlog.get_logger("syncd.store")

MIGRATIONS = Path(__file__).parent / "migrations"
ADVISORY_LOCK_ID = 7_254_001  # any constant shared by every replica
SQLITE_BUSY_MS = 30_000  # SQLite: how long a write waits for another process's write lock
CHECKPOINT_EVERY = 200  # SQLite: write commits between WAL checkpoints (Store._checkout)
GROUP_MAX = 32  # SQLite: write units committed together at most (Store._connection, group commit)
GROUP_AGE_S = 0.02  # SQLite: a group older than this is committed before another unit joins
_UNCOUNTED: ContextVar[bool] = ContextVar("syncd_store_uncounted", default=False)
T = TypeVar("T")


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """A datetime stored as UTC and always returned timezone-aware."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; syncd stores aware datetimes only")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _ts(nullable: bool = False, index: bool = False) -> Any:
    return Field(default=None, sa_column=Column(UTCDateTime(), nullable=nullable, index=index))


def _json(nullable: bool = True) -> Any:
    return Field(default=None, sa_column=Column(JSON, nullable=nullable))


class MetaRow(SQLModel, table=True):
    """Key/value facts about the database itself (``created_at``, ``billing_start``)."""

    __tablename__ = "meta"
    key: str = Field(primary_key=True)
    value: str


class EventRow(SQLModel, table=True):
    """The inbox: one change hint per (connection, vendor event id)."""

    __tablename__ = "events"
    __table_args__ = (
        sa.UniqueConstraint("connection", "event_id", name="uq_events_connection_event_id"),
        sa.Index("ix_events_claim", "status", "next_at"),
    )
    id: int | None = Field(default=None, primary_key=True)
    connection: str
    object_type: str
    object_id: str
    event_id: str
    kind: str = ""
    version: str | None = None  # the record version the hint reports, if it says
    occurred_at: datetime = _ts()
    received_at: datetime = _ts()
    status: str = "pending"  # pending | done | dead
    attempts: int = 0
    first_attempt_at: datetime | None = _ts(nullable=True)  # give_up_after_s counts from here
    next_at: datetime = _ts()
    lease_owner: str | None = None
    lease_until: datetime | None = _ts(nullable=True)
    last_error: str | None = None


class EffectRow(SQLModel, table=True):
    """The outbox: one outbound call (or idempotent sequence of calls) per key."""

    __tablename__ = "effects"
    __table_args__ = (sa.Index("ix_effects_claim", "status", "next_at"),)
    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(unique=True)
    kind: str  # create_invoice | write_crm_status
    connection: str
    client_key: str | None = Field(default=None, index=True)
    payload: dict[str, Any] = _json(nullable=False)
    status: str = "pending"  # pending | done | dead | simulated
    attempts: int = 0
    first_attempt_at: datetime | None = _ts(nullable=True)  # give_up_after_s counts from here
    next_at: datetime = _ts()
    lease_owner: str | None = None
    lease_until: datetime | None = _ts(nullable=True)
    last_error: str | None = None
    result: dict[str, Any] | None = _json()
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class ClientRow(SQLModel, table=True):
    """The one billing record of a customer, with each system's id for it."""

    __tablename__ = "clients"
    key: str = Field(primary_key=True)
    legal_name: str
    data: dict[str, Any] = _json(nullable=False)
    external_ids: dict[str, str] = _json(nullable=False)
    updated_at: datetime = _ts()
    pushed: dict[str, Any] | None = _json()  # per connection: the details last written to its customer record
    record: dict[str, Any] | None = _json()  # the client record: field -> the value in force (syncd.engine.clients)
    seen: dict[str, Any] | None = _json()  # per connection: field -> the value last seen (or written) there


class EngagementRow(SQLModel, table=True):
    """How one deal bills, as last mapped."""

    __tablename__ = "engagements"
    key: str = Field(primary_key=True)
    client_key: str = Field(index=True)
    type: str
    crm_connection: str
    crm_object_id: str
    data: dict[str, Any] = _json(nullable=False)
    won_at: datetime | None = _ts(nullable=True)
    source_version: str = ""
    updated_at: datetime = _ts()


class BillingEventRow(SQLModel, table=True):
    """A reason to invoice; the key makes it happen once."""

    __tablename__ = "billing_events"
    key: str = Field(primary_key=True)
    kind: str
    engagement_key: str = Field(index=True)
    occurrence: str
    occurred_at: datetime = _ts()
    created_at: datetime = _ts()
    simulated: bool = False
    invoice_key: str | None = None  # the invoice that carries it (today: the event's own key)


class InvoiceRow(SQLModel, table=True):
    """An invoice (or credit note) syncd created, and its status at the tool."""

    __tablename__ = "invoices"
    key: str = Field(primary_key=True)  # the billing event key
    kind: str = "invoice"
    engagement_key: str = Field(index=True)
    client_key: str = Field(index=True)
    crm_connection: str
    crm_object_id: str = Field(index=True)
    invoicing_connection: str
    invoice_id: str = Field(index=True)
    number: str | None = None
    state: str
    currency: str
    total: str
    subtotal: str | None = None
    amount_due: str
    amount_paid: str = "0"
    due_date: date | None = None
    triggered_at: datetime = _ts()
    created_at: datetime = _ts()
    updated_at: datetime = _ts()
    totals_mismatch: str | None = None
    divergence: str | None = None
    source_updated_at: datetime | None = _ts(nullable=True)  # the ledger's last change, when it says
    issued_at: datetime | None = _ts(nullable=True)  # when the ledger first held it approved (payable)
    paid_on: date | None = None  # the day it was fully paid (the ledger's date, else the day syncd saw it)
    sent: dict[str, Any] | None = _json()  # what syncd sent: the draft as sent and the customer id
    document: dict[str, Any] | None = _json()  # the ledger's content as last read (LedgerDocument)
    last_payment_date: date | None = None  # the latest payment the ledger reports on it


class LedgerDocumentRow(SQLModel, table=True):
    """An invoice or credit note made by hand at the ledger for a client syncd knows.

    Kept only with ``[collections] track_ledger_documents``: the client is found by the
    document's contact (``clients.external_ids``). Its figures count in the client's
    company standing (:mod:`syncd.engine.collection`); syncd never changes the document.
    """

    __tablename__ = "ledger_documents"
    key: str = Field(primary_key=True)  # ledger:<connection>:<document id>
    connection: str
    document_id: str = Field(index=True)
    kind: str = "invoice"
    client_key: str = Field(index=True)
    number: str | None = None
    state: str
    currency: str
    total: str
    amount_due: str
    amount_paid: str = "0"
    due_date: date | None = None
    last_payment_date: date | None = None
    source_updated_at: datetime | None = _ts(nullable=True)
    updated_at: datetime = _ts()


class CompanyStandingRow(SQLModel, table=True):
    """What syncd last wrote onto a CRM company: its receivables, and why (the change's cause)."""

    __tablename__ = "company_standings"
    crm_connection: str = Field(primary_key=True)
    company_id: str = Field(primary_key=True)
    client_key: str = Field(index=True)
    figures: dict[str, Any] = _json(nullable=False)  # the property values written
    cause: str
    written_at: datetime = _ts()


class FollowUpTaskRow(SQLModel, table=True):
    """A CRM task syncd created to collect an overdue invoice: one per (document, step)."""

    __tablename__ = "follow_up_tasks"
    key: str = Field(primary_key=True)  # the effect key: task:<document key>:<step>
    document_key: str = Field(index=True)  # invoices.key or ledger_documents.key
    step: int
    crm_connection: str
    task_id: str
    subject: str
    body: str
    status: str = "open"  # open | completed | noted
    created_at: datetime = _ts()
    closed_at: datetime | None = _ts(nullable=True)


class AlertRow(SQLModel, table=True):
    """An alert waiting to be posted to ``[alerts].webhook_url`` (:mod:`syncd.engine.alerts`).

    Written in the transaction that records its cause where there is one (a dead letter,
    an outcome that needs attention), so no alert is lost to a crash; ``key`` makes
    recording idempotent. The sender claims due rows with a lease like the outbox.
    """

    __tablename__ = "alerts"
    __table_args__ = (sa.Index("ix_alerts_claim", "status", "next_at"),)
    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(unique=True)
    kind: str  # dead_letter | attention | auth_lost | vendor_errors | client_conflict | audit_trend
    title: str
    detail: str
    place: str | None = None
    connection: str | None = None
    status: str = "pending"  # pending | sent
    attempts: int = 0
    next_at: datetime = _ts()
    lease_owner: str | None = None
    lease_until: datetime | None = _ts(nullable=True)
    last_error: str | None = None
    created_at: datetime = _ts()
    sent_at: datetime | None = _ts(nullable=True)
    body: dict[str, Any] | None = _json()  # a message of its own (the monthly audit report); None: grouped


class VendorHealthRow(SQLModel, table=True):
    """Each connection's failing streak, shared by every replica (:class:`syncd.engine.alerts.VendorHealth`).

    ``failing_since`` is the first failure since the last success any replica reported
    (``None``: not failing); ``failures`` counts the streak's failures.
    """

    __tablename__ = "vendor_health"
    connection: str = Field(primary_key=True)
    failing_since: datetime | None = _ts(nullable=True)
    failures: int = 0
    last_error: str | None = None
    last_failure_at: datetime | None = _ts(nullable=True)
    last_success_at: datetime | None = _ts(nullable=True)


class CursorRow(SQLModel, table=True):
    """Where each connection's change feed was last read up to."""

    __tablename__ = "cursors"
    connection: str = Field(primary_key=True)
    stream: str = Field(primary_key=True)
    cursor: str | None = None
    last_success_at: datetime | None = _ts(nullable=True)
    last_error: str | None = None


class DeadLetterRow(SQLModel, table=True):
    """A record that cannot be processed: why, where, and how to replay it."""

    __tablename__ = "dead_letters"
    id: int | None = Field(default=None, primary_key=True)
    source: str  # event | effect | webhook
    ref: str  # the event/effect id, or the webhook connection
    connection: str
    reason: str
    place: str | None = None
    payload: dict[str, Any] | None = _json()
    status: str = Field(default="open", index=True)  # open | replayed | dismissed | simulated (a pilot's credit)
    created_at: datetime = _ts()
    replayed_at: datetime | None = _ts(nullable=True)
    dismissed_at: datetime | None = _ts(nullable=True)  # a person closed it without a replay
    dismissed_by: str | None = None
    dismissed_why: str | None = None


class TokenRow(SQLModel, table=True):
    """A connection's OAuth tokens, encrypted at rest (Fernet)."""

    __tablename__ = "oauth_tokens"
    connection: str = Field(primary_key=True)
    ciphertext: str
    version: int = 0
    updated_at: datetime = _ts()


class SourceRecordRow(SQLModel, table=True):
    """The last-seen copy of each source record (for preview and simulate; not the truth)."""

    __tablename__ = "source_records"
    connection: str = Field(primary_key=True)
    object_type: str = Field(primary_key=True)
    object_id: str = Field(primary_key=True)
    version: str
    data: dict[str, Any] = _json(nullable=False)
    fetched_at: datetime = _ts()

    def as_record(self) -> SourceRecord:
        """The stored copy as a record (its fetch time stands in for the source's modification time)."""
        return SourceRecord(
            connection=self.connection,
            object_type=self.object_type,
            object_id=self.object_id,
            version=self.version,
            modified_at=self.fetched_at,
            data=self.data if isinstance(self.data, Mapping) else {},
        )


class TickRow(SQLModel, table=True):
    """One row per (job, window): a scheduler tick runs once across replicas."""

    __tablename__ = "ticks"
    job: str = Field(primary_key=True)
    window: str = Field(primary_key=True)
    owner: str
    started_at: datetime = _ts()


class TimeEntryRow(SQLModel, table=True):
    """A time entry read from a time tracker, and the billing event that invoiced it.

    ``data`` is the canonical :class:`~syncd.core.interfaces.TimeEntry`, refreshed on every
    read; ``invoice_key`` is set once, in the transaction that records the billing
    event, and never cleared or overwritten, so an entry is invoiced at most once.
    """

    __tablename__ = "time_entries"
    connection: str = Field(primary_key=True)
    entry_id: str = Field(primary_key=True)
    project_id: str = Field(index=True)
    data: dict[str, Any] = _json(nullable=False)
    updated_at: datetime = _ts()  # the tracker's last change
    fetched_at: datetime = _ts()
    invoice_key: str | None = Field(default=None, index=True)
    invoiced_at: datetime | None = _ts(nullable=True)
    billed_hours: str | None = None  # set when only the part under a cap was invoiced by invoice_key
    remainder_key: str | None = None  # the billing event that invoiced the rest, once released
    released_at: datetime | None = _ts(nullable=True)  # an admin released the rest past the cap


class OutcomeRow(SQLModel, table=True):
    """A trigger that ended without an invoice, or an invoice that needs a person.

    ``kind`` is ``skip`` (a recorded reason not to invoice: before ``billing_start``,
    outside every pipeline, not won any more, nothing to bill ...), ``simulated`` (a
    client outside the pilot: the event is recorded, nothing is sent) or ``attention``
    (an outcome a person must act on: an invoiced deal that left the won stage, a
    missing required PO number, a credit left unallocated ...). ``key`` makes
    recording idempotent: the same trigger records one outcome however often it is seen.
    ``trigger_at`` is when the reason arose at the source, ``billing_event_key`` the
    billing event it belongs to, where there is one.
    """

    __tablename__ = "outcomes"
    __table_args__ = (sa.Index("ix_outcomes_kind_status", "kind", "status"),)
    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(unique=True)
    kind: str  # skip | simulated | attention
    reason: str  # a stable snake_case code, e.g. before_billing_start
    detail: str
    place: str | None = None
    connection: str | None = None
    object_type: str | None = None
    object_id: str | None = None
    engagement_key: str | None = Field(default=None, index=True)
    client_key: str | None = None
    billing_event_key: str | None = None
    trigger_at: datetime | None = _ts(nullable=True)
    status: str = "open"  # open | resolved (attention); skips stay open: they are a record
    created_at: datetime = _ts()
    resolved_at: datetime | None = _ts(nullable=True)


class InvoiceTrailRow(SQLModel, table=True):
    """One step in an invoice's life after syncd sent it: the ledger's answers, status changes, corrections.

    ``kind`` is ``sent`` (what syncd sent, and the ledger's first answer), ``status``
    (a state change read at the ledger), ``correction`` (a change made at the ledger
    by hand: ``classes`` says what changed, ``detail`` how), ``void`` (voided by syncd),
    ``reissue`` (a document issued by hand after a hand void). ``key`` makes recording
    idempotent. Rows are never deleted, so the trail outlives the 13 months the audit
    compares (docs/operations.md, "Audit").
    """

    __tablename__ = "invoice_trail"
    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(unique=True)
    invoice_key: str = Field(index=True)
    kind: str
    actor: str  # syncd | ledger | person
    summary: str
    classes: str | None = None  # a correction's classes, comma-separated (lines, amounts, terms, contact, tax ...)
    detail: dict[str, Any] | None = _json()
    at: datetime = _ts()


class PendingAlertRow(SQLModel, table=True):
    """An alert-worthy event waiting for a sender: the hook an alert channel reads.

    syncd records these (an audit trend flag, a client record conflict) and does not
    send them itself; a sender lists the rows with ``sent_at`` unset
    (:meth:`Store.pending_alerts`), delivers them and marks them (:meth:`Store.mark_alerts_sent`).
    ``key`` makes recording idempotent.
    """

    __tablename__ = "pending_alerts"
    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(unique=True)
    source: str  # audit | client
    title: str
    text: str
    fields: dict[str, Any] | None = _json()
    created_at: datetime = _ts()
    sent_at: datetime | None = _ts(nullable=True)


class ClientChangeRow(SQLModel, table=True):
    """The client record's change log: a field changed at a system, or written there by syncd."""

    __tablename__ = "client_changes"
    id: int | None = Field(default=None, primary_key=True)
    client_key: str = Field(index=True)
    system: str  # the connection (hubspot, xero)
    field: str
    old: Any = _json()
    new: Any = _json()
    by: str  # seen (changed at the system) | syncd (written by syncd) | resolve (a conflict resolved)
    at: datetime = _ts()


class ClientConflictRow(SQLModel, table=True):
    """A client detail changed at a system that does not own it, to a value the owner does not hold."""

    __tablename__ = "client_conflicts"
    id: int | None = Field(default=None, primary_key=True)
    client_key: str = Field(index=True)
    field: str
    owner: str  # the owning connection
    other: str  # the connection where it was changed
    owner_value: Any = _json()
    other_value: Any = _json()
    status: str = "open"  # open | resolved
    opened_at: datetime = _ts()
    resolved_at: datetime | None = _ts(nullable=True)
    resolution: str | None = None


class RateBudgetRow(SQLModel, table=True):
    """A vendor rate budget shared by replicas: when its next request may go out.

    ``key`` names the budget (connection and bucket, ``xero:default``); ``next_at_s``
    is the start of the first free slot, in seconds since the epoch.
    """

    __tablename__ = "rate_budgets"
    key: str = Field(primary_key=True)
    next_at_s: float = Field(sa_column=Column(sa.Double(), nullable=False))


Row = TypeVar("Row", EventRow, EffectRow, AlertRow)


@dataclass(frozen=True, kw_only=True)
class Settle:
    """How to settle a claimed row (:meth:`Store.finish`), to be done in a later transaction."""

    model: type[EventRow] | type[EffectRow] | type[AlertRow]
    row: EventRow | EffectRow | AlertRow
    status: str
    now: datetime
    error: str | None = None
    next_at: datetime | None = None
    result: Mapping[str, Any] | None = None


class Claimed(NamedTuple):
    """What :meth:`Store.claim_work` claimed, and the rows it could not settle (claimed again meanwhile)."""

    events: list[EventRow]
    effects: list[EffectRow]
    fenced: list[EventRow | EffectRow | AlertRow]


@dataclass(kw_only=True)
class MetricCounts:
    """The counts ``/metrics`` shows from the database (:meth:`Store.metric_counts`).

    Attributes:
        backlog: (queue, status) → rows: events and effects pending or dead, open dead letters,
            alerts waiting to be posted (``pending``) and those whose delivery failed (``failed``).
        outcomes: (kind, reason) → open outcomes.
        dead_letters: source → open dead letters.
        skips: reason → recorded skips, open or not.
    """

    backlog: dict[tuple[str, str], int] = field(default_factory=dict)
    outcomes: dict[tuple[str, str], int] = field(default_factory=dict)
    dead_letters: dict[str, int] = field(default_factory=dict)
    skips: dict[str, int] = field(default_factory=dict)


def table_of(model: type[SQLModel]) -> sa.Table:
    """The SQLAlchemy table behind a SQLModel table class."""
    table = getattr(model, "__table__", None)
    if not isinstance(table, sa.Table):
        raise TypeError(f"{model.__name__} is not a table model")
    return table


def async_url(url: str) -> str:
    """The async driver URL for a configured ``database_url`` (``syncd db copy`` reads its source with it)."""
    if url.startswith("sqlite:"):
        return url.replace("sqlite:", "sqlite+aiosqlite:", 1)
    if url.startswith(("postgresql:", "postgres:")):
        return "postgresql+psycopg:" + url.split(":", 1)[1]
    return url


def sync_url(url: str) -> str:
    """The synchronous driver URL for a configured ``database_url`` (the store's engine)."""
    if url.startswith("sqlite+aiosqlite:"):
        return url.replace("sqlite+aiosqlite:", "sqlite:", 1)
    if url.startswith(("postgresql:", "postgres:")):
        return "postgresql+psycopg:" + url.split(":", 1)[1]
    return url


def decimal_text(value: Decimal) -> str:
    """Money as stored: plain decimal text, never float."""
    return format(value, "f")


class _Turns:
    """SQLite: the one connection, held by one task at a time, first come first served.

    An ``asyncio.Lock`` that tells whether it is held once given up, so that the store
    commits a group of units (:class:`_Group`) only when nobody is about to join it.
    """

    def __init__(self) -> None:
        self.held = False
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()

    async def take(self, *, on_abandon: Callable[[], None]) -> None:
        """Wait for the turn; ``on_abandon`` passes it on if it was given to a caller cancelled meanwhile."""
        if not self.held and not self._waiting:
            self.held = True
            return
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                on_abandon()  # it was ours already
            else:
                with contextlib.suppress(ValueError):
                    self._waiting.remove(turn)
            raise

    def give(self) -> None:
        """Hand the turn to the next caller in line, or free it."""
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.held = False


class _Group:
    """SQLite: one write transaction kept open while more write units queue for it (group commit).

    Each unit after the first runs in a savepoint of its own (undone alone on its error)
    and waits for the group's ``COMMIT`` before its caller goes on, so nothing is reported
    stored that is not: the same promise as a transaction per unit, for one ``COMMIT``
    per group (BENCHMARKS.md, "Group commit").
    """

    def __init__(self, conn: sa.Connection, started: float) -> None:
        self.conn = conn
        self.started = started
        self.units: list[asyncio.Future[None]] = []

    def joinable(self) -> bool:
        """Whether another unit may join (the group is neither full nor old)."""
        age = asyncio.get_running_loop().time() - self.started
        return len(self.units) < GROUP_MAX and age < GROUP_AGE_S

    def add(self) -> asyncio.Future[None]:
        """A unit done in the group: the future it waits on until the group commits."""
        done = asyncio.get_running_loop().create_future()
        self.units.append(done)
        return done

    def settle(self, error: BaseException | None) -> None:
        """The group's outcome, told to each unit still waiting for it."""
        for done in self.units:
            if done.done():
                continue
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)


class Connection:
    """A connection of the store inside one transaction, with the async calls syncd makes on it.

    Statements are SQLAlchemy Core; results come back whole (no server-side cursors).
    On SQLite a statement runs on the event loop's thread: the one statement that may
    wait (``BEGIN IMMEDIATE``, for another process's write lock) was run on a worker
    thread when the transaction began, and the rest are in-memory or page-cache work
    that a thread would run while holding the GIL anyway. On PostgreSQL, which answers
    over the network, each statement runs on a worker thread (BENCHMARKS.md, "Store").

    Attributes:
        sync: the underlying synchronous SQLAlchemy connection.
    """

    def __init__(self, sync: sa.Connection, *, inline: bool) -> None:
        self.sync = sync
        self._inline = inline

    async def call(self, work: Callable[[sa.Connection], T]) -> T:
        """Run ``work`` on the synchronous connection: several statements for the price of one."""
        if self._inline:
            return work(self.sync)
        return await asyncio.to_thread(work, self.sync)

    async def execute(self, statement: Any, parameters: Any = None) -> sa.CursorResult[*tuple[Any, ...]]:
        """Execute one statement (``parameters``: a mapping, or a list of them for many rows)."""
        return await self.call(lambda conn: conn.execute(statement, parameters))

    async def scalar(self, statement: Any, parameters: Any = None) -> Any:
        """The first column of the first row, or ``None``."""
        return await self.call(lambda conn: conn.execute(statement, parameters).scalar())

    async def exec_driver_sql(self, sql: str) -> sa.CursorResult[*tuple[Any, ...]]:
        """Execute a literal SQL string."""
        return await self.call(lambda conn: conn.exec_driver_sql(sql))

    async def run_sync(self, work: Callable[[sa.Connection], T]) -> T:
        """Run ``work`` on the synchronous connection on a worker thread (inspection, migrations)."""
        return await asyncio.to_thread(work, self.sync)

    @contextlib.asynccontextmanager
    async def savepoint(self) -> AsyncIterator[Connection]:
        """A savepoint inside this transaction: what runs in it is undone alone on an error (re-raised).

        For work done many at a time in one transaction (the recurring tick's pages), where
        one item's failure must not undo the others'.
        """
        nested = await self.call(lambda conn: conn.begin_nested())
        try:
            yield self
        except BaseException:
            await self.call(lambda _conn: nested.rollback())
            raise
        await self.call(lambda _conn: nested.commit())


class Store:
    """Async access to the database, over a synchronous SQLAlchemy engine.

    The API is async; underneath, each of the store's own operations runs as one
    synchronous unit (on PostgreSQL on a worker thread: one hand-off per transaction),
    and a transaction a caller holds (:meth:`begin`) runs its statements as
    :class:`Connection` describes. SQLite has one connection per process: callers queue
    for it in order (:class:`_Turns`), never in SQLite's busy handler, and nothing may ask
    for a second connection while holding one; write units queued behind one another
    share one transaction (group commit, :class:`_Group`). Measured against SQLAlchemy's async engine over
    aiosqlite and psycopg's async connection in BENCHMARKS.md ("Store").

    Args:
        engine: a synchronous ``Engine`` built by :meth:`open`.
    """

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.is_postgres = engine.dialect.name == "postgresql"
        self._inline = not self.is_postgres
        self._turns = _Turns()  # SQLite: the one connection, taken in order
        self._group: _Group | None = None  # SQLite: the write transaction units are joining
        self._statements: dict[Hashable, Any] = {}  # built once, executed with parameters (_prepared)
        self._holder: asyncio.Task[Any] | None = None  # the task holding it
        self._locks: dict[str, asyncio.Lock] = {}
        self._transactions = 0
        self._count_lock = threading.Lock()
        self._commits = 0  # SQLite: write commits since the last WAL checkpoint
        self.alerting = False  # record alerts beside their causes ([alerts] webhook_url is set)
        event.listen(engine, "begin", self._count_transaction)

    @property
    def transactions(self) -> int:
        """Transactions begun by this store since it was opened, reads and empty claims included.

        A group of SQLite write units (group commit) is one transaction: its units'
        savepoints are not counted. Exposed as ``syncd_db_transactions_total`` on ``/metrics``; the end-to-end
        benchmark divides it by the deals invoiced (BENCHMARKS.md).
        """
        return self._transactions

    def _count_transaction(self, _conn: Any) -> None:
        if _UNCOUNTED.get():
            return
        with self._count_lock:
            self._transactions += 1

    @contextlib.contextmanager
    def uncounted(self) -> Iterator[None]:
        """Leave the transactions begun inside out of :attr:`transactions` (``/metrics`` reading itself)."""
        token = _UNCOUNTED.set(True)
        try:
            yield
        finally:
            _UNCOUNTED.reset(token)

    @classmethod
    def open(cls, database_url: str) -> Store:
        """Create the engine (no connection is made yet)."""
        url = sync_url(database_url)
        if url.startswith("sqlite"):
            # SQLite has one writer: one connection per process queues transactions in
            # order instead of parking them in SQLite's busy handler (p99 ingest 253 → 46 ms,
            # BENCHMARKS.md). The connection moves between the loop's thread and workers,
            # one user at a time (Store._turns), hence check_same_thread off.
            engine = sa.create_engine(
                url,
                connect_args={"timeout": 30, "check_same_thread": False},
                pool_size=1,
                max_overflow=0,
                pool_timeout=60,
                pool_reset_on_return=None,  # every use ends its own transaction
            )
            _sqlite_pragmas(engine)
        else:
            engine = sa.create_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)
        return cls(engine)

    async def close(self) -> None:
        """Dispose of the connection pool (a group of units still open is committed first)."""
        if self._group is not None and not self._turns.held:
            self._commit_group()
        await asyncio.to_thread(self.engine.dispose)

    async def migrate(self) -> None:
        """Upgrade the schema to the newest revision, under a database-wide lock."""
        async with self._connection(write=True, join=False) as conn:
            if self.is_postgres:
                await conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_ID})")
            await conn.run_sync(_migrate)

    # -- transactions ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def begin(self) -> AsyncIterator[Connection]:
        """A connection inside one write transaction (committed on success, rolled back on an error)."""
        async with self._connection(write=True) as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[Connection]:
        """A connection for reads, inside one snapshot (rolled back at the end)."""
        async with self._connection(write=False) as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def _connection(self, *, write: bool, join: bool = True) -> AsyncIterator[Connection]:
        if self.is_postgres:
            sync = await self._checkout_in_thread(write)
            try:
                yield Connection(sync, inline=False)
            except BaseException:
                await asyncio.to_thread(_release, sync, commit=False)
                raise
            await asyncio.to_thread(_release, sync, commit=write)
            return
        task = asyncio.current_task()
        if task is not None and task is self._holder:
            raise RuntimeError(
                "the store's one SQLite connection was asked for again by the task that holds it; "
                "pass its Connection (conn=...) instead of opening a second transaction"
            )
        await self._turns.take(on_abandon=self._turn_over)
        self._holder = task
        committed: asyncio.Future[None] | None = None
        try:
            group = self._group
            if group is not None and not (write and join and group.joinable()):
                self._commit_group()  # a read sees only what is committed; a full or old group goes now
                group = None
            if not write:
                sync = self._checkout(False)
                try:
                    yield Connection(sync, inline=True)
                except BaseException:
                    _release(sync, commit=False)
                    raise
                _release(sync, commit=False)
            elif group is None:
                # A deferred BEGIN (a read) never waits under WAL; BEGIN IMMEDIATE may, for
                # another process (a CLI command) holding the write lock: tried here without
                # waiting, and only if that lock is held (or a checkpoint is due) on a worker thread.
                sync = self._checkout_at_once() or await self._checkout_in_thread(True)
                try:
                    yield Connection(sync, inline=True)
                except BaseException:
                    _release(sync, commit=False)
                    raise
                if join:
                    self._group = group = _Group(sync, asyncio.get_running_loop().time())
                    committed = group.add()
                else:
                    _release(sync, commit=True)
                    self._commits += 1
            else:
                # This unit alone is undone on its error. The savepoint is sent to the
                # driver as is: SQLAlchemy's nested transaction cost as much CPU as the
                # BEGIN and COMMIT the group saves (units are one after another, so one
                # name serves; Connection.savepoint nests inside it under its own names).
                driver: Any = group.conn.connection.driver_connection
                driver.execute("SAVEPOINT syncd_unit")
                try:
                    yield Connection(group.conn, inline=True)
                except BaseException:
                    driver.execute("ROLLBACK TO syncd_unit")
                    driver.execute("RELEASE syncd_unit")
                    raise
                driver.execute("RELEASE syncd_unit")
                committed = group.add()
        finally:
            self._holder = None
            self._turn_over()
        if committed is not None:
            await committed

    def _turn_over(self) -> None:
        """Pass the connection to the next in line; with nobody waiting, commit the open group soon.

        The commit waits for the loop's next turn (``call_soon``), so that units of tasks
        already runnable in this turn join the group instead of beginning transactions of
        their own.
        """
        self._turns.give()
        if self._group is not None and not self._turns.held:
            asyncio.get_running_loop().call_soon(self._commit_idle)

    def _commit_idle(self) -> None:
        if self._group is not None and not self._turns.held:
            self._commit_group()

    def _commit_group(self) -> None:
        """SQLite: commit the units of the open group; each waiting unit learns the outcome."""
        group, self._group = self._group, None
        if group is None:
            return
        try:
            _release(group.conn, commit=True)
        except BaseException as exc:  # every unit of the group fails with the commit
            # Each caller still waiting gets the error as its own transaction's; one that
            # was cancelled meanwhile leaves its rows to their leases (worked again).
            log.warning("store_group_commit_failed", units=len(group.units), error=f"{type(exc).__name__}: {exc}")
            group.settle(exc)
            if not isinstance(exc, Exception):
                raise
            return
        self._commits += len(group.units)
        group.settle(None)

    async def _checkout_in_thread(self, write: bool) -> sa.Connection:
        """:meth:`_checkout` on a worker thread; a caller cancelled meanwhile leaks no connection."""
        checkout = asyncio.ensure_future(asyncio.to_thread(self._checkout, write))
        try:
            return await asyncio.shield(checkout)
        except asyncio.CancelledError:
            checkout.add_done_callback(_release_unused)
            raise

    def _checkout_at_once(self) -> sa.Connection | None:
        """SQLite: ``BEGIN IMMEDIATE`` on the loop's thread if the write lock is free now, else ``None``.

        The connection's busy timeout is set to 0 for that one statement, so it cannot
        block the event loop; ``None`` (another process writes, or a WAL checkpoint is due)
        sends the caller to :meth:`_checkout_in_thread`, which waits. The worker-thread
        hand-off it saves was a tenth of syncd's CPU per deal (py-spy, BENCHMARKS.md).
        """
        pool: Any = self.engine.pool
        if self._commits >= CHECKPOINT_EVERY or pool.checkedout():
            return None  # a checkpoint is due, or a cancelled checkout is still giving the connection back
        conn = self.engine.connect()
        driver: Any = conn.connection.driver_connection
        try:
            driver.execute("PRAGMA busy_timeout=0")
            try:
                conn.execution_options(syncd_write=True)
                conn.begin()
            finally:
                driver.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
        except sa.exc.OperationalError as exc:
            conn.close()
            if "locked" in str(exc) or "busy" in str(exc):
                return None
            raise
        except BaseException:
            conn.close()
            raise
        return conn

    def _checkout(self, write: bool) -> sa.Connection:
        conn = self.engine.connect()
        try:
            if write and not self.is_postgres and self._commits >= CHECKPOINT_EVERY:
                # WAL checkpoints run here, on this worker thread, not in a COMMIT on the
                # loop's thread (the connection's own automatic checkpoints are off).
                conn.connection.driver_connection.execute("PRAGMA wal_checkpoint(PASSIVE)")  # type: ignore[union-attr]
                self._commits = 0
            conn.execution_options(syncd_write=write)
            conn.begin()  # SQLite: BEGIN IMMEDIATE for a write, sent now (_sqlite_pragmas)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _unit(self, work: Callable[[sa.Connection], T], *, write: bool) -> T:
        """Run ``work`` in one transaction of its own: on PostgreSQL one worker-thread hand-off in all."""
        if self.is_postgres:
            return await asyncio.to_thread(self._unit_sync, work, write)
        async with self._connection(write=write) as conn:
            return work(conn.sync)

    def _unit_sync(self, work: Callable[[sa.Connection], T], write: bool) -> T:
        conn = self._checkout(write)
        try:
            result = work(conn)
        except BaseException:
            _release(conn, commit=False)
            raise
        _release(conn, commit=write)
        return result

    async def ping(self) -> bool:
        """Whether the database answers and is migrated."""
        try:
            await self._unit(
                lambda c: c.execute(sa.select(sa.func.count()).select_from(table_of(MetaRow))).scalar(), write=False
            )
        except sa.exc.SQLAlchemyError:
            return False
        return True

    # -- meta ---------------------------------------------------------------------------

    async def meta(self, key: str) -> str | None:
        """A value from the ``meta`` table."""
        table = table_of(MetaRow)
        stmt = sa.select(table.c.value).where(table.c.key == key)
        value = await self._unit(lambda c: c.execute(stmt).scalar(), write=False)
        return None if value is None else str(value)

    async def created_at(self) -> datetime | None:
        """When this database was created (the default ``billing_start``); ``None`` before migrating."""
        try:
            value = await self.meta("created_at")
        except sa.exc.SQLAlchemyError:  # no tables yet
            return None
        return None if value is None else datetime.fromisoformat(value)

    # -- inbox --------------------------------------------------------------------------

    async def add_events(self, hints: Sequence[ChangeHint], *, now: datetime) -> int:
        """Store change hints; duplicates (same connection and event id) are ignored.

        Returns:
            how many were new.
        """
        if not hints:
            return 0
        table = table_of(EventRow)
        stmt = self._insert_ignore(table, ("connection", "event_id")).returning(table.c.id)
        rows = _event_values(hints, now)
        return await self._unit(lambda c: len(c.execute(stmt, rows).all()), write=True)

    async def add_claimed_events(
        self, hints: Sequence[ChangeHint], *, owner: str, lease_s: int, now: datetime
    ) -> list[EventRow]:
        """Store change hints already claimed by ``owner`` (attempt 1, leased), in one transaction.

        For a worker that waits idle: storing and claiming are one transaction instead of
        two. Duplicates are ignored as in :meth:`add_events`.

        Returns:
            the new rows, claimed.
        """
        if not hints:
            return []
        table = table_of(EventRow)
        lease = {
            "attempts": 1,
            "lease_owner": owner,
            "lease_until": now + timedelta(seconds=lease_s),
            "first_attempt_at": now,
        }
        rows = [{**values, **lease} for values in _event_values(hints, now)]
        stmt = self._insert_ignore(table, ("connection", "event_id")).returning(*table.c)
        inserted = await self._unit(lambda c: c.execute(stmt, rows).mappings().all(), write=True)
        return sorted((EventRow.model_validate(dict(r)) for r in inserted), key=lambda r: r.id or 0)

    def _prepared(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """The statement ``build`` makes, built once per ``key`` and then executed with parameters.

        Building a statement (and its cache key, on every execution of a new one) was a
        tenth of syncd's CPU per deal (py-spy, BENCHMARKS.md): the hot inserts, upserts and
        reads by key reuse one statement object, whose compiled form SQLAlchemy caches.
        """
        stmt = self._statements.get(key)
        if stmt is None:
            stmt = self._statements[key] = build()
        return stmt

    def _insert_ignore(self, table: sa.Table, conflict: Sequence[str]) -> Any:
        return self._insert_dialect(table).on_conflict_do_nothing(index_elements=list(conflict))

    async def claim(self, model: type[Row], *, owner: str, limit: int, lease_s: int, now: datetime) -> list[Row]:
        """Claim up to ``limit`` due rows of ``model`` (events or effects) with a lease."""
        return await self._unit(
            lambda c: _claim(c, model, owner=owner, limit=limit, lease_s=lease_s, now=now), write=True
        )

    async def claim_work(
        self, *, owner: str, limits: tuple[int, int], lease_s: int, now: datetime, settle: Sequence[Settle] = ()
    ) -> Claimed:
        """Settle finished rows and claim the next due events and effects, in one transaction.

        A worker's loop runs on this: the rows it finished without a transaction of their
        own (:class:`Settle`, each fenced as in :meth:`finish`) are settled in the same
        transaction that claims its next work, up to ``limits`` (events, effects).
        """

        def work(c: sa.Connection) -> Claimed:
            fenced = [item.row for item in settle if not _finish(c, item)]
            events = _claim(c, EventRow, owner=owner, limit=limits[0], lease_s=lease_s, now=now)
            effects = _claim(c, EffectRow, owner=owner, limit=limits[1], lease_s=lease_s, now=now)
            return Claimed(events=events, effects=effects, fenced=fenced)

        return await self._unit(work, write=True)

    async def settle(self, items: Sequence[Settle]) -> list[EventRow | EffectRow | AlertRow]:
        """Settle rows finished earlier (:class:`Settle`) in one transaction; the rows claimed again meanwhile."""
        return await self._unit(lambda c: [item.row for item in items if not _finish(c, item)], write=True)

    async def renew(self, model: type[Row], row: Row, *, lease_s: int, now: datetime) -> datetime | None:
        """Extend a claim's lease to ``now + lease_s`` if it is still this claim's.

        Fenced like :meth:`finish`, and on the owner too: the row must still be pending,
        claimed by ``row.lease_owner`` with ``row.attempts``. A lease that ran out but
        was not claimed again is still ours (a claim and a renewal are serialised by
        the row lock on PostgreSQL, by the write lock on SQLite).

        Returns:
            the new end of the lease, or ``None`` when the claim is lost.
        """
        table = table_of(model)
        until = now + timedelta(seconds=lease_s)
        stmt = (
            sa.update(table)
            .where(
                table.c.id == row.id,
                table.c.attempts == row.attempts,
                table.c.lease_owner == row.lease_owner,
                table.c.status == "pending",
            )
            .values(lease_until=until)
        )
        renewed = await self._unit(lambda c: bool(c.execute(stmt).rowcount), write=True)
        return until if renewed else None

    async def renew_many(
        self, model: type[Row], rows: Sequence[Row], *, lease_s: int, now: datetime
    ) -> list[datetime | None]:
        """:meth:`renew` for several claims in one transaction: each one's new end, or ``None`` when lost."""
        if not rows:
            return []
        table = table_of(model)
        until = now + timedelta(seconds=lease_s)
        fences = [
            sa.and_(
                table.c.id == row.id,
                table.c.attempts == row.attempts,
                table.c.lease_owner == row.lease_owner,
            )
            for row in rows
        ]
        stmt = (
            sa.update(table)
            .where(sa.or_(*fences), table.c.status == "pending")
            .values(lease_until=until)
            .returning(table.c.id)
        )
        renewed = await self._unit(lambda c: {int(i) for i in c.execute(stmt).scalars()}, write=True)
        return [until if row.id in renewed else None for row in rows]

    async def release(self, model: type[Row], rows: Sequence[Row], *, uncount: bool, error: str | None = None) -> int:
        """Hand claimed rows back to the queue at once: no lease, due as they were.

        Args:
            rows: rows this worker claimed (fenced on owner and attempt, like :meth:`renew`).
            uncount: the rows were not worked on: their claim does not count as an
                attempt (``attempts`` goes back, and a first attempt time set by that
                claim is cleared). ``False`` for a row whose work was interrupted: its
                attempt did happen, so the next one looks up what it may have created.
            error: recorded as the row's last error.

        Returns:
            how many rows were released.
        """
        if not rows:
            return 0
        table = table_of(model)
        values: dict[str, Any] = {"lease_owner": None, "lease_until": None}
        if uncount:
            values["attempts"] = table.c.attempts - 1
            values["first_attempt_at"] = sa.case((table.c.attempts == 1, None), else_=table.c.first_attempt_at)
        if error is not None:
            values["last_error"] = error
        claims = sa.or_(*(sa.and_(table.c.id == row.id, table.c.attempts == row.attempts) for row in rows))
        owners = {row.lease_owner for row in rows}
        stmt = sa.update(table).where(claims, table.c.lease_owner.in_(owners), table.c.status == "pending")
        return await self._unit(lambda c: int(c.execute(stmt.values(**values)).rowcount or 0), write=True)

    async def finish(
        self,
        model: type[Row],
        row: Row,
        *,
        status: str,
        now: datetime,
        error: str | None = None,
        next_at: datetime | None = None,
        result: Mapping[str, Any] | None = None,
        conn: Connection | None = None,
    ) -> bool:
        """Settle a claimed row, fenced on the attempt it was claimed with and its owner.

        The owner matters once a row was handed back uncounted (:meth:`release` takes
        ``attempts`` back by one): a worker that lost the row before that must not
        settle it with the attempt number it had.

        Args:
            status: ``done``, ``dead``, ``simulated``, or ``pending`` (retry at ``next_at``).

        Returns:
            ``False`` when the row was claimed again since (this writer is fenced off).
        """
        item = Settle(model=model, row=row, status=status, now=now, error=error, next_at=next_at, result=result)
        if conn is not None:
            return await conn.call(lambda c: _finish(c, item))
        return await self._unit(lambda c: _finish(c, item), write=True)

    # -- outbox -------------------------------------------------------------------------

    async def add_effect(
        self,
        conn: Connection,
        *,
        key: str,
        kind: str,
        connection: str,
        payload: Mapping[str, Any],
        now: datetime,
        client_key: str | None = None,
        status: str = "pending",
        next_at: datetime | None = None,
    ) -> bool:
        """Queue an effect in the caller's transaction (due at ``next_at``, else now); ``False`` if the key exists."""
        table = table_of(EffectRow)
        values = _effect_values(key, kind, connection, payload, now, client_key, status, next_at)
        stmt = self._insert_ignore(table, ("key",)).values(**values).returning(table.c.key)
        return await conn.call(lambda c: c.execute(stmt).first() is not None)

    async def add_claimed_effect(
        self,
        conn: Connection,
        *,
        key: str,
        kind: str,
        connection: str,
        payload: Mapping[str, Any],
        now: datetime,
        owner: str,
        lease_s: int,
        client_key: str | None = None,
    ) -> EffectRow | None:
        """Queue an effect due now, already claimed by ``owner`` (attempt 1, leased), in the caller's transaction.

        For the worker that goes on to execute it at once: no claim of its own. The
        lease and the attempt counter are those of :meth:`claim`, so fencing is unchanged.

        Returns:
            the row, or ``None`` if the key exists (nothing queued, nothing claimed).
        """
        table = table_of(EffectRow)
        values = _effect_values(key, kind, connection, payload, now, client_key, "pending", None)
        values |= {
            "attempts": 1,
            "lease_owner": owner,
            "lease_until": now + timedelta(seconds=lease_s),
            "first_attempt_at": now,
        }
        stmt = self._prepared(
            ("claimed_effect", tuple(values)), lambda: self._insert_ignore(table, ("key",)).returning(*table.c)
        )
        row = await conn.call(lambda c: c.execute(stmt, values).mappings().first())
        return None if row is None else EffectRow.model_validate(dict(row))

    async def add_billing_event(self, conn: Connection, row: BillingEventRow) -> bool:
        """Record a billing event in the caller's transaction; ``False`` if its key exists."""
        table = table_of(BillingEventRow)
        stmt = self._prepared("billing_event", lambda: self._insert_ignore(table, ("key",)).returning(table.c.key))
        values = row.model_dump()
        return await conn.call(lambda c: c.execute(stmt, values).first() is not None)

    # -- rows by key ----------------------------------------------------------------------

    async def get(self, model: type[SQLModel], *pk: Any, conn: Connection | None = None) -> Any:
        """One row by primary key, or ``None`` (inside the caller's transaction if ``conn``)."""
        table = table_of(model)
        cols = list(table.primary_key.columns)
        stmt = self._prepared(
            ("get", table.name), lambda: sa.select(table).where(*(c == sa.bindparam(f"pk_{c.name}") for c in cols))
        )
        params = {f"pk_{c.name}": v for c, v in zip(cols, pk, strict=True)}

        def work(c: sa.Connection) -> Any:
            row = c.execute(stmt, params).mappings().first()
            return None if row is None else model.model_validate(dict(row))

        return await (conn.call(work) if conn is not None else self._unit(work, write=False))

    async def upsert(self, model: type[SQLModel], values: Mapping[str, Any], conn: Connection | None = None) -> None:
        """Insert or update a row by primary key."""
        table = table_of(model)
        columns = tuple(values)

        def build() -> Any:
            keys = [c.name for c in table.primary_key.columns]
            ins = self._insert_dialect(table)
            update = {k: ins.excluded[k] for k in columns if k not in keys}
            return (
                ins.on_conflict_do_update(index_elements=keys, set_=update) if update else ins.on_conflict_do_nothing()
            )

        stmt = self._prepared(("upsert", table.name, columns), build)
        params = dict(values)
        if conn is not None:
            await conn.execute(stmt, params)
            return
        await self._unit(lambda c: c.execute(stmt, params), write=True)

    async def select(
        self,
        model: type[SQLModel],
        *where: Any,
        order_by: Any = None,
        limit: int | None = None,
        conn: Connection | None = None,
    ) -> list[Any]:
        """Rows of ``model`` matching ``where`` (SQLAlchemy column expressions), in ``conn`` if given."""
        table = table_of(model)
        stmt = sa.select(table).where(*where)
        if order_by is not None:
            stmt = stmt.order_by(order_by)
        if limit is not None:
            stmt = stmt.limit(limit)

        def work(c: sa.Connection) -> list[Any]:
            return [model.model_validate(dict(r)) for r in c.execute(stmt).mappings().all()]

        return await (conn.call(work) if conn is not None else self._unit(work, write=False))

    async def count(self, model: type[SQLModel], *where: Any) -> int:
        """How many rows of ``model`` match ``where``."""
        stmt = sa.select(sa.func.count()).select_from(table_of(model)).where(*where)
        return await self._unit(lambda c: int(c.execute(stmt).scalar() or 0), write=False)

    async def update(
        self,
        model: type[SQLModel],
        where: Iterable[Any],
        values: Mapping[str, Any],
        *,
        conn: Connection | None = None,
    ) -> int:
        """Update rows of ``model`` matching ``where`` (in ``conn`` if given); how many changed."""
        stmt = sa.update(table_of(model)).where(*where).values(**values)

        def work(c: sa.Connection) -> int:
            return int(c.execute(stmt).rowcount or 0)

        return await (conn.call(work) if conn is not None else self._unit(work, write=True))

    # -- dead letters ---------------------------------------------------------------------

    async def dead_letter(
        self,
        *,
        source: str,
        ref: str,
        connection: str,
        reason: str,
        place: str | None,
        payload: Mapping[str, Any] | None,
        now: datetime,
        conn: Connection | None = None,
    ) -> None:
        """Record a record that cannot be processed (no secrets: callers pass hints, not bodies)."""
        values = {
            "source": source,
            "ref": ref,
            "connection": connection,
            "reason": reason,
            "place": place,
            "payload": dict(payload) if payload is not None else None,
            "status": "open",
            "created_at": now,
        }
        if conn is not None:
            await self.add_dead_letter(conn, values)
            return
        async with self.begin() as own:
            await self.add_dead_letter(own, values)

    async def add_dead_letter(self, conn: Connection, values: Mapping[str, Any]) -> None:
        """Insert a :class:`DeadLetterRow` in the caller's transaction; an open one is also an alert."""
        table = table_of(DeadLetterRow)
        letter_id = (await conn.execute(sa.insert(table).values(**values).returning(table.c.id))).scalar_one()
        if values.get("status", "open") == "open":
            await self.queue_alert(
                conn,
                key=f"dead_letter:{letter_id}",
                kind="dead_letter",
                title=f"{values['source']} {values['ref']} of {values['connection']}",
                detail=str(values["reason"]),
                place=values.get("place"),
                connection=str(values["connection"]),
                now=values["created_at"],
            )

    async def add_outcome(self, conn: Connection | None = None, **values: Any) -> bool:
        """Record an outcome (:class:`OutcomeRow`) once per ``key``; ``False`` if it exists.

        A new outcome that needs attention is also an alert (:meth:`queue_alert`), in the
        same transaction; a client-record conflict is not, as its own alert comes through
        :meth:`add_alert`.
        """
        if conn is not None:
            return await self._insert_outcome(conn, values)
        async with self.begin() as own:
            return await self._insert_outcome(own, values)

    async def _insert_outcome(self, conn: Connection, values: dict[str, Any]) -> bool:
        table = table_of(OutcomeRow)
        values.setdefault("status", "open")
        stmt = self._insert_ignore(table, ("key",)).values(**values).returning(table.c.key)
        new = (await conn.execute(stmt)).first() is not None
        if new and values.get("kind") == "attention" and values.get("reason") != "client_conflict":
            subject = " ".join(str(values[k]) for k in ("object_type", "object_id") if values.get(k))
            await self.queue_alert(
                conn,
                key=f"attention:{values['key']}",
                kind="attention",
                title=f"{values['reason']}" + (f" ({subject})" if subject else ""),
                detail=str(values["detail"]),
                place=values.get("place"),
                connection=values.get("connection"),
                now=values["created_at"],
            )
        return new

    async def queue_alert(
        self,
        conn: Connection | None,
        *,
        key: str,
        kind: str,
        title: str,
        detail: str,
        now: datetime,
        place: str | None = None,
        connection: str | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> bool:
        """Queue an alert for delivery (:class:`AlertRow`) once per ``key``, in the caller's transaction if ``conn``.

        Nothing is recorded while :attr:`alerting` is off (no ``[alerts] webhook_url``).
        (:meth:`add_alert` is the hook other code records alert-worthy events through;
        the sender moves those here.) With ``body``, the alert is posted as that message
        of its own instead of a line of a grouped one.

        Returns:
            whether it was new (and recorded).
        """
        if not self.alerting:
            return False
        table = table_of(AlertRow)
        values = {
            "key": key,
            "kind": kind,
            "title": redact_text(title)[:300],
            "detail": redact_text(detail)[:1000],
            "place": place,
            "connection": connection,
            "status": "pending",
            "attempts": 0,
            "next_at": now,
            "created_at": now,
            "body": dict(body) if body is not None else None,
        }
        stmt = self._insert_ignore(table, ("key",)).values(**values).returning(table.c.id)
        if conn is not None:
            return (await conn.execute(stmt)).first() is not None
        async with self.begin() as own:
            return (await own.execute(stmt)).first() is not None

    async def outcome_counts(self) -> dict[tuple[str, str], int]:
        """Open outcomes counted by (kind, reason)."""
        return await self._unit(_outcome_counts, write=False)

    async def lock_for_transaction(self, conn: Connection, name: str) -> None:
        """Hold a lock named ``name`` until ``conn``'s transaction ends, across replicas.

        On PostgreSQL a transaction-level advisory lock (``pg_advisory_xact_lock``, keyed
        by a 64-bit hash of the name): a second transaction asking for the same name
        waits until the first commits, and then reads what it wrote. SQLite needs
        nothing: ``BEGIN IMMEDIATE`` already makes each write transaction wait for the
        one before it.
        """
        if self.is_postgres:
            await conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"), {"k": name})

    async def metric_counts(self) -> MetricCounts:
        """What the ``/metrics`` gauges show, read in one transaction (:mod:`syncd.plumbing.metrics`)."""
        events, effects = table_of(EventRow), table_of(EffectRow)
        dead, outcomes = table_of(DeadLetterRow), table_of(OutcomeRow)
        found = MetricCounts()
        async with self.connect() as conn:
            for queue, table in (("events", events), ("effects", effects)):
                for status in ("pending", "dead"):
                    value = await conn.scalar(sa.select(sa.func.count()).where(table.c.status == status))
                    found.backlog[(queue, status)] = int(value or 0)
            by_source = sa.select(dead.c.source, sa.func.count()).where(dead.c.status == "open").group_by(dead.c.source)
            found.dead_letters.update({str(s): int(n) for s, n in (await conn.execute(by_source)).all()})
            found.backlog[("dead_letters", "open")] = sum(found.dead_letters.values())
            alerts = table_of(AlertRow)
            waiting = alerts.c.status == "pending"
            for status, where in (("pending", waiting), ("failed", sa.and_(waiting, alerts.c.last_error.is_not(None)))):
                found.backlog[("alerts", status)] = int(await conn.scalar(sa.select(sa.func.count()).where(where)) or 0)
            by_kind = (
                sa.select(outcomes.c.kind, outcomes.c.reason, sa.func.count())
                .where(outcomes.c.status == "open")
                .group_by(outcomes.c.kind, outcomes.c.reason)
            )
            found.outcomes.update({(str(k), str(r)): int(n) for k, r, n in (await conn.execute(by_kind)).all()})
            skips = (
                sa.select(outcomes.c.reason, sa.func.count())
                .where(outcomes.c.kind == "skip")
                .group_by(outcomes.c.reason)
            )
            found.skips.update({str(r): int(n) for r, n in (await conn.execute(skips)).all()})
        return found

    async def pages(self, model: type[SQLModel], *where: Any, key: str, size: int = 500) -> AsyncIterator[list[Any]]:
        """Rows of ``model`` matching ``where``, ``size`` at a time, in the order of column ``key``.

        Keyset pagination: each page is ``WHERE key > <the last key of the previous page>
        ORDER BY key LIMIT size``, one short read each, so no transaction or connection
        is held while the caller works through a page (SQLite has one connection). A row
        is yielded at most once even if rows are inserted or updated meanwhile; a row
        inserted behind the cursor is left to the next run. ``key`` must be unique.
        """
        if size < 1:
            raise ValueError(f"page size must be at least 1, got {size}")
        table = table_of(model)
        column = table.c[key]
        last: Any = None
        while True:
            stmt = sa.select(table).where(*where).order_by(column).limit(size)
            if last is not None:
                stmt = stmt.where(column > last)
            async with self.connect() as conn:
                rows = (await conn.execute(stmt)).mappings().all()
            if not rows:
                return
            yield [model.model_validate(dict(r)) for r in rows]
            if len(rows) < size:
                return
            last = rows[-1][key]

    async def values_pages(self, column: sa.Column[Any], *where: Any, size: int = 500) -> AsyncIterator[list[Any]]:
        """The distinct values of ``column`` among the rows matching ``where``, ``size`` at a time, in order.

        Keyset pagination as in :meth:`pages` (``SELECT DISTINCT column ... WHERE column >
        <last> ORDER BY column LIMIT size``).
        """
        if size < 1:
            raise ValueError(f"page size must be at least 1, got {size}")
        last: Any = None
        while True:
            stmt = sa.select(column).distinct().where(*where).order_by(column).limit(size)
            if last is not None:
                stmt = stmt.where(column > last)
            async with self.connect() as conn:
                values = list((await conn.execute(stmt)).scalars().all())
            if not values:
                return
            yield values
            if len(values) < size:
                return
            last = values[-1]

    async def select_in(
        self, model: type[SQLModel], column: str, values: Iterable[Any], *where: Any, chunk: int = 500
    ) -> list[Any]:
        """Rows of ``model`` whose ``column`` is one of ``values`` (and match ``where``).

        The values are sent ``chunk`` at a time, under every driver's limit on bound
        parameters however many there are.
        """
        table = table_of(model)
        wanted = sorted(set(values))
        found: list[Any] = []
        for start in range(0, len(wanted), chunk):
            found += await self.select(model, table.c[column].in_(wanted[start : start + chunk]), *where)
        return found

    async def delete_in_batches(self, model: type[SQLModel], *where: Any, batch: int) -> int:
        """Delete the rows of ``model`` matching ``where``, ``batch`` per transaction; how many.

        Each batch is one ``DELETE ... WHERE <primary key> IN (SELECT <primary key> ...
        ORDER BY <primary key> LIMIT batch)`` in its own transaction (a row value ``IN`` for
        a composite key), so the database is never held by one long delete; the loop
        ends on the first short batch.
        """
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        table = table_of(model)
        keys = list(table.primary_key.columns)
        chosen = sa.select(*keys).where(*where).order_by(*keys).limit(batch)
        target = keys[0].in_(chosen.scalar_subquery()) if len(keys) == 1 else sa.tuple_(*keys).in_(chosen)
        total = 0
        while True:
            async with self.begin() as conn:
                deleted = int((await conn.execute(sa.delete(table).where(target))).rowcount or 0)
            total += deleted
            if deleted < batch:
                return total
            await asyncio.sleep(0)  # let the workers in between batches

    async def dead_letter_counts(self) -> dict[tuple[str, str], int]:
        """Dead letters counted by (connection, status)."""
        table = table_of(DeadLetterRow)
        stmt = sa.select(table.c.connection, table.c.status, sa.func.count()).group_by(
            table.c.connection, table.c.status
        )
        async with self.connect() as conn:
            rows = (await conn.execute(stmt)).all()
        return {(str(connection), str(status)): int(n) for connection, status, n in rows}

    # -- the alert hook -------------------------------------------------------------------

    async def add_alert(
        self,
        *,
        key: str,
        source: str,
        title: str,
        text: str,
        fields: Mapping[str, Any] | None,
        now: datetime,
        conn: Connection | None = None,
    ) -> bool:
        """Record an alert for a sender to deliver, once per ``key``; ``False`` if it exists."""
        table = table_of(PendingAlertRow)
        values = {
            "key": key,
            "source": source,
            "title": title,
            "text": text,
            "fields": json.loads(json.dumps(dict(fields or {}), default=str)),
            "created_at": now,
        }
        stmt = self._insert_ignore(table, ("key",)).values(**values).returning(table.c.id)
        if conn is not None:
            return (await conn.execute(stmt)).first() is not None
        async with self.begin() as own:
            return (await own.execute(stmt)).first() is not None

    async def pending_alerts(self, limit: int = 100) -> list[PendingAlertRow]:
        """Alerts not yet sent, oldest first."""
        return list(
            await self.select(
                PendingAlertRow,
                table_of(PendingAlertRow).c.sent_at.is_(None),
                order_by=table_of(PendingAlertRow).c.id,
                limit=limit,
            )
        )

    async def mark_alerts_sent(self, ids: Iterable[int], now: datetime) -> int:
        """Mark alerts delivered; how many were still pending."""
        table = table_of(PendingAlertRow)
        return await self.update(
            PendingAlertRow, [table.c.id.in_(list(ids)), table.c.sent_at.is_(None)], {"sent_at": now}
        )

    @contextlib.asynccontextmanager
    async def named_lock(self, name: str) -> AsyncIterator[None]:
        """Hold a lock named ``name`` across tasks, and across replicas on PostgreSQL.

        Used where a vendor call must not run twice at once for the same thing (creating
        one client's customer record). SQLite serves one process, so an asyncio lock is enough.
        """
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if not self.is_postgres:
                yield
                return
            async with self.connect() as conn:
                await conn.execute(sa.text("SELECT pg_advisory_lock(hashtext(:k))"), {"k": name})
                try:
                    yield
                finally:
                    await conn.execute(sa.text("SELECT pg_advisory_unlock(hashtext(:k))"), {"k": name})

    # -- vendor health ---------------------------------------------------------------------

    async def vendor_failed(
        self, connection: str, error: str, now: datetime, *, restart: bool = False
    ) -> tuple[datetime, int]:
        """Count a failure of ``connection`` in its shared streak (:class:`VendorHealthRow`), atomically.

        One ``INSERT ... ON CONFLICT DO UPDATE ... RETURNING``: concurrent replicas queue on
        the row and each sees the streak with its own failure counted. A streak starts at
        the first failure after a success; ``restart`` starts a new one at ``now`` (the
        caller saw a success it has not reported yet).

        Returns:
            when the streak began, and its failures so far.
        """
        table = table_of(VendorHealthRow)
        error = redact_text(error)[:500]
        fresh = sa.true() if restart else table.c.failing_since.is_(None)
        stmt = self._insert_dialect(table).values(
            connection=connection, failing_since=now, failures=1, last_error=error, last_failure_at=now
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["connection"],
            set_={
                "failing_since": sa.case((fresh, stmt.excluded.failing_since), else_=table.c.failing_since),
                "failures": sa.case((fresh, 1), else_=table.c.failures + 1),
                "last_error": stmt.excluded.last_error,
                "last_failure_at": stmt.excluded.last_failure_at,
            },
        ).returning(table.c.failing_since, table.c.failures)

        def write(c: sa.Connection) -> tuple[datetime, int]:
            since, failures = c.execute(stmt).one()
            return since, int(failures)

        return await self._unit(write, write=True)

    async def vendor_succeeded(self, connection: str, at: datetime) -> bool:
        """A call of ``connection`` went through at ``at``: the shared streak that began by then ends.

        A streak that began after ``at`` (another replica's failure since) goes on.

        Returns:
            whether a streak ended.
        """
        table = table_of(VendorHealthRow)
        stmt = (
            sa.update(table)
            .where(table.c.connection == connection, table.c.failing_since <= at)
            .values(failing_since=None, failures=0, last_success_at=at)
        )
        return bool(await self._unit(lambda c: c.execute(stmt).rowcount, write=True))

    # -- ticks ----------------------------------------------------------------------------

    async def claim_tick(self, job: str, window: str, *, owner: str, now: datetime) -> bool:
        """Whether this replica runs ``job`` for ``window`` (the first to insert wins)."""
        table = table_of(TickRow)
        stmt = self._insert_ignore(table, ("job", "window")).values(job=job, window=window, owner=owner, started_at=now)
        return await self._unit(lambda c: c.execute(stmt.returning(table.c.job)).first() is not None, write=True)

    # -- rate budgets ---------------------------------------------------------------------

    async def take_budget(self, key: str, window_s: float, limit: int, now: datetime) -> float | None:
        """Reserve the next slot of budget ``key`` ("``limit`` per ``window_s``"), atomically.

        Slots are ``window_s / limit`` apart, so any ``window_s`` holds at most ``limit``
        of them, however the vendor aligns its windows (at a fixed time, at the first
        call after the last window expired, or rolling). One statement,
        ``INSERT ... ON CONFLICT (key) DO UPDATE SET next_at_s = GREATEST(next_at_s, now)
        + interval RETURNING next_at_s``: concurrent callers (other replicas) queue on
        the row lock and each gets its own slot. The caller must wait for its slot and
        must not take another for the same request.

        Args:
            key: the budget (connection and bucket).
            window_s: the vendor's window in seconds.
            limit: requests allowed per window (at least 1).
            now: the current time (aware).

        Returns:
            ``None`` when the slot is now, else the seconds until it starts.
        """
        if limit < 1 or window_s <= 0:
            raise ValueError(f"rate budget {key!r}: limit {limit} per {window_s} s grants nothing")
        at, interval = now.timestamp(), window_s / limit
        table = table_of(RateBudgetRow)
        latest = sa.func.greatest if self.is_postgres else sa.func.max  # SQLite's two-argument max()
        stmt = self._insert_dialect(table).values(key=key, next_at_s=at + interval)
        stmt = stmt.on_conflict_do_update(
            index_elements=["key"], set_={"next_at_s": latest(table.c.next_at_s, at) + interval}
        ).returning(table.c.next_at_s)
        next_at_s = float(await self._unit(lambda c: c.execute(stmt).scalar_one(), write=True))
        wait_s = next_at_s - interval - at
        return wait_s if wait_s > 0 else None

    def _insert_dialect(self, table: sa.Table) -> Any:
        if self.is_postgres:
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(table)
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table)


class DbTokenStore:
    """OAuth tokens for one connection, Fernet-encrypted in ``oauth_tokens``.

    ``locked()`` holds an advisory lock on PostgreSQL so one replica refreshes at a
    time; within one process an asyncio lock serialises too.
    """

    def __init__(self, store: Store, connection: str, key: str | None) -> None:
        self.store = store
        self.connection = connection
        self.fernet = Fernet(key.encode()) if key else None

    def _cipher(self) -> Fernet:
        if self.fernet is None:
            raise ConfigError(
                "OAuth tokens must be stored but [daemon].encryption_key is not set; "
                "generate one with `syncd keygen` and set SYNCD_DAEMON__ENCRYPTION_KEY"
            )
        return self.fernet

    async def load(self) -> Mapping[str, Any] | None:
        """The stored tokens, decrypted, or ``None``."""
        row = await self.store.get(TokenRow, self.connection)
        if row is None:
            return None
        try:
            data: dict[str, Any] = json.loads(self._cipher().decrypt(row.ciphertext.encode()))
        except InvalidToken as exc:
            raise ConfigError(
                f"stored tokens of {self.connection!r} cannot be decrypted: wrong [daemon].encryption_key"
            ) from exc
        _never_log(data)
        return data

    async def save(self, tokens: Mapping[str, Any]) -> None:
        """Encrypt and persist ``tokens`` (before the caller uses them)."""
        _never_log(tokens)
        blob = self._cipher().encrypt(json.dumps(dict(tokens)).encode()).decode()
        row = await self.store.get(TokenRow, self.connection)
        version = (row.version + 1) if row is not None else 1
        await self.store.upsert(
            TokenRow,
            {"connection": self.connection, "ciphertext": blob, "version": version, "updated_at": datetime.now(UTC)},
        )

    def locked(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold the refresh lock for this connection, across replicas on PostgreSQL."""
        return self.store.named_lock(f"syncd-token:{self.connection}")


def _never_log(tokens: Mapping[str, Any]) -> None:
    """Every token read from or written to the store is scrubbed from logs from then on."""
    redact_value(*(str(tokens.get(name) or "") for name in ("access_token", "refresh_token")))


def _sqlite_pragmas(engine: sa.Engine) -> None:
    """WAL, a busy timeout, and ``BEGIN IMMEDIATE`` for writes so writers queue instead of failing.

    Reads take a deferred ``BEGIN``: one snapshot, no write lock. The connection's own
    WAL checkpoints are off: :meth:`Store._checkout` runs them on a worker thread.
    """

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA wal_autocheckpoint=0")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        write = conn.get_execution_options().get("syncd_write", True)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _release_unused(checkout: asyncio.Future[sa.Connection]) -> None:
    """A connection checked out for a caller that was cancelled meanwhile goes back (rolled back, on a thread)."""
    if checkout.cancelled() or checkout.exception() is not None:
        return
    threading.Thread(target=_release, args=(checkout.result(),), kwargs={"commit": False}, daemon=True).start()


def _release(conn: sa.Connection, *, commit: bool) -> None:
    """End the connection's transaction (commit or roll back) and return it to the pool.

    A ``COMMIT`` that fails (SQLite leaves the transaction open, e.g. for a deferred
    foreign key) is rolled back before the connection goes back: the pool does not reset
    connections (``pool_reset_on_return=None``), so the next user would find it still open.
    """
    try:
        if commit:
            try:
                conn.commit()
            except BaseException:
                # SQLAlchemy counts the transaction as ended; the driver's may not be
                driver: Any = conn.connection.driver_connection
                with contextlib.suppress(Exception):
                    driver.rollback()
                raise
        else:
            conn.rollback()
    finally:
        conn.close()


def _claim(conn: sa.Connection, model: type[Row], *, owner: str, limit: int, lease_s: int, now: datetime) -> list[Row]:
    params = {"owner": owner, "until": now + timedelta(seconds=lease_s), "now": now, "limit": limit}
    rows = conn.execute(_claim_statement(model), params).mappings().all()
    return sorted((model.model_validate(dict(r)) for r in rows), key=lambda r: r.id or 0)


@functools.cache
def _claim_statement(model: type[Row]) -> Any:
    """The claim of :func:`_claim`, built once per table and executed with parameters.

    The same saving as :meth:`Store._prepared`, for a statement that is the same on
    every dialect (so cached here, not per store).
    """
    table = table_of(model)
    now = sa.bindparam("now", type_=table.c.next_at.type)
    values: dict[str, Any] = {
        "lease_owner": sa.bindparam("owner", type_=table.c.lease_owner.type),
        "lease_until": sa.bindparam("until", type_=table.c.lease_until.type),
        "attempts": table.c.attempts + 1,
    }
    if "first_attempt_at" in table.c:  # events and effects give up by time since their first attempt
        values["first_attempt_at"] = sa.func.coalesce(table.c.first_attempt_at, now)
    lease_free = sa.or_(table.c.lease_until.is_(None), table.c.lease_until < now)
    due = (
        sa.select(table.c.id)
        .where(table.c.status == "pending", table.c.next_at <= now, lease_free)
        .order_by(table.c.next_at, table.c.id)
        .limit(sa.bindparam("limit", type_=sa.Integer()))
        .with_for_update(skip_locked=True)
    )
    return sa.update(table).where(table.c.id.in_(due.scalar_subquery())).values(**values).returning(*table.c)


def _finish(conn: sa.Connection, item: Settle) -> bool:
    values: dict[str, Any] = {"status": item.status, "lease_owner": None, "lease_until": None, "last_error": item.error}
    if item.next_at is not None:
        values["next_at"] = item.next_at
    if item.model is EffectRow:
        values["updated_at"] = item.now
        if item.result is not None:
            values["result"] = dict(item.result)
    row = item.row
    params = {f"v_{name}": value for name, value in values.items()}
    params |= {"w_id": row.id, "w_attempts": row.attempts, "w_owner": row.lease_owner}
    return bool(conn.execute(_finish_statement(item.model, tuple(values)), params).rowcount)


@functools.cache
def _finish_statement(model: type[Row], columns: tuple[str, ...]) -> Any:
    """The fenced settling of :func:`_finish` for ``columns``, built once and executed with parameters.

    Fenced on the claim: the row's id, its attempt and its owner (``IS NOT DISTINCT FROM``:
    an owner of ``None`` matches ``NULL``, as ``== None`` did).
    """
    table = table_of(model)
    return (
        sa.update(table)
        .where(
            table.c.id == sa.bindparam("w_id", type_=table.c.id.type),
            table.c.attempts == sa.bindparam("w_attempts", type_=table.c.attempts.type),
            table.c.lease_owner.is_not_distinct_from(sa.bindparam("w_owner", type_=table.c.lease_owner.type)),
        )
        .values({name: sa.bindparam(f"v_{name}", type_=table.c[name].type) for name in columns})
    )


def _event_values(hints: Sequence[ChangeHint], now: datetime) -> list[dict[str, Any]]:
    return [
        {
            "connection": h.connection,
            "object_type": h.object_type,
            "object_id": h.object_id,
            "event_id": h.event_id,
            "kind": h.kind,
            "version": h.version,
            "occurred_at": h.occurred_at,
            "received_at": now,
            "status": "pending",
            "attempts": 0,
            "next_at": now,
        }
        for h in hints
    ]


def _effect_values(
    key: str,
    kind: str,
    connection: str,
    payload: Mapping[str, Any],
    now: datetime,
    client_key: str | None,
    status: str,
    next_at: datetime | None,
) -> dict[str, Any]:
    return {
        "key": key,
        "kind": kind,
        "connection": connection,
        "client_key": client_key,
        "payload": json.loads(json.dumps(payload, default=str)),
        "status": status,
        "attempts": 0,
        "next_at": next_at or now,
        "created_at": now,
        "updated_at": now,
    }


def _outcome_counts(conn: sa.Connection) -> dict[tuple[str, str], int]:
    table = table_of(OutcomeRow)
    stmt = (
        sa.select(table.c.kind, table.c.reason, sa.func.count())
        .where(table.c.status == "open")
        .group_by(table.c.kind, table.c.reason)
    )
    return {(str(kind), str(reason)): int(n) for kind, reason, n in conn.execute(stmt).all()}


def _migrate(conn: sa.Connection) -> None:
    """Alembic's upgrade to the newest revision, then the ``meta`` facts a new database starts with."""
    _alembic_upgrade(conn)
    table = table_of(MetaRow)
    if conn.execute(sa.select(table.c.value).where(table.c.key == "created_at")).scalar() is None:
        conn.execute(sa.insert(table).values(key="created_at", value=datetime.now(UTC).isoformat()))


def _alembic_upgrade(sync_conn: sa.Connection) -> None:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = sync_conn
    command.upgrade(cfg, "head")
