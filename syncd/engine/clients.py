"""The one client billing record: each field's value in force, who owns it, and what changed where.

A client's details live in two systems: the CRM (the company and its billing contact, the
deal's hourly rate) and the ledger (the customer record). The record keeps, per field,
the value in force (``clients.record``) and the value last seen at, or written to, each
system (``clients.seen``). Each field has an owner (``[clients.owners]``,
:class:`~syncd.plumbing.settings.ClientsSettings`; by default the CRM owns everything but the
payment terms, which the ledger owns).

When a system is read (the CRM when a deal is processed, the ledger before each invoice
and on its contact webhooks), :func:`observe` compares each field with what was last seen
there:

* unchanged: nothing happens;
* changed at the **owner**: the value is in force, and flows to the other system
  (:func:`settle_ledger` writes it: the ledger's customer record, or the CRM company's
  property the mapping reads the field from);
* changed at a **non-owner** to a value the owner does not hold: a *conflict*. The
  owner's value stays in force and keeps being used on invoices; nothing is written to
  either system for that field until ``syncd client resolve KEY FIELD --take owner|other``
  (:func:`resolve`). It is recorded (``client_conflicts``), listed as an outcome that
  needs attention (reason ``client_conflict``) and as a pending alert;
* the first value seen at a system: taken as the value in force if the system owns the
  field (or nothing was known), else the value in force is written over it.

Every change, seen or written, is in the change log (``client_changes``) that
``syncd client show KEY`` prints. A change of an hourly rate is kept on the engagement
as well (:func:`syncd.engine.recurring.with_rate_history`): hours dated from the change on are
billed at the new rate, hours already invoiced never again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
import structlog

from syncd.core.errors import RecordError, SyncdError
from syncd.core.interfaces import Client, Contact, Engagement, UpdatesCompanies, UpdatesCustomers
from syncd.plumbing.settings import CLIENT_FIELDS, ClientsSettings
from syncd.store.db import (
    ClientChangeRow,
    ClientConflictRow,
    ClientRow,
    Connection,
    EngagementRow,
    OutcomeRow,
    Store,
    table_of,
)

if TYPE_CHECKING:
    from syncd.engine.runtime import Runtime
    from syncd.plumbing.settings import Config

log = structlog.get_logger("syncd.engine.clients")

RATE = "rate@"  # a rate's field is ``rate@<engagement key>``, owned as ``rates``
# The Client.ledger_details keys that hold each field at the ledger.
LEDGER_KEYS: Mapping[str, tuple[str, ...]] = {
    "legal_name": ("legal_name",),
    "billing_contact": ("first_name", "last_name", "email"),
    "address": ("address",),
    "tax_id": ("tax_id",),
    "payment_terms_days": ("payment_terms_days",),
}
# Fields that can be written onto a CRM company (scalars the mapping reads from one property).
CRM_WRITABLE = ("legal_name", "tax_id", "payment_terms_days")


def base_field(name: str) -> str:
    """The owner-config field of a record field (``rate@hubspot:deal:1`` is ``rates``)."""
    return "rates" if name.startswith(RATE) else name


def show_value(value: Any) -> str:
    """A field's value for people: a billing contact as ``Name <email>``, nothing as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, Mapping):
        name = " ".join(str(value[part]) for part in ("first_name", "last_name") if value.get(part))
        email = value.get("email")
        return f"{name} <{email}>" if email and name else str(email or name or "-")
    return str(value)


# ---------------------------------------------------------------------------
# Each system's view of a client
# ---------------------------------------------------------------------------


def _person(first: str | None, last: str | None, email: str | None) -> dict[str, str | None]:
    return {"first_name": first or None, "last_name": last or None, "email": email or None}


def crm_view(client: Client, engagement: Engagement | None = None) -> dict[str, Any]:
    """The client's fields as the CRM holds them (the mapped client, and the deal's rate)."""
    person = client.billing_contact or Contact()
    view: dict[str, Any] = {
        "legal_name": client.legal_name,
        "billing_contact": _person(person.first_name, person.last_name, person.email),
        "address": client.address_line(),
        "tax_id": client.tax_id,
        "currency": client.currency,
        "payment_terms_days": client.payment_terms_days,
        "po_number": client.po_number,
    }
    if engagement is not None and engagement.rate is not None:
        view[RATE + engagement.key] = str(engagement.rate)
    return view


def ledger_view(details: Mapping[str, str | None]) -> dict[str, Any]:
    """The client's fields as the ledger holds them (:meth:`~syncd.core.interfaces.UpdatesCustomers.customer_details`).

    Payment terms the ledger holds in a form syncd cannot read are left out (not seen).
    """
    view: dict[str, Any] = {
        "legal_name": details.get("legal_name"),
        "billing_contact": _person(details.get("first_name"), details.get("last_name"), details.get("email")),
        "address": details.get("address"),
        "tax_id": details.get("tax_id"),
    }
    terms = details.get("payment_terms_days")
    if terms is not None:
        view["payment_terms_days"] = int(terms)
    return view


def _from_pushed(pushed: Mapping[str, Any]) -> dict[str, Any]:
    """What syncd last wrote to a ledger before the client record existed, as seen values."""
    view = ledger_view({**pushed, "payment_terms_days": None})
    return {name: value for name, value in view.items() if name != "billing_contact" or any(value.values())}


def applied(client: Client, record: Mapping[str, Any] | None) -> Client:
    """``client`` with the values in force of the fields another system may own (name, tax id, terms)."""
    if not record:
        return client
    update: dict[str, Any] = {}
    for name in ("legal_name", "tax_id"):
        if name in record and record[name] is not None:
            update[name] = record[name]
    if record.get("payment_terms_days") is not None:
        update["payment_terms_days"] = int(record["payment_terms_days"])
    return client.model_copy(update=update)


# ---------------------------------------------------------------------------
# Settling one observation (pure)
# ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Change:
    """A field's value changed at a system (``by="seen"``) or was written there by syncd (``by="syncd"``)."""

    system: str
    field: str
    old: Any
    new: Any
    by: str = "seen"


@dataclass(frozen=True, kw_only=True)
class Conflict:
    """A field changed at ``other``, a system that does not own it, to a value the owner does not hold."""

    field: str
    owner: str
    other: str
    owner_value: Any
    other_value: Any


@dataclass(kw_only=True)
class Settled:
    """What one observation did to the record.

    Attributes:
        record: the values in force afterwards.
        seen: per system, the values last seen there afterwards.
        changes: the fields that changed at the system.
        conflicts: conflicts to open.
        agreed: fields whose open conflicts at the system are over (it holds the value in force again).
    """

    record: dict[str, Any]
    seen: dict[str, dict[str, Any]]
    changes: list[Change] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    agreed: list[str] = field(default_factory=list)


def observe(
    record: Mapping[str, Any] | None,
    seen: Mapping[str, Mapping[str, Any]] | None,
    *,
    system: str,
    role: str,
    observed: Mapping[str, Any],
    owners: ClientsSettings,
    owner_systems: Mapping[str, str],
) -> Settled:
    """Settle what ``system`` (playing ``role``: ``crm`` or ``ledger``) holds now against the record.

    Args:
        record: the values in force (``None``: a new client).
        seen: per system, the values last seen there.
        system: the connection read.
        role: its role for the client.
        observed: its values now (:func:`crm_view`, :func:`ledger_view`).
        owners: who owns each field.
        owner_systems: role → the client's connection playing it (named in conflicts).
    """
    values = dict(record or {})
    views = {name: dict(found) for name, found in (seen or {}).items()}
    last = views.setdefault(system, {})
    settled = Settled(record=values, seen=views)
    for name, now in observed.items():
        owned = owners.owner(base_field(name)) == role
        if name not in last:
            last[name] = now
            if name not in values or (owned and values[name] != now):
                settled.changes.append(Change(system=system, field=name, old=values.get(name), new=now))
                values[name] = now
            continue
        before = last[name]
        if before == now:
            continue
        last[name] = now
        settled.changes.append(Change(system=system, field=name, old=before, new=now))
        if values.get(name) == now:
            settled.agreed.append(name)
        elif owned:
            values[name] = now
        else:
            owner = owners.owner(base_field(name))
            settled.conflicts.append(
                Conflict(
                    field=name,
                    owner=owner_systems.get(owner, owner),
                    other=system,
                    owner_value=values.get(name),
                    other_value=now,
                )
            )
    return settled


def due_writes(
    record: Mapping[str, Any], seen: Mapping[str, Any], fields: tuple[str, ...], blocked: set[str]
) -> list[str]:
    """The fields of ``fields`` a system holds differently from the record (and no conflict holds back)."""
    return [
        name
        for name in fields
        if name in record and record[name] is not None and seen.get(name) != record[name] and name not in blocked
    ]


# ---------------------------------------------------------------------------
# Reading and writing the record
# ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Systems:
    """The connections a client lives in, and what syncd can write there.

    Attributes:
        crm: the CRM connection (the client key's prefix), if it is configured.
        company_id: the CRM company the client is (``None`` for a client keyed on a contact or deal).
        crm_properties: field → the company property it is written to.
        ledgers: the ledger connections holding a customer record for it, with its id.
    """

    crm: str | None
    company_id: str | None
    crm_properties: Mapping[str, str]
    ledgers: Mapping[str, str]

    def owner_systems(self, ledger: str | None = None) -> dict[str, str]:
        """Role → connection, for naming owners in conflicts."""
        found = {"crm": self.crm or "crm"}
        found["ledger"] = ledger or next(iter(self.ledgers), "ledger")
        return found


def systems_of(runtime: Runtime, row: ClientRow) -> Systems:
    """Where ``row``'s client lives, from its key and its external ids."""
    connection, _, rest = row.key.partition(":")
    kind, _, ident = rest.partition(":")
    pipelines = [p for p in runtime.pipelines if p.crm_name == connection]
    properties: dict[str, str] = {}
    if pipelines:
        for name in CRM_WRITABLE:
            found = pipelines[0].mapping.client_property(name)
            if found is not None:
                properties[name] = found
    invoicing = {p.invoicing_name for p in runtime.pipelines}
    return Systems(
        crm=connection if pipelines else None,
        company_id=ident if kind == "company" else None,
        crm_properties=properties,
        ledgers={name: str(ident) for name, ident in row.external_ids.items() if name in invoicing},
    )


async def locked_row(store: Store, conn: Connection, key: str) -> ClientRow | None:
    """The client's row, locked for this transaction on PostgreSQL (SQLite's writer lock serialises)."""
    table = table_of(ClientRow)
    stmt = sa.select(table).where(table.c.key == key)
    if store.is_postgres:
        stmt = stmt.with_for_update()
    found = (await conn.execute(stmt)).mappings().first()
    return None if found is None else ClientRow.model_validate(dict(found))


def _seed(row: ClientRow) -> dict[str, dict[str, Any]]:
    """``seen`` of a row, seeded from what syncd last wrote to each ledger before the record existed."""
    if row.seen:
        return {name: dict(values) for name, values in row.seen.items()}
    return {name: _from_pushed(values) for name, values in (row.pushed or {}).items() if isinstance(values, Mapping)}


async def record_observation(
    store: Store,
    conn: Connection,
    row: ClientRow,
    *,
    system: str,
    role: str,
    observed: Mapping[str, Any],
    owners: ClientsSettings,
    owner_systems: Mapping[str, str],
    now: datetime,
) -> Settled:
    """Settle an observation (:func:`observe`) and store it in the caller's transaction.

    Changes go to the change log; new conflicts are recorded with an outcome that needs
    attention and a pending alert; conflicts the system has come back from are closed.
    """
    blocked = await open_conflicts(conn, row.key, system)
    settled = observe(
        row.record, _seed(row), system=system, role=role, observed=observed, owners=owners, owner_systems=owner_systems
    )
    settled.conflicts = [c for c in settled.conflicts if not _already_open(blocked, c)]
    await conn.execute(
        sa.update(table_of(ClientRow))
        .where(table_of(ClientRow).c.key == row.key)
        .values(record=settled.record, seen=settled.seen)
    )
    await _log(conn, row.key, settled.changes, now)
    for conflict in settled.conflicts:
        await _open_conflict(store, conn, row, conflict, now)
    for name in settled.agreed:
        await _close(conn, row.key, name, system, f"{system} holds the value in force again", now)
    for other in (await open_conflicts(conn, row.key)).values():
        if other.other != system and settled.record.get(other.field) == other.other_value:
            await _close(conn, row.key, other.field, other.other, f"{system} now holds the same value", now)
    if settled.changes:
        log.info(
            "client_record_seen",
            client=row.key,
            system=system,
            fields=sorted({c.field for c in settled.changes}),
            conflicts=[c.field for c in settled.conflicts],
        )
    return settled


def _already_open(blocked: Mapping[str, ClientConflictRow], conflict: Conflict) -> bool:
    """A conflict already open for the field at that system with the same value is not opened twice."""
    found = blocked.get(conflict.field)
    return found is not None and found.other_value == conflict.other_value


async def open_conflicts(conn: Connection, client_key: str, system: str | None = None) -> dict[str, ClientConflictRow]:
    """Open conflicts of a client by field (at ``system`` only, if given)."""
    table = table_of(ClientConflictRow)
    stmt = sa.select(table).where(table.c.client_key == client_key, table.c.status == "open")
    if system is not None:
        stmt = stmt.where(table.c.other == system)
    rows = (await conn.execute(stmt.order_by(table.c.id))).mappings().all()
    return {str(r["field"]): ClientConflictRow.model_validate(dict(r)) for r in rows}


async def _log(conn: Connection, client_key: str, changes: list[Change], now: datetime) -> None:
    if not changes:
        return
    rows = [
        {
            "client_key": client_key,
            "system": c.system,
            "field": c.field,
            "old": c.old,
            "new": c.new,
            "by": c.by,
            "at": now,
        }
        for c in changes
    ]
    await conn.execute(sa.insert(table_of(ClientChangeRow)), rows)


def _outcome_key(client_key: str, conflict_id: int) -> str:
    return f"attention:client_conflict:{client_key}:{conflict_id}"


async def _open_conflict(store: Store, conn: Connection, row: ClientRow, conflict: Conflict, now: datetime) -> None:
    # An older conflict of the field at the same system is superseded by the new value.
    await _close(conn, row.key, conflict.field, conflict.other, "superseded by a newer edit", now)
    table = table_of(ClientConflictRow)
    inserted = await conn.execute(
        sa.insert(table)
        .values(
            client_key=row.key,
            field=conflict.field,
            owner=conflict.owner,
            other=conflict.other,
            owner_value=conflict.owner_value,
            other_value=conflict.other_value,
            status="open",
            opened_at=now,
        )
        .returning(table.c.id)
    )
    conflict_id = int(inserted.scalar_one())
    text = (
        f"client {row.key} ({row.legal_name}): {conflict.field} was changed at {conflict.other} to "
        f"{show_value(conflict.other_value)}, but {conflict.owner} owns it and holds {show_value(conflict.owner_value)}; "
        f"{show_value(conflict.owner_value)} stays in use and nothing was overwritten. "
        f"Settle it with `syncd client resolve {row.key} {conflict.field} --take owner|other`"
    )
    await store.add_outcome(
        conn,
        key=_outcome_key(row.key, conflict_id),
        kind="attention",
        reason="client_conflict",
        detail=text,
        place=f"[clients.owners].{base_field(conflict.field)}",
        connection=conflict.other,
        client_key=row.key,
        created_at=now,
    )
    await store.add_alert(
        conn=conn,
        key=f"client_conflict:{conflict_id}",
        source="client",
        title=f"Client detail conflict: {row.legal_name}, {conflict.field}",
        text=text,
        fields={
            "client": row.key,
            "field": conflict.field,
            "owner": conflict.owner,
            "owner_value": show_value(conflict.owner_value),
            "changed_at": conflict.other,
            "other_value": show_value(conflict.other_value),
        },
        now=now,
    )
    log.warning("client_conflict", client=row.key, field=conflict.field, owner=conflict.owner, other=conflict.other)


async def _close(conn: Connection, client_key: str, name: str, system: str, why: str, now: datetime) -> None:
    table = table_of(ClientConflictRow)
    rows = (
        await conn.execute(
            sa.update(table)
            .where(
                table.c.client_key == client_key,
                table.c.field == name,
                table.c.other == system,
                table.c.status == "open",
            )
            .values(status="resolved", resolved_at=now, resolution=why)
            .returning(table.c.id)
        )
    ).all()
    outcomes = table_of(OutcomeRow)
    for (conflict_id,) in rows:
        await conn.execute(
            sa.update(outcomes)
            .where(outcomes.c.key == _outcome_key(client_key, int(conflict_id)), outcomes.c.status == "open")
            .values(status="resolved", resolved_at=now, detail=outcomes.c.detail + f" — resolved: {why}")
        )


# ---------------------------------------------------------------------------
# The ledger side, before each invoice
# ---------------------------------------------------------------------------


async def settle_ledger(
    runtime: Runtime,
    *,
    connection: str,
    invoicing: Any,
    client_key: str,
    customer_id: str,
    created: Client | None = None,
    external_ids: Mapping[str, str] | None = None,
    read_details: Callable[[str], Awaitable[dict[str, str | None]]] | None = None,
) -> Client | None:
    """Read the client's customer record at a ledger, settle it, and write what flows.

    The ledger's values are observed (:func:`record_observation`); then each field the
    ledger holds differently from the record, and does not own, is written to it, and
    each such field of the CRM company is written there (only fields with no open
    conflict at that system). The caller holds the client's customer lock.

    The database work is one transaction between the vendor calls: the ledger's record is
    read before it, and a write to the ledger or the CRM company comes after it, recorded
    in a transaction of its own only when there is one (BENCHMARKS.md, "Transactions").

    Args:
        created: the client as syncd just wrote it to a new customer record: the record
            is taken to hold it, and is not read back (one call fewer per new client).
        external_ids: the new customer's id by connection (the caller created the customer
            record), merged into the client's ids in the same transaction.
        read_details: reads the customer record (default: ``invoicing.customer_details``;
            the engine's reads many at once, :mod:`syncd.engine.batching`).

    Returns:
        the client to bill with (the CRM's details with the values in force applied),
        or ``None`` when the client is not stored.
    """
    store, now = runtime.store, runtime.clock()
    owners = runtime.config.settings.clients
    details = None
    if created is None and isinstance(invoicing, UpdatesCustomers):
        details = await (read_details or invoicing.customer_details)(customer_id)
    table = table_of(ClientRow)
    async with store.begin() as conn:
        row = await locked_row(store, conn, client_key)
        if row is None:
            return None
        # The row is kept in step with what this transaction writes to it (JSON values as
        # stored), instead of read again after each write.
        if external_ids is not None:
            merged = {**row.external_ids, **external_ids}
            await conn.execute(sa.update(table).where(table.c.key == client_key).values(external_ids=merged))
            row.external_ids = merged
        if created is not None:
            row.seen = await _hold(conn, row, connection, ledger_view(created.ledger_details()), now)
        elif details is not None:
            settled = await record_observation(
                store,
                conn,
                row,
                system=connection,
                role="ledger",
                observed=ledger_view(details),
                owners=owners,
                owner_systems=systems_of(runtime, row).owner_systems(connection),
                now=now,
            )
            row.record, row.seen = settled.record, settled.seen
        to_ledger = await _due_ledger(runtime, conn, row, connection) if details is not None else []
        to_crm = await _due_crm(runtime, conn, row)
    if to_ledger:
        await _send_ledger(runtime, row, connection, invoicing, customer_id, to_ledger)
    try:
        await _send_crm(runtime, row, to_crm)
    except SyncdError as exc:
        # The invoice still goes out: the CRM company is written again before the next one.
        await _crm_write_failed(runtime, client_key, exc)
    return applied(Client.model_validate({**row.data, "external_ids": row.external_ids}), row.record)


async def _write_ledger(
    runtime: Runtime, row: ClientRow, connection: str, invoicing: Any, customer_id: str, *, owned: bool = False
) -> None:
    async with runtime.store.begin() as conn:
        names = await _due_ledger(runtime, conn, row, connection, owned=owned)
    await _send_ledger(runtime, row, connection, invoicing, customer_id, names)


async def _due_ledger(
    runtime: Runtime, conn: Connection, row: ClientRow, connection: str, *, owned: bool = False
) -> list[str]:
    """The fields due at the ledger ``connection`` (held differently there, no open conflict)."""
    blocked = set(await open_conflicts(conn, row.key, connection))
    fields = _writable(runtime, tuple(LEDGER_KEYS), "ledger", owned=owned)
    return due_writes(row.record or {}, _seed(row).get(connection, {}), fields, blocked)


async def _send_ledger(
    runtime: Runtime, row: ClientRow, connection: str, invoicing: Any, customer_id: str, names: list[str]
) -> None:
    if not names:
        return
    client = applied(Client.model_validate({**row.data, "external_ids": row.external_ids}), row.record)
    keys = [key for name in names for key in LEDGER_KEYS[name]]
    digest = _digest({name: (row.record or {})[name] for name in names})
    await invoicing.update_customer(customer_id, client, digest, fields=keys)
    await _written(runtime, row.key, connection, names)


def _writable(runtime: Runtime, fields: tuple[str, ...], role: str, *, owned: bool) -> tuple[str, ...]:
    """Of ``fields``, those syncd writes to a system playing ``role``: the ones it does not own
    (its own values are the truth), or all of them when a resolution says so (``owned``)."""
    owners = runtime.config.settings.clients
    return tuple(name for name in fields if owned or owners.owner(base_field(name)) != role)


async def _hold(
    conn: Connection, row: ClientRow, system: str, values: Mapping[str, Any], now: datetime
) -> dict[str, dict[str, Any]]:
    """Record that ``system`` holds ``values`` because syncd just wrote them there (a new customer record).

    Returns:
        the row's ``seen`` as stored.
    """
    seen = _seed(row)
    held = seen.setdefault(system, {})
    changes = [
        Change(system=system, field=name, old=held.get(name), new=value, by="syncd")
        for name, value in values.items()
        if held.get(name) != value
    ]
    held.update(values)
    await conn.execute(sa.update(table_of(ClientRow)).where(table_of(ClientRow).c.key == row.key).values(seen=seen))
    await _log(conn, row.key, changes, now)
    return seen


async def write_crm(runtime: Runtime, client_key: str, *, owned: bool = False) -> list[str]:
    """Write the values in force the CRM company holds differently (a field the ledger owns changed there).

    Args:
        owned: write fields the CRM owns too (a conflict resolved for the other value).

    Returns:
        the fields written.
    """
    store = runtime.store
    row = await store.get(ClientRow, client_key)
    if row is None:
        return []
    async with store.begin() as conn:
        names = await _due_crm(runtime, conn, row, owned=owned)
    return await _send_crm(runtime, row, names)


async def _due_crm(runtime: Runtime, conn: Connection, row: ClientRow, *, owned: bool = False) -> list[str]:
    """The fields due at the client's CRM company (held differently there, no open conflict)."""
    systems = systems_of(runtime, row)
    crm = runtime.connectors.get(systems.crm or "")
    if systems.crm is None or systems.company_id is None or not isinstance(crm, UpdatesCompanies):
        return []
    blocked = set(await open_conflicts(conn, row.key, systems.crm))
    fields = _writable(runtime, tuple(systems.crm_properties), "crm", owned=owned)
    return due_writes(row.record or {}, _seed(row).get(systems.crm, {}), fields, blocked)


async def _send_crm(runtime: Runtime, row: ClientRow, names: list[str]) -> list[str]:
    if not names:
        return []
    systems = systems_of(runtime, row)
    crm = runtime.connectors[str(systems.crm)]
    values = {systems.crm_properties[name]: _as_property((row.record or {})[name]) for name in names}
    await crm.update_company(systems.company_id, values)
    await _written(runtime, row.key, str(systems.crm), names)
    return names


async def _crm_write_failed(runtime: Runtime, client_key: str, exc: SyncdError) -> None:
    """A value in force could not be written on the CRM company: logged, and an outcome that needs attention."""
    log.warning("client_record_write_failed", client=client_key, error=str(exc), place=exc.place)
    await runtime.store.add_outcome(
        key=f"attention:client_write_failed:{client_key}:{_digest({'error': exc.message})}",
        kind="attention",
        reason="client_write_failed",
        detail=f"client {client_key}: a value in force could not be written on the CRM company: {exc.message}; "
        "syncd tries again before the next invoice",
        place=exc.place,
        client_key=client_key,
        created_at=runtime.clock(),
    )


def _as_property(value: Any) -> str | None:
    return None if value is None else str(value)


async def _written(runtime: Runtime, client_key: str, system: str, names: list[str]) -> None:
    """Record that syncd wrote the values in force of ``names`` to ``system``."""
    now = runtime.clock()
    async with runtime.store.begin() as conn:
        row = await locked_row(runtime.store, conn, client_key)
        if row is None:
            return
        record = row.record or {}
        seen = _seed(row)
        held = seen.setdefault(system, {})
        changes = [
            Change(system=system, field=name, old=held.get(name), new=record.get(name), by="syncd") for name in names
        ]
        held.update({name: record.get(name) for name in names})
        await conn.execute(
            sa.update(table_of(ClientRow)).where(table_of(ClientRow).c.key == client_key).values(seen=seen)
        )
        await _log(conn, client_key, changes, now)
    log.info("client_record_written", client=client_key, system=system, fields=names)


def _digest(values: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:24]


# ---------------------------------------------------------------------------
# Commands: list, show, resolve
# ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class FieldState:
    """One field of a client record as ``syncd client show`` prints it."""

    field: str
    value: Any
    owner: str
    seen: Mapping[str, Any]
    conflict: ClientConflictRow | None


@dataclass(frozen=True, kw_only=True)
class ClientRecord:
    """A client's record: its fields, ids, open conflicts and change log."""

    key: str
    legal_name: str
    ids: Mapping[str, str]
    fields: list[FieldState]
    changes: list[ClientChangeRow]
    conflicts: list[ClientConflictRow]

    def as_json(self) -> dict[str, Any]:
        """The record as a JSON object (stable keys)."""
        return {
            "key": self.key,
            "legal_name": self.legal_name,
            "ids": dict(self.ids),
            "fields": [
                {
                    "field": f.field,
                    "value": f.value,
                    "owner": f.owner,
                    "seen": dict(f.seen),
                    "conflict": f.conflict.model_dump(mode="json") if f.conflict else None,
                }
                for f in self.fields
            ],
            "conflicts": [c.model_dump(mode="json") for c in self.conflicts],
            "changes": [c.model_dump(mode="json") for c in self.changes],
        }


async def list_clients(store: Store) -> list[ClientRow]:
    """Every stored client, by legal name."""
    return list(await store.select(ClientRow, order_by=table_of(ClientRow).c.legal_name))


async def client_record(store: Store, key: str, config: Config) -> ClientRecord:
    """One client's record: its fields, the ids of each system (the time tracker's projects of its
    hourly engagements too), conflicts and change log.

    Raises:
        RecordError: no client with that key.
    """
    owners = config.settings.clients
    row = await store.get(ClientRow, key)
    if row is None:
        raise RecordError(f"no client {key!r}", place="syncd client list")
    record, seen = row.record or {}, _seed(row)
    conflicts = await store.select(
        ClientConflictRow,
        table_of(ClientConflictRow).c.client_key == key,
        order_by=table_of(ClientConflictRow).c.id,
    )
    open_by_field = {c.field: c for c in conflicts if c.status == "open"}
    names = [name for name in CLIENT_FIELDS if name != "rates"] + sorted(n for n in record if n.startswith(RATE))
    states = [
        FieldState(
            field=name,
            value=record.get(name),
            owner=owners.owner(base_field(name)),
            seen={system: values[name] for system, values in seen.items() if name in values},
            conflict=open_by_field.get(name),
        )
        for name in names
    ]
    changes = await store.select(
        ClientChangeRow, table_of(ClientChangeRow).c.client_key == key, order_by=table_of(ClientChangeRow).c.id
    )
    crm, _, _ = key.partition(":")
    ids = {crm: key.rsplit(":", 1)[-1], **row.external_ids}
    trackers = {p.crm: p.time_tracking for p in config.settings.pipelines if p.time_tracking}
    engagements = await store.select(EngagementRow, table_of(EngagementRow).c.client_key == key)
    projects = sorted({str(e.data["time_project_id"]) for e in engagements if e.data.get("time_project_id")})
    if projects and crm in trackers:
        ids[f"{trackers[crm]} projects"] = ", ".join(projects)
    return ClientRecord(
        key=key, legal_name=row.legal_name, ids=ids, fields=states, changes=list(changes), conflicts=list(conflicts)
    )


async def resolve(runtime: Runtime, key: str, name: str, take: str) -> ClientConflictRow:
    """Settle the open conflict of field ``name``: keep the owner's value, or take the other system's.

    ``owner``: the owner's value is written over the edit at the other system.
    ``other``: the other system's value is in force from now on and written to the owner
    (and to any other system holding something else).

    Raises:
        RecordError: no open conflict for that field, or ``take`` is neither.
    """
    if take not in ("owner", "other"):
        raise RecordError(f"--take must be owner or other, not {take!r}", place="syncd client resolve")
    store, now = runtime.store, runtime.clock()
    async with store.begin() as conn:
        found = [c for c in (await open_conflicts(conn, key)).values() if c.field == name]
        if not found:
            raise RecordError(f"client {key!r} has no open conflict on {name!r}", place=f"syncd client show {key}")
        conflict = found[0]
        row = await locked_row(store, conn, key)
        if row is None:
            raise RecordError(f"no client {key!r}", place="syncd client list")
        record = dict(row.record or {})
        if take == "other":
            record[name] = conflict.other_value
        seen = _seed(row)
        if take == "other":
            # the other system holds the value now in force: nothing to write back there
            seen.setdefault(conflict.other, {})[name] = conflict.other_value
        await conn.execute(
            sa.update(table_of(ClientRow)).where(table_of(ClientRow).c.key == key).values(record=record, seen=seen)
        )
        kept = conflict.owner_value if take == "owner" else conflict.other_value
        await _log(
            conn,
            key,
            [Change(system=conflict.other, field=name, old=conflict.owner_value, new=kept, by="resolve")],
            now,
        )
        await _close(conn, key, name, conflict.other, f"took the {take}'s value {show_value(kept)}", now)
    await write_everywhere(runtime, key)
    log.info("client_conflict_resolved", client=key, field=name, took=take)
    return conflict


async def write_everywhere(runtime: Runtime, key: str) -> None:
    """Write the values in force to every system of the client that holds something else (owners too)."""
    row = await runtime.store.get(ClientRow, key)
    if row is None:
        return
    for connection, customer_id in systems_of(runtime, row).ledgers.items():
        invoicing = runtime.connectors.get(connection)
        if isinstance(invoicing, UpdatesCustomers):
            await _write_ledger(runtime, row, connection, invoicing, customer_id, owned=True)
            row = await runtime.store.get(ClientRow, key)
    await write_crm(runtime, key, owned=True)
