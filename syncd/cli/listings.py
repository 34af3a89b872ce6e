"""Listings for people and for scripts: ``syncd status``, ``syncd dead-letters list``, ``syncd unbilled``.

Each listing names what a person knows beside syncd's keys: a deal by its name and a
client by its legal name. Names are read from the store, never from a vendor: a deal's
name from its engagement (the mapping's ``[engagement].name``), else from the last-seen
copy of the deal (``source_records``); a client's legal name from the ``clients`` table,
else from the deal's company in that copy. A record that never got that far keeps its
key alone.

As text, a listing fits the terminal (``shutil.get_terminal_size``, 80 columns when
there is none): one head line per item, then indented ``label: value`` lines wrapped
to the width, so nothing is cut off and no line is longer than the terminal. As JSON
(``--json``) it is a list of objects whose keys are always present (``null`` when
unknown), money as decimal strings and times as ISO 8601 with their offset
(docs/operations.md, "Listings").
"""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa

from syncd.store.db import (
    AlertRow,
    BillingEventRow,
    ClientRow,
    CursorRow,
    DeadLetterRow,
    EffectRow,
    EngagementRow,
    EventRow,
    InvoiceRow,
    PendingAlertRow,
    SourceRecordRow,
    Store,
    VendorHealthRow,
    table_of,
)

MIN_WIDTH = 40
INVOICES_SHOWN = 10
"""How many of the newest invoices ``syncd status`` shows."""
OUTCOME_KINDS = ("skip", "simulated", "attention")


def terminal_width() -> int:
    """The terminal's width in columns; 80 when there is no terminal (never below 40)."""
    return max(shutil.get_terminal_size((80, 24)).columns, MIN_WIDTH)


# ---------------------------------------------------------------------------- text layout


def entry(head: str, fields: Sequence[tuple[str, str]], width: int, *, indent: int = 0) -> list[str]:
    """One item as lines no longer than ``width``: the head, then ``label: value`` lines under it.

    The head starts ``indent`` columns in, the fields two more. Values are wrapped (long
    words broken), continuation lines aligned under the value. A field with an empty
    value is left out.
    """
    margin = " " * indent
    lines = _wrap(head, width, margin, margin + "    ")
    shown = [(label, value) for label, value in fields if value]
    pad = indent + 2 + max((len(label) for label, _ in shown), default=0) + 2
    if pad > width // 3:
        pad = indent + 6
    for label, value in shown:
        first = f"{margin}  {label}:".ljust(pad)
        lines += _wrap(value, width, first, " " * pad)
    return lines


def _wrap(text: str, width: int, first: str, rest: str) -> list[str]:
    lines: list[str] = []
    for number, paragraph in enumerate(text.splitlines() or [""]):
        lines += textwrap.wrap(
            paragraph,
            width=width,
            initial_indent=first if number == 0 else rest,
            subsequent_indent=rest,
            break_long_words=True,
            break_on_hyphens=False,
        ) or [(first if number == 0 else rest).rstrip()]
    return lines


def when(moment: datetime | None) -> str:
    """A stored time as ``2026-12-03 10:00 UTC`` (the store keeps UTC)."""
    return moment.strftime("%Y-%m-%d %H:%M %Z") if moment is not None else ""


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


# ---------------------------------------------------------------------------- names


def deal_key(crm: str, deal_id: str) -> str:
    """syncd's key of a CRM deal (also its engagement's key): ``hubspot:deal:1003``."""
    return f"{crm}:deal:{deal_id}"


def split_deal_key(key: str) -> tuple[str, str] | None:
    """``(crm connection, deal id)`` of a deal key, or ``None`` for another kind of key."""
    crm, sep, deal_id = key.partition(":deal:")
    return (crm, deal_id) if sep and crm and deal_id else None


@dataclass(kw_only=True)
class Names:
    """Deal and client names found in the store, by key.

    Attributes:
        deals: deal key → the deal's name.
        clients: client key → the client's legal name.
        deal_clients: deal key → the client key its engagement bills.
        companies: deal key → the name of the deal's company in the last-seen copy (for
            a deal whose client was never mapped).
    """

    deals: dict[str, str] = field(default_factory=dict)
    clients: dict[str, str] = field(default_factory=dict)
    deal_clients: dict[str, str] = field(default_factory=dict)
    companies: dict[str, str] = field(default_factory=dict)

    def deal(self, key: str | None) -> str | None:
        """The name of the deal with this key, if the store knows it."""
        return self.deals.get(key) if key else None

    def client(self, key: str | None, *, deal: str | None = None) -> str | None:
        """The legal name of a client, else the name of the deal's company."""
        key = key or self.client_of(deal)
        found = self.clients.get(key) if key else None
        return found or (self.companies.get(deal) if deal else None)

    def client_of(self, deal: str | None) -> str | None:
        """The client key of a deal's engagement."""
        return self.deal_clients.get(deal) if deal else None


async def load_names(store: Store, *, deals: Iterable[str | None] = (), clients: Iterable[str | None] = ()) -> Names:
    """The names of these deals (keys ``crm:deal:id``) and clients, and the clients of these deals."""
    names = Names()
    for key in {key for key in deals if key}:
        await _load_deal(store, key, names)
    for key in {key for key in (*clients, *names.deal_clients.values()) if key}:
        row: ClientRow | None = await store.get(ClientRow, key)
        if row is not None:
            names.clients[key] = row.legal_name
    return names


async def _load_deal(store: Store, key: str, names: Names) -> None:
    engagement: EngagementRow | None = await store.get(EngagementRow, key)
    name: Any = None
    if engagement is not None:
        names.deal_clients[key] = engagement.client_key
        name = engagement.data.get("name") if isinstance(engagement.data, Mapping) else None
    split = split_deal_key(key)
    record: SourceRecordRow | None = None
    if split is not None:
        record = await store.get(SourceRecordRow, split[0], "deal", split[1])
    if record is not None:
        name = name or _record_name(record.data, "deal")
        company = _record_name(record.data, "company")
        if company:
            names.companies[key] = company
    if name:
        names.deals[key] = str(name)


def _record_name(data: Any, part: str) -> str | None:
    """The name a stored CRM record carries for ``part`` (HubSpot: ``deal.properties.dealname``)."""
    if not isinstance(data, Mapping):
        return None
    found = data.get(part)
    properties = found.get("properties") if isinstance(found, Mapping) else None
    if not isinstance(properties, Mapping):
        return None
    for name in ("dealname", "name"):
        value = properties.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


# ---------------------------------------------------------------------------- dead letters


@dataclass(frozen=True, kw_only=True)
class DeadLetterItem:
    """A dead letter with the deal and client it is about, where the store knows them."""

    row: DeadLetterRow
    deal: str | None = None
    deal_name: str | None = None
    client: str | None = None
    client_name: str | None = None


async def dead_letters(store: Store, *, every: bool = False) -> list[DeadLetterItem]:
    """Dead letters, oldest first (open ones unless ``every``), with their deal and client names."""
    table = table_of(DeadLetterRow)
    where = [] if every else [table.c.status == "open"]
    rows: list[DeadLetterRow] = await store.select(DeadLetterRow, *where, order_by=table.c.id)
    subjects = [await _letter_subject(store, row) for row in rows]
    names = await load_names(store, deals=[deal for deal, _ in subjects], clients=[client for _, client in subjects])
    items = []
    for row, (deal, client) in zip(rows, subjects, strict=True):
        client = client or names.client_of(deal)
        items.append(
            DeadLetterItem(
                row=row,
                deal=deal,
                deal_name=names.deal(deal),
                client=client,
                client_name=names.client(client, deal=deal),
            )
        )
    return items


async def _letter_subject(store: Store, row: DeadLetterRow) -> tuple[str | None, str | None]:
    """The deal key and client key a dead letter is about, as far as its event or effect says."""
    payload = row.payload if isinstance(row.payload, Mapping) else {}
    if row.source == "event" and row.ref.isdigit():
        event: EventRow | None = await store.get(EventRow, int(row.ref))
        if event is not None and event.object_type == "deal":
            return deal_key(event.connection, event.object_id), None
        if event is not None and event.object_type == "invoice":
            return await _invoice_subject(store, table_of(InvoiceRow).c.invoice_id == event.object_id)
        return None, None
    if row.source == "effect" and row.ref.isdigit():
        effect: EffectRow | None = await store.get(EffectRow, int(row.ref))
        return await _effect_subject(store, effect) if effect is not None else (None, None)
    if row.source == "manual_credit":
        billed: BillingEventRow | None = await store.get(BillingEventRow, row.ref)
        client = payload.get("client")
        return (billed.engagement_key if billed else None), (str(client) if client else None)
    return None, None


async def _effect_subject(store: Store, effect: EffectRow) -> tuple[str | None, str | None]:
    payload = effect.payload if isinstance(effect.payload, Mapping) else {}
    deal_id = payload.get("crm_object_id")
    if deal_id:
        return deal_key(str(payload.get("crm") or effect.connection), str(deal_id)), effect.client_key
    invoice_key = payload.get("invoice_key") or payload.get("credit_key")
    if invoice_key:
        deal, client = await _invoice_subject(store, table_of(InvoiceRow).c.key == str(invoice_key))
        return deal, client or effect.client_key
    return None, effect.client_key


async def _invoice_subject(store: Store, where: Any) -> tuple[str | None, str | None]:
    rows: list[InvoiceRow] = await store.select(InvoiceRow, where, limit=1)
    if not rows:
        return None, None
    return deal_key(rows[0].crm_connection, rows[0].crm_object_id), rows[0].client_key


def dead_letter_json(item: DeadLetterItem) -> dict[str, Any]:
    """One dead letter as a JSON object (stable keys)."""
    row = item.row
    return {
        "id": row.id,
        "status": row.status,
        "source": row.source,
        "ref": row.ref,
        "connection": row.connection,
        "reason": row.reason,
        "place": row.place,
        "created_at": _iso(row.created_at),
        "deal": item.deal,
        "deal_name": item.deal_name,
        "client": item.client,
        "client_name": item.client_name,
        "replayed_at": _iso(row.replayed_at),
        "dismissed_at": _iso(row.dismissed_at),
        "dismissed_by": row.dismissed_by,
        "dismissed_why": row.dismissed_why,
    }


def dead_letter_lines(
    items: Sequence[DeadLetterItem], counts: Mapping[str, int], *, every: bool, width: int
) -> list[str]:
    """The dead letters as text; ``counts`` (by status) tells what ``--all`` would add."""
    lines: list[str] = []
    for item in items:
        lines += entry(_letter_head(item.row), _letter_fields(item), width)
    if not items:
        lines.append("no dead letters" if every else "no open dead letters")
    hidden = {status: n for status, n in sorted(counts.items()) if status != "open" and n}
    if hidden and not every:
        told = ", ".join(f"{n} {status}" for status, n in hidden.items())
        lines += _wrap(f"not shown: {told} (--all lists them)", width, "", "")
    return lines


def _letter_head(row: DeadLetterRow) -> str:
    return f"#{row.id} {row.status} · {row.source} {row.ref} · {row.connection} · {when(row.created_at)}"


def _letter_fields(item: DeadLetterItem) -> list[tuple[str, str]]:
    row = item.row
    dismissed = ""
    if row.status == "dismissed":
        dismissed = f"{when(row.dismissed_at)} by {row.dismissed_by}: {row.dismissed_why}"
    return [
        ("deal", _named(item.deal_name, item.deal)),
        ("client", _named(item.client_name, item.client)),
        ("reason", row.reason),
        ("place", row.place or ""),
        ("replayed", when(row.replayed_at)),
        ("dismissed", dismissed),
    ]


def _named(name: str | None, key: str | None) -> str:
    """``Northwind Traders LLC (hubspot:company:1001)``: a name with its key, or whichever is known."""
    if name and key:
        return f"{name} ({key})"
    return name or key or ""


# ---------------------------------------------------------------------------- status


@dataclass(frozen=True, kw_only=True)
class ConnectionStatus:
    """One connection's standing: its last sync, its backlog and its dead letters.

    ``last_sync`` is the newest successful read of any of its feeds (``cursors``: the
    change feed, a time tracker's entries); ``last_error`` names each feed's last error.
    """

    connection: str
    last_sync: datetime | None
    last_error: str | None
    events_pending: int
    effects_pending: int
    dead_letters_open: int
    dead_letters_dismissed: int
    failing_since: datetime | None = None
    failures: int = 0


@dataclass(frozen=True, kw_only=True)
class AlertStatus:
    """The alert queue (:mod:`syncd.engine.alerts`), so that a broken alerts webhook shows.

    Attributes:
        configured: ``[alerts] webhook_url`` is set.
        pending: alerts waiting to be posted, failed ones included.
        failed: of those, how many had a delivery fail and wait for a retry.
        oldest_pending_at: when the oldest waiting alert was recorded.
        last_error: the receiver's answer (or the transport error) to the latest failed delivery.
        retry_at: when the sender tries the failed ones again.
        hooked: alerts recorded through the hook (audit trends, client conflicts) no sender has taken yet.
        last_sent_at: when a message last went out (sent ones are kept 30 days).
    """

    configured: bool
    pending: int
    failed: int
    oldest_pending_at: datetime | None
    last_error: str | None
    retry_at: datetime | None
    hooked: int
    last_sent_at: datetime | None


@dataclass(frozen=True, kw_only=True)
class InvoiceItem:
    """An invoice syncd created, with its deal's and client's names."""

    row: InvoiceRow
    deal_name: str | None
    client_name: str | None


@dataclass(frozen=True, kw_only=True)
class Status:
    """What ``syncd status`` shows.

    Attributes:
        connections: each configured connection, in config order.
        invoices: the newest invoices (at most :data:`INVOICES_SHOWN`), newest first.
        invoice_count: every invoice and credit note syncd created.
        outcomes: open outcomes counted by (kind, reason).
        alerts: the alert queue.
    """

    connections: list[ConnectionStatus]
    invoices: list[InvoiceItem]
    invoice_count: int
    outcomes: dict[tuple[str, str], int]
    alerts: AlertStatus


async def status(store: Store, connections: Sequence[str], *, alerting: bool = False) -> Status:
    """Read the status of these connections, the newest invoices, the open outcomes and the alert queue.

    Args:
        alerting: whether ``[alerts] webhook_url`` is set.
    """
    dead = await store.dead_letter_counts()
    streaks = {row.connection: row for row in await store.select(VendorHealthRow)}
    found = []
    for name in connections:
        cursors: list[CursorRow] = await store.select(CursorRow, table_of(CursorRow).c.connection == name)
        synced = [cursor.last_success_at for cursor in cursors if cursor.last_success_at is not None]
        errors = [f"{cursor.stream}: {cursor.last_error}" for cursor in cursors if cursor.last_error]
        found.append(
            ConnectionStatus(
                connection=name,
                last_sync=max(synced, default=None),
                last_error="; ".join(errors) or None,
                events_pending=await _pending(store, EventRow, name),
                effects_pending=await _pending(store, EffectRow, name),
                dead_letters_open=dead.get((name, "open"), 0),
                dead_letters_dismissed=dead.get((name, "dismissed"), 0),
                failing_since=streak.failing_since if (streak := streaks.get(name)) else None,
                failures=streak.failures if streak and streak.failing_since else 0,
            )
        )
    table = table_of(InvoiceRow)
    rows: list[InvoiceRow] = await store.select(InvoiceRow, order_by=table.c.created_at.desc(), limit=INVOICES_SHOWN)
    names = await load_names(
        store,
        deals=[deal_key(row.crm_connection, row.crm_object_id) for row in rows],
        clients=[row.client_key for row in rows],
    )
    invoices = [
        InvoiceItem(
            row=row,
            deal_name=names.deal(deal_key(row.crm_connection, row.crm_object_id)),
            client_name=names.client(row.client_key),
        )
        for row in rows
    ]
    return Status(
        connections=found,
        invoices=invoices,
        invoice_count=await store.count(InvoiceRow),
        outcomes=await store.outcome_counts(),
        alerts=await alert_status(store, configured=alerting),
    )


async def alert_status(store: Store, *, configured: bool) -> AlertStatus:
    """The alert queue: what waits, what failed and why, what no sender has taken yet."""
    table, hook = table_of(AlertRow), table_of(PendingAlertRow)
    pending = table.c.status == "pending"
    failed = sa.and_(pending, table.c.last_error.is_not(None))
    async with store.connect() as conn:
        waiting = (await conn.execute(sa.select(sa.func.count(), sa.func.min(table.c.created_at)).where(pending))).one()
        failures = await conn.scalar(sa.select(sa.func.count()).where(failed))
        latest = (
            await conn.execute(
                sa.select(table.c.last_error, table.c.next_at).where(failed).order_by(table.c.next_at.desc()).limit(1)
            )
        ).first()
        hooked = await conn.scalar(sa.select(sa.func.count()).select_from(hook).where(hook.c.sent_at.is_(None)))
        last_sent = await conn.scalar(sa.select(sa.func.max(table.c.sent_at)))
    return AlertStatus(
        configured=configured,
        pending=int(waiting[0]),
        failed=int(failures or 0),
        oldest_pending_at=_utc(waiting[1]),
        last_error=latest[0] if latest else None,
        retry_at=_utc(latest[1]) if latest else None,
        hooked=int(hooked or 0),
        last_sent_at=_utc(last_sent),
    )


def _utc(moment: datetime | None) -> datetime | None:
    """An aggregate's timestamp (which bypasses the column type) as an aware UTC datetime."""
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


async def _pending(store: Store, model: type[EventRow] | type[EffectRow], connection: str) -> int:
    table = table_of(model)
    return await store.count(model, table.c.connection == connection, table.c.status == "pending")


def status_json(found: Status) -> dict[str, Any]:
    """The status as one JSON object of lists (stable keys)."""
    return {
        "connections": [
            {
                "connection": item.connection,
                "last_sync": _iso(item.last_sync),
                "last_error": item.last_error,
                "events_pending": item.events_pending,
                "effects_pending": item.effects_pending,
                "dead_letters_open": item.dead_letters_open,
                "dead_letters_dismissed": item.dead_letters_dismissed,
                "failing_since": _iso(item.failing_since),
                "failures": item.failures,
            }
            for item in found.connections
        ],
        "invoices": [invoice_json(item) for item in found.invoices],
        "invoice_count": found.invoice_count,
        "outcomes": [
            {"kind": kind, "reason": reason, "count": count} for (kind, reason), count in sorted(found.outcomes.items())
        ],
        "alerts": alert_json(found.alerts),
    }


def alert_json(alerts: AlertStatus) -> dict[str, Any]:
    """The alert queue as a JSON object (stable keys)."""
    return {
        "configured": alerts.configured,
        "pending": alerts.pending,
        "failed": alerts.failed,
        "oldest_pending_at": _iso(alerts.oldest_pending_at),
        "last_error": alerts.last_error,
        "retry_at": _iso(alerts.retry_at),
        "hooked": alerts.hooked,
        "last_sent_at": _iso(alerts.last_sent_at),
    }


def invoice_json(item: InvoiceItem) -> dict[str, Any]:
    """One invoice as a JSON object (stable keys; amounts as decimal strings)."""
    row = item.row
    return {
        "key": row.key,
        "kind": row.kind,
        "number": row.number,
        "state": row.state,
        "total": row.total,
        "amount_due": row.amount_due,
        "currency": row.currency,
        "due_date": row.due_date.isoformat() if row.due_date else None,
        "deal": deal_key(row.crm_connection, row.crm_object_id),
        "deal_name": item.deal_name,
        "client": row.client_key,
        "client_name": item.client_name,
        "invoicing_connection": row.invoicing_connection,
        "invoice_id": row.invoice_id,
        "created_at": _iso(row.created_at),
    }


def status_lines(found: Status, width: int) -> list[str]:
    """The status as text: connections, the alert queue, the newest invoices, dead letters and outcomes."""
    lines = ["connections:"]
    for item in found.connections:
        lines += entry(
            f"{item.connection}: last sync {when(item.last_sync) or 'never'}",
            [
                ("pending", f"{item.events_pending} events, {item.effects_pending} effects"),
                ("dead letters", f"{item.dead_letters_open} open, {item.dead_letters_dismissed} dismissed"),
                ("last error", item.last_error or ""),
                (
                    "failing",
                    f"since {when(item.failing_since)}, {item.failures} failures" if item.failing_since else "",
                ),
            ],
            width,
            indent=2,
        )
    lines += alert_lines(found.alerts, width)
    shown = len(found.invoices)
    more = f" (the {shown} newest below)" if found.invoice_count > shown else ""
    lines.append(f"invoices: {found.invoice_count}{more}")
    for invoice in found.invoices:
        lines += _invoice_lines(invoice, width)
    lines += _wrap(outcome_summary(found.outcomes), width, "", "  ")
    return lines


def alert_lines(alerts: AlertStatus, width: int) -> list[str]:
    """The alert queue as text: what waits, and the failed deliveries with the receiver's answer."""
    if not alerts.configured and not alerts.pending:
        return ["alerts: off (no [alerts] webhook_url)"]
    waiting = f"{alerts.pending} waiting" + (f" since {when(alerts.oldest_pending_at)}" if alerts.pending else "")
    state = "on" if alerts.configured else "off (no [alerts] webhook_url), yet"
    failed = f"{alerts.failed}, next try {when(alerts.retry_at)}" if alerts.failed else ""
    return entry(
        f"alerts: {state} {waiting}",
        [
            ("failed deliveries", failed),
            ("last error", alerts.last_error or ""),
            ("not yet queued", f"{alerts.hooked} (audit trends, client conflicts)" if alerts.hooked else ""),
            ("last sent", when(alerts.last_sent_at) or "never"),
        ],
        width,
    )


def _invoice_lines(item: InvoiceItem, width: int) -> list[str]:
    row = item.row
    number = row.number or row.invoice_id
    kind = "" if row.kind == "invoice" else f"{row.kind.replace('_', ' ')} "
    due = f" · due {row.due_date.isoformat()}" if row.due_date else ""
    head = f"{kind}{number} · {row.total} {row.currency} · {row.state}{due}"
    deal = _named(item.deal_name, deal_key(row.crm_connection, row.crm_object_id))
    return entry(head, [("deal", deal), ("client", _named(item.client_name, row.client_key))], width, indent=2)


def outcome_summary(counts: Mapping[tuple[str, str], int]) -> str:
    """One line: open outcomes by kind, with the reasons (``syncd outcomes list`` has each)."""
    parts = []
    for kind in OUTCOME_KINDS:
        reasons = {reason: n for (k, reason), n in counts.items() if k == kind}
        detail = ", ".join(f"{reason} {n}" for reason, n in sorted(reasons.items()))
        parts.append(f"{kind}: {sum(reasons.values())}" + (f" ({detail})" if detail else ""))
    return "outcomes without an invoice: " + "; ".join(parts)


# ---------------------------------------------------------------------------- unbilled hours


@dataclass(frozen=True, kw_only=True)
class UnbilledItem:
    """Hours of one tracker project on no invoice (:class:`syncd.hours.Unbilled`), with names."""

    hours: Any  # syncd.hours.Unbilled (not imported: the hours module pulls in the runtime)
    deal: str | None
    deal_name: str | None
    client_name: str | None


async def unbilled_names(store: Store, found: Sequence[Any]) -> list[UnbilledItem]:
    """Each :class:`syncd.hours.Unbilled` with its engagement's deal name and its client's legal name."""
    deals = [
        item.engagement_key if item.engagement_key and split_deal_key(item.engagement_key) else None for item in found
    ]
    names = await load_names(store, deals=deals, clients=[item.client_key for item in found])
    return [
        UnbilledItem(
            hours=item,
            deal=deal,
            deal_name=names.deal(deal),
            client_name=names.client(item.client_key, deal=deal),
        )
        for item, deal in zip(found, deals, strict=True)
    ]


def unbilled_note(item: Any) -> str:
    """Why the hours are not billed yet, when there is more to say than the numbers."""
    if item.over_cap_hours:
        entries = " ".join(item.over_cap_entries)
        return f"over_cap: {item.over_cap_hours} h held (syncd hours release {entries})"
    if item.simulated_hours:
        return f"{item.simulated_hours} h only on simulated (pilot) invoices"
    if item.engagement_key is None:
        return "no engagement bills this project"
    return ""


def unbilled_json(item: UnbilledItem) -> dict[str, Any]:
    """One project's unbilled hours as a JSON object (stable keys; hours and money as decimal strings)."""
    hours = item.hours
    return {
        "client": hours.client_key,
        "client_name": item.client_name,
        "connection": hours.connection,
        "project_id": hours.project_id,
        "engagement": hours.engagement_key,
        "deal_name": item.deal_name,
        "hours": _decimal(hours.hours),
        "amount": _decimal(hours.amount),
        "currency": hours.currency,
        "simulated_hours": _decimal(hours.simulated_hours),
        "over_cap_hours": _decimal(hours.over_cap_hours),
        "over_cap_entries": list(hours.over_cap_entries),
        "note": unbilled_note(hours) or None,
    }


def _decimal(value: Decimal | None) -> str | None:
    return format(value, "f") if value is not None else None


def unbilled_lines(items: Sequence[UnbilledItem], width: int) -> list[str]:
    """The unbilled hours as text, one entry per client and project."""
    lines: list[str] = []
    for item in items:
        hours = item.hours
        worth = f" · {hours.amount} {hours.currency}" if hours.amount is not None else ""
        deal = _named(item.deal_name, item.deal or hours.engagement_key)
        lines += entry(
            _named(item.client_name, hours.client_key) or "no client",
            [
                ("project", f"{hours.connection}:{hours.project_id}"),
                ("deal", deal),
                ("hours", f"{hours.hours} h{worth}"),
                ("note", unbilled_note(hours)),
            ],
            width,
        )
    return lines or ["no billable hours left unbilled"]
