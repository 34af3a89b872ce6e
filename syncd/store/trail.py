"""An invoice's trail: what syncd sent, what the ledger answered, and every change after.

When syncd creates a document it stores what it sent (the draft as sent and the
customer id, ``invoices.sent``) and the ledger's answer (``invoices.document``, a
:class:`~syncd.core.interfaces.LedgerDocument`). Each later read of the document (a webhook,
a poll) is compared with the copy before it (:func:`compare`):

* a change of state is a ``status`` step (approved, sent, paid, voided ...);
* a change of the content a person edits is a **hand correction**, classified by what
  changed: ``lines`` (a line added, removed, or its text, account or item changed),
  ``amounts`` (a quantity, a price, a total), ``terms`` (the due date or the date),
  ``contact`` (another customer), ``tax`` (a tax type, whether amounts include tax, the
  tax total), ``reference`` (the PO number or syncd's stamp);
* a credit note that syncd did not create, applied to the invoice, is a correction
  (``credit_note``); a void syncd did not make is one too (``void``), and a document
  issued at the ledger afterwards for the same customer is linked to it as its
  ``reissue``.

syncd's own later changes are not corrections: the allocation of its own credit notes,
its voids (``on_unwon = "void"``), its customer-record updates (the invoice's customer
stays the same), and payments and the sent flag, which are not compared.

``syncd invoice show NUMBER`` prints the whole trail (:func:`invoice_trail`): the
trigger, the billing event, the queued draft, what was sent, the ledger's answers,
status changes and corrections. The monthly audit (:mod:`syncd.engine.audit`) counts the
corrections.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from syncd.core.errors import RecordError
from syncd.core.interfaces import InvoiceDraft, LedgerDocument, LedgerLine
from syncd.store.db import BillingEventRow, EffectRow, InvoiceRow, InvoiceTrailRow, OutcomeRow, Store, table_of

CLASSES = ("lines", "amounts", "terms", "contact", "tax", "reference", "credit_note", "void")
"""What a hand correction can change, in the order the audit reports them."""

_LINE_TEXT = ("description", "account_code", "item_code")
_LINE_AMOUNTS = ("quantity", "unit_price", "line_amount")


@dataclass(frozen=True, kw_only=True)
class Correction:
    """What changed at the ledger between two reads of a document.

    Attributes:
        classes: the kinds of change, each one of :data:`CLASSES`.
        changes: each change in words (``line 2 unit_price 2500.00 → 2300.00``).
    """

    classes: tuple[str, ...]
    changes: tuple[str, ...]


def _text(value: Any) -> str:
    return "-" if value is None else str(value)


def _line_changes(index: int, before: LedgerLine, after: LedgerLine) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for name in (*_LINE_TEXT, *_LINE_AMOUNTS, "tax_type"):
        old, new = getattr(before, name), getattr(after, name)
        if old != new:
            kind = "lines" if name in _LINE_TEXT else "amounts" if name in _LINE_AMOUNTS else "tax"
            found.append((kind, f"line {index} {name} {_text(old)} → {_text(new)}"))
    return found


def compare(before: LedgerDocument, after: LedgerDocument, own_credit_notes: Iterable[str] = ()) -> Correction | None:
    """The hand correction between two reads of a document, or ``None`` when nothing a person edits changed.

    Args:
        before: the content as last read (or as the ledger answered syncd's create).
        after: the content read now.
        own_credit_notes: ids of the credit notes syncd created (their allocation is syncd's own change).
    """
    found: list[tuple[str, str]] = []
    for name, kind in (
        ("customer_id", "contact"),
        ("due_date", "terms"),
        ("issue_date", "terms"),
        ("line_amount_types", "tax"),
        ("currency", "amounts"),
        ("reference", "reference"),
    ):
        old, new = getattr(before, name), getattr(after, name)
        if old != new:
            found.append((kind, f"{name} {_text(old)} → {_text(new)}"))
    if len(before.lines) != len(after.lines):
        found.append(("lines", f"{len(before.lines)} line(s) → {len(after.lines)}"))
    for index, (old_line, new_line) in enumerate(zip(before.lines, after.lines, strict=False), start=1):
        found += _line_changes(index, old_line, new_line)
    kinds = {kind for kind, _ in found}
    if not kinds & {"lines", "amounts"}:
        for name in ("subtotal", "total"):
            if getattr(before, name) != getattr(after, name):
                found.append(("amounts", f"{name} {_text(getattr(before, name))} → {_text(getattr(after, name))}"))
    if "tax" not in kinds and not kinds & {"lines", "amounts"} and before.total_tax != after.total_tax:
        found.append(("tax", f"total_tax {_text(before.total_tax)} → {_text(after.total_tax)}"))
    own = set(own_credit_notes)
    for note in sorted(set(after.credit_note_ids) - set(before.credit_note_ids) - own):
        found.append(("credit_note", f"credit note {note} applied (not created by syncd)"))
    if not found:
        return None
    classes = tuple(kind for kind in CLASSES if any(k == kind for k, _ in found))
    return Correction(classes=classes, changes=tuple(text for _, text in found))


def sent_payload(draft: InvoiceDraft, customer_id: str) -> dict[str, Any]:
    """What syncd sent for a document: the draft as sent and the customer it was sent for."""
    return {"customer_id": customer_id, "draft": draft.model_dump(mode="json")}


async def add_step(
    conn: AsyncConnection,
    *,
    key: str,
    invoice_key: str,
    kind: str,
    actor: str,
    summary: str,
    at: datetime,
    classes: Iterable[str] = (),
    detail: Mapping[str, Any] | None = None,
    is_postgres: bool,
) -> bool:
    """Record one step of an invoice's trail in the caller's transaction, once per ``key``."""
    table = table_of(InvoiceTrailRow)
    values = {
        "key": key,
        "invoice_key": invoice_key,
        "kind": kind,
        "actor": actor,
        "summary": summary,
        "classes": ",".join(classes) or None,
        "detail": dict(detail) if detail is not None else None,
        "at": at,
    }
    if is_postgres:
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        stmt: Any = pg_insert(table)
    else:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        stmt = sqlite_insert(table)
    stmt = stmt.values(**values).on_conflict_do_nothing(index_elements=["key"]).returning(table.c.id)
    return (await conn.execute(stmt)).first() is not None


# ---------------------------------------------------------------------------
# syncd invoice show
# ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Step:
    """One line of an invoice's trail.

    Attributes:
        at: when it happened.
        what: ``trigger``, ``billing_event``, ``queued``, ``sent``, ``answered``,
            ``status``, ``correction``, ``void``, ``reissue``, ``outcome``.
        actor: ``syncd``, ``ledger``, ``person`` or the source (``crm``).
        summary: one line.
        detail: the data behind it (the draft, the payload, the changes).
    """

    at: datetime
    what: str
    actor: str
    summary: str
    detail: Any = None

    def as_json(self) -> dict[str, Any]:
        """The step as a JSON object."""
        return {
            "at": self.at.isoformat(),
            "what": self.what,
            "actor": self.actor,
            "summary": self.summary,
            "detail": self.detail,
        }


@dataclass(frozen=True, kw_only=True)
class Trail:
    """An invoice and every step of its life, oldest first."""

    invoice: InvoiceRow
    steps: list[Step]

    def as_json(self) -> dict[str, Any]:
        """The trail as a JSON object."""
        return {"invoice": self.invoice.model_dump(mode="json"), "steps": [step.as_json() for step in self.steps]}


async def find_invoice(store: Store, number: str) -> InvoiceRow:
    """The invoice (or credit note) with ledger number ``number`` (or syncd key, or ledger id).

    Raises:
        RecordError: none is stored.
    """
    table = table_of(InvoiceRow)
    for column in (table.c.number, table.c.key, table.c.invoice_id):
        rows: list[InvoiceRow] = await store.select(InvoiceRow, column == number, order_by=table.c.created_at)
        if rows:
            return rows[0]
    raise RecordError(f"no invoice {number!r} was created by syncd", place="syncd invoice show")


async def invoice_trail(store: Store, number: str) -> Trail:
    """Every recorded step of one invoice, oldest first.

    Raises:
        RecordError: no such invoice.
    """
    invoice = await find_invoice(store, number)
    steps = [Step(at=invoice.triggered_at, what="trigger", actor="source", summary=f"triggered ({invoice.key})")]
    event = await store.get(BillingEventRow, invoice.key)
    if event is not None:
        steps.append(
            Step(
                at=event.created_at,
                what="billing_event",
                actor="syncd",
                summary=f"billing event {event.kind} {event.occurrence} recorded",
                detail={"key": event.key, "occurred_at": event.occurred_at.isoformat()},
            )
        )
    effects = await store.select(EffectRow, table_of(EffectRow).c.key == invoice.key)
    for effect in effects:
        draft = effect.payload.get("draft") if isinstance(effect.payload, Mapping) else None
        steps.append(
            Step(
                at=effect.created_at,
                what="queued",
                actor="syncd",
                summary=f"draft queued for {effect.next_at.isoformat(timespec='seconds')} "
                f"(effect {effect.id}, {effect.status}, {effect.attempts} attempt(s))",
                detail=draft,
            )
        )
    rows = await store.select(
        InvoiceTrailRow, table_of(InvoiceTrailRow).c.invoice_key == invoice.key, order_by=table_of(InvoiceTrailRow).c.id
    )
    steps += [Step(at=row.at, what=row.kind, actor=row.actor, summary=row.summary, detail=row.detail) for row in rows]
    outcomes = await store.select(OutcomeRow, table_of(OutcomeRow).c.billing_event_key == invoice.key)
    steps += [
        Step(at=o.created_at, what="outcome", actor="syncd", summary=f"{o.kind} {o.reason} ({o.status}): {o.detail}")
        for o in outcomes
    ]
    return Trail(invoice=invoice, steps=sorted(steps, key=lambda step: step.at))


async def own_credit_notes(conn: AsyncConnection, connection: str) -> set[str]:
    """Ids of the credit notes syncd created at ``connection``."""
    table = table_of(InvoiceRow)
    rows = await conn.execute(
        sa.select(table.c.invoice_id).where(table.c.kind == "credit_note", table.c.invoicing_connection == connection)
    )
    return {str(ident) for (ident,) in rows}
