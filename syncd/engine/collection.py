"""Collections: each client's receivables on its CRM company, and tasks to chase overdue invoices.

Both are switched on in ``[collections]`` (docs/operations.md, "Collections") and run on
what syncd already tracks: every invoice and credit note it created (``invoices``), and,
with ``track_ledger_documents``, those made by hand at the ledger for a client it knows,
found by their contact (``ledger_documents``). Payment webhooks and the polling fallback
feed both, as they feed the deal write-back.

**Company receivables.** A client keyed ``<crm>:company:<id>`` (the mapping's client key
for a deal with a company) has its figures (:func:`syncd.core.receivables.company_status`)
written onto that company by an effect ``write_company_status``, queued in the
transaction that records the change (exactly once per change, like every effect):

* when a document is created, and whenever the ledger reports it changed (a payment, a
  payment deleted, a void, a credit applied); the cause is the change
  (``INV-0007: payment or credit of 500.00 (partially_paid)``);
* once per day of the client's own time zone while it owes something (the hourly
  collections tick), because aging moves at the client's midnight, not at UTC's.

The effect computes the figures from every stored document *when it runs*, under a
lock per company, and writes them only when they differ from what it wrote last
(``company_standings``), logging each change with its cause. The stored documents move
only on a read from the ledger that is newer than the one stored (a stale read is
ignored, as for the deal), so the company never moves backwards unless the ledger says
so: a payment deleted, an invoice voided.

**Follow-up tasks.** The hourly tick finds each approved invoice still owed whose days
overdue (in the client's zone) reached a step (1 day, then ``follow_up_days``) and
queues one effect per (invoice, step), keyed ``task:<document>:<step>``: a task exists at
most once per step however often the tick runs. An invoice seen late gets only the
highest step it reached. The task goes to the deal's owner, else the company's, else
``task_owner_id``; it names the invoice, the amount due, the days overdue and links to
the invoice. A task is created once: its creation is not repeated after a lost answer,
the retry looks it up first (:meth:`~syncd.core.interfaces.ManagesTasks.find_task`). When the
invoice is paid or voided, its open tasks are completed with a note (or only noted,
``settled_tasks = "note"``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from syncd.core import receivables
from syncd.core.errors import NotFound, RecordError
from syncd.core.interfaces import (
    CompanyBillingStatus,
    FollowUpTask,
    InvoiceState,
    InvoiceStatus,
    LinksInvoices,
    ManagesTasks,
    WritesCompanyStatus,
)
from syncd.engine.runtime import Pipeline, Runtime
from syncd.plumbing.settings import CollectionsSettings
from syncd.store.db import (
    ClientRow,
    CompanyStandingRow,
    EffectRow,
    FollowUpTaskRow,
    InvoiceRow,
    LedgerDocumentRow,
    decimal_text,
    table_of,
)

log = structlog.get_logger("syncd.engine.collection")

WRITE_COMPANY_STATUS = "write_company_status"
CREATE_TASK = "create_follow_up_task"
CLOSE_TASKS = "close_follow_up_tasks"
EFFECT_KINDS = frozenset({WRITE_COMPANY_STATUS, CREATE_TASK, CLOSE_TASKS})
TICK_INTERVAL_S = 3600  # the collections tick runs once an hour across replicas
SETTLED = frozenset({str(InvoiceState.PAID), str(InvoiceState.VOIDED)})
LEDGER_PREFIX = "ledger:"

Document = InvoiceRow | LedgerDocumentRow


def company_of(client_key: str) -> tuple[str, str] | None:
    """``(crm connection, company id)`` of a client keyed ``<crm>:company:<id>``, else ``None``."""
    connection, kind, object_id = ([*client_key.split(":", 2), "", ""])[:3]
    if kind != "company" or not connection or not object_id:
        return None
    return connection, object_id


def as_document(row: Document) -> receivables.Document:
    """A stored invoice or credit note (syncd's or hand-made) as :class:`~syncd.core.receivables.Document`."""
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


def describe_change(number: str | None, before: tuple[str, str] | None, after: tuple[str, str]) -> str:
    """The cause of a company write-back, from a document's (state, amount due) before and after."""
    name = number or "a document"
    state, due = after
    if before is None:
        return f"{name} recorded ({state}, amount due {due})"
    if state == str(InvoiceState.VOIDED):
        return f"{name} voided at the ledger"
    change = Decimal(due) - Decimal(before[1])
    if change < 0:
        return f"{name}: payment or credit of {-change} ({state})"
    if change > 0:
        return f"{name}: amount due up by {change}, a payment deleted or the document changed at the ledger ({state})"
    return f"{name}: {before[0]} → {state}"


def settled_note(state: str, on: date | None) -> str:
    """The note a task gets when its invoice no longer needs chasing."""
    if state == str(InvoiceState.VOIDED):
        return "Closed by syncd: the invoice was voided at the ledger."
    return f"Closed by syncd: the invoice was paid{f' (last payment {on.isoformat()})' if on else ''}."


class Collections:
    """The collections side of the engine: hooks, the hourly tick and three effects.

    Args:
        runtime: the process's runtime.
        notify: wakes an idle worker when an effect was queued.
    """

    def __init__(self, runtime: Runtime, notify: Callable[[], None]) -> None:
        self.rt = runtime
        self.store = runtime.store
        self.notify = notify

    @property
    def settings(self) -> CollectionsSettings:
        """``[collections]`` as configured now."""
        return self.rt.config.settings.collections

    # -- hooks, in the caller's transaction ------------------------------------------

    async def on_document(
        self,
        conn: AsyncConnection,
        row: Document,
        *,
        before: tuple[str, str] | None,
        after: tuple[str, str],
        version: str,
        last_payment: date | None,
        now: datetime,
    ) -> None:
        """A document of ``row.client_key`` was recorded or changed: queue what follows from it.

        Args:
            conn: the transaction recording the change.
            row: the document as stored before the change (for its key, client, number).
            before / after: its (state, amount due) before (``None``: new) and after.
            version: tells this change from any other of the document (the ledger's
                update time, or the state and amount).
            last_payment: its latest payment date after the change.
            now: the engine's clock.
        """
        cause = describe_change(row.number, before, after)
        await self.queue_company(conn, row.client_key, f"{row.key}:{version}", cause, now)
        was_settled = before is not None and before[0] in SETTLED
        if self.settings.follow_up_tasks and row.kind == "invoice" and after[0] in SETTLED and not was_settled:
            await self._queue(
                conn,
                key=f"close:{row.key}:{version}",
                kind=CLOSE_TASKS,
                connection=_crm_of(row),
                payload={"document_key": row.key, "note": settled_note(after[0], last_payment)},
                client_key=row.client_key,
                now=now,
            )

    async def queue_company(
        self, conn: AsyncConnection, client_key: str, version: str, cause: str, now: datetime
    ) -> bool:
        """Queue the company write-back of ``client_key`` once per ``version``; ``False`` if nothing was queued."""
        company = company_of(client_key)
        if not self.settings.company_status or company is None or not self.rt.pilot_allows(client_key):
            return False
        crm, company_id = company
        if not isinstance(self.rt.connectors.get(crm), WritesCompanyStatus):
            return False
        digest = hashlib.sha256(f"{crm}:{company_id}:{version}".encode()).hexdigest()[:32]
        return await self._queue(
            conn,
            key=f"company:{digest}",
            kind=WRITE_COMPANY_STATUS,
            connection=crm,
            payload={"company_id": company_id, "client_key": client_key, "cause": cause},
            client_key=client_key,
            now=now,
        )

    async def _queue(
        self, conn: AsyncConnection, *, key: str, kind: str, connection: str, payload: dict[str, Any], **kw: Any
    ) -> bool:
        queued = await self.store.add_effect(conn, key=key, kind=kind, connection=connection, payload=payload, **kw)
        if queued:
            self.notify()
        return queued

    # -- the hourly tick --------------------------------------------------------------

    async def run(self) -> int:
        """Queue each owing client's company write-back for its local day, and each follow-up step reached.

        Returns:
            how many effects were queued.
        """
        if not (self.settings.company_status or self.settings.follow_up_tasks):
            return 0
        documents = await self._open_documents()
        zones = await self._zones({row.client_key for row in documents})
        now = self.rt.clock()
        queued = 0
        async with self.store.begin() as conn:
            for client_key in sorted({row.client_key for row in documents}):
                today = receivables.today_in(now, zones.get(client_key, "UTC"))
                version = f"aging:{today.isoformat()}"
                queued += await self.queue_company(conn, client_key, version, f"aging on {today.isoformat()}", now)
            if self.settings.follow_up_tasks:
                for row in documents:
                    today = receivables.today_in(now, zones.get(row.client_key, "UTC"))
                    queued += await self._queue_step(conn, row, today, now)
        if queued:
            log.info("collections_queued", effects=queued)
        return queued

    async def _queue_step(self, conn: AsyncConnection, row: Document, today: date, now: datetime) -> bool:
        if row.kind != "invoice" or not self.rt.pilot_allows(row.client_key):
            return False
        days = receivables.days_overdue(row.due_date, Decimal(row.amount_due), today)
        reached = [step for step in self.settings.task_steps() if days >= step]
        crm = _crm_of(row)
        if not reached or not isinstance(self.rt.connectors.get(crm), ManagesTasks):
            return False
        step = reached[-1]
        return await self._queue(
            conn,
            key=f"task:{row.key}:{step}",
            kind=CREATE_TASK,
            connection=crm,
            payload={"document_key": row.key, "step": step},
            client_key=row.client_key,
            now=now,
        )

    async def _open_documents(self) -> list[Document]:
        """Approved documents still owed or with credit left: syncd's and the hand-made ones."""
        states = [str(state) for state in receivables.OPEN_STATES]
        found: list[Document] = []
        for model in (InvoiceRow, LedgerDocumentRow):
            table = table_of(model)
            found += await self.store.select(model, table.c.state.in_(states))
        return [row for row in found if Decimal(row.amount_due) > 0]

    async def _zones(self, client_keys: Iterable[str]) -> dict[str, str]:
        keys = sorted(client_keys)
        if not keys:
            return {}
        rows = await self.store.select(ClientRow, table_of(ClientRow).c.key.in_(keys))
        return {row.key: str(row.data.get("timezone") or "UTC") for row in rows}

    # -- effects ----------------------------------------------------------------------

    async def execute(self, row: EffectRow) -> None:
        """Run one collections effect (the engine settles the row).

        Raises:
            RecordError: the document or client it names is not recorded.
        """
        if row.kind == WRITE_COMPANY_STATUS:
            await self._write_company(row)
        elif row.kind == CREATE_TASK:
            await self._create_task(row)
        else:
            await self._close_tasks(row)

    async def company_status(self, client_key: str) -> CompanyBillingStatus | None:
        """The receivables of ``client_key`` as of now, in its zone and main currency (``None``: unknown client)."""
        client = await self.store.get(ClientRow, client_key)
        if client is None:
            return None
        rows: list[Document] = []
        for model in (InvoiceRow, LedgerDocumentRow):
            rows += await self.store.select(model, table_of(model).c.client_key == client_key)
        today = receivables.today_in(self.rt.clock(), str(client.data.get("timezone") or "UTC"))
        rule = receivables.AtRiskRule(
            days_overdue=self.settings.at_risk_days_overdue or None,
            overdue_above=dict(self.settings.at_risk_overdue_above),
        )
        currency = str(client.data.get("currency") or self.rt.config.daemon.default_currency)
        return receivables.company_status((as_document(row) for row in rows), today=today, currency=currency, rule=rule)

    async def _write_company(self, row: EffectRow) -> None:
        crm_name, company_id, client_key = row.connection, row.payload["company_id"], row.payload["client_key"]
        crm = self.rt.connectors[crm_name]
        async with self.store.named_lock(f"company:{crm_name}:{company_id}"):
            status = await self.company_status(client_key)
            if status is None:
                raise RecordError(f"client {client_key} is not recorded", place=f"effects.id={row.id}")
            figures = status.model_dump(mode="json")
            last = await self.store.get(CompanyStandingRow, crm_name, company_id)
            if last is not None and last.figures == figures:
                log.debug("company_status_unchanged", company=company_id, cause=row.payload["cause"])
                return
            await crm.write_company_status(company_id, status)
            await self.store.upsert(
                CompanyStandingRow,
                {
                    "crm_connection": crm_name,
                    "company_id": company_id,
                    "client_key": client_key,
                    "figures": figures,
                    "cause": row.payload["cause"],
                    "written_at": self.rt.clock(),
                },
            )
        before = last.figures if last is not None else {}
        log.info(
            "company_status_written",
            connection=crm_name,
            company=company_id,
            cause=row.payload["cause"],
            changes={name: [before.get(name), value] for name, value in figures.items() if before.get(name) != value},
        )

    async def _create_task(self, row: EffectRow) -> None:
        document = await self._document(row.payload["document_key"], row)
        if document.state in SETTLED or Decimal(document.amount_due) <= 0:
            log.info("follow_up_task_not_needed", key=row.key, invoice=document.number, state=document.state)
            return
        crm = self.rt.connectors[row.connection]
        task = await self._task(row, document, crm)
        task_id = await crm.find_task(task) if row.attempts > 1 else None
        created = task_id is None
        if task_id is None:
            task_id = await crm.create_task(task)
        now = self.rt.clock()
        async with self.store.begin() as conn:
            await self.store.upsert(
                FollowUpTaskRow,
                {
                    "key": row.key,
                    "document_key": row.payload["document_key"],
                    "step": int(row.payload["step"]),
                    "crm_connection": row.connection,
                    "task_id": task_id,
                    "subject": task.subject,
                    "body": task.body,
                    "status": "open",
                    "created_at": now,
                },
                conn,
            )
            # Paid while the task was being created: its close effect ran before the task existed.
            fresh = await self._document(row.payload["document_key"], row, conn)
            if fresh.state in SETTLED or Decimal(fresh.amount_due) <= 0:
                await self._queue(
                    conn,
                    key=f"close:{fresh.key}:after:{row.key}",
                    kind=CLOSE_TASKS,
                    connection=row.connection,
                    payload={"document_key": fresh.key, "note": settled_note(fresh.state, fresh.last_payment_date)},
                    client_key=fresh.client_key,
                    now=now,
                )
        log.info(
            "follow_up_task_created" if created else "follow_up_task_found",
            key=row.key,
            task_id=task_id,
            invoice=document.number,
            owner=task.owner_id,
        )

    async def _task(self, row: EffectRow, document: Document, crm: ManagesTasks) -> FollowUpTask:
        client = await self.store.get(ClientRow, document.client_key)
        if client is None:
            raise RecordError(f"client {document.client_key} is not recorded", place=f"effects.id={row.id}")
        now = self.rt.clock()
        today = receivables.today_in(now, str(client.data.get("timezone") or "UTC"))
        days = receivables.days_overdue(document.due_date, Decimal(document.amount_due), today)
        company = company_of(document.client_key)
        deal_id = document.crm_object_id if isinstance(document, InvoiceRow) else None
        company_id = company[1] if company is not None and company[0] == row.connection else None
        number = document.number or document.key
        lines = [
            f"Invoice {number} to {client.legal_name} is {days} day{'' if days == 1 else 's'} overdue "
            f"(due {document.due_date.isoformat() if document.due_date else '?'}).",
            f"Amount due: {document.amount_due} {document.currency}.",
        ]
        link = await self._invoice_link(document)
        if link:
            lines.append(f"Open the invoice: {link}")
        step = int(row.payload["step"])
        return FollowUpTask(
            key=row.key,
            subject=f"Collect {number} from {client.legal_name} ({step}+ day{'' if step == 1 else 's'} overdue)",
            body="\n".join(lines),
            due_at=now + timedelta(days=self.settings.task_due_days),
            owner_id=await self._owner(crm, deal_id, company_id),
            deal_id=deal_id,
            company_id=company_id,
        )

    async def _owner(self, crm: ManagesTasks, deal_id: str | None, company_id: str | None) -> str | None:
        """The deal's owner, else the company's, else ``task_owner_id``."""
        for object_type, object_id in (("deal", deal_id), ("company", company_id)):
            if object_id is None:
                continue
            try:
                owner = await crm.record_owner(object_type, object_id)
            except NotFound:
                continue
            if owner:
                return owner
        return self.settings.task_owner_id

    async def _invoice_link(self, document: Document) -> str | None:
        connection = document.invoicing_connection if isinstance(document, InvoiceRow) else document.connection
        invoicing = self.rt.connectors.get(connection)
        if not isinstance(invoicing, LinksInvoices):
            return None
        document_id = document.invoice_id if isinstance(document, InvoiceRow) else document.document_id
        return await invoicing.invoice_url(document_id)

    async def _close_tasks(self, row: EffectRow) -> None:
        table = table_of(FollowUpTaskRow)
        tasks: list[FollowUpTaskRow] = await self.store.select(
            FollowUpTaskRow, table.c.document_key == row.payload["document_key"], table.c.status == "open"
        )
        complete = self.settings.settled_tasks == "complete"
        for task in tasks:
            crm = self.rt.connectors[task.crm_connection]
            status = "completed" if complete else "noted"
            try:
                await crm.close_task(task.task_id, f"{task.body}\n\n{row.payload['note']}", complete=complete)
            except NotFound:
                status = "gone"  # deleted at the CRM by a person
            await self.store.update(
                FollowUpTaskRow,
                [table.c.key == task.key, table.c.status == "open"],
                {"status": status, "closed_at": self.rt.clock()},
            )
            log.info("follow_up_task_closed", task_id=task.task_id, key=task.key, status=status)

    async def _document(self, key: str, row: EffectRow, conn: AsyncConnection | None = None) -> Document:
        model: type[Document] = LedgerDocumentRow if key.startswith(LEDGER_PREFIX) else InvoiceRow
        found: Document | None = await self.store.get(model, key, conn=conn)
        if found is None:
            raise RecordError(f"document {key} is not recorded", place=f"effects.id={row.id}")
        return found

    # -- documents made by hand at the ledger -----------------------------------------

    async def track_ledger_document(self, pipeline: Pipeline, document_id: str) -> bool:
        """Read a document syncd did not create; keep it if it is addressed to a known client.

        A document stamped with a syncd key is one of syncd's (recorded by the effect
        that created it) and is left alone, as is one whose contact is no client's.
        A read older than the one stored is ignored.

        Returns:
            whether the document is (now) tracked.
        """
        connection = pipeline.invoicing_name
        try:
            status = await pipeline.invoicing.get_invoice(document_id)
        except NotFound:
            return False
        if status.stamped_key is not None or status.customer_id is None:
            return False
        client = await self._client_by_customer(connection, status.customer_id)
        if client is None:
            return False
        await self._record_ledger_document(connection, client, status)
        return True

    async def _client_by_customer(self, connection: str, customer_id: str) -> ClientRow | None:
        ids = table_of(ClientRow).c.external_ids
        rows = await self.store.select(ClientRow, ids[connection].as_string() == customer_id, limit=1)
        return rows[0] if rows else None

    async def _record_ledger_document(self, connection: str, client: ClientRow, status: InvoiceStatus) -> None:
        key = f"{LEDGER_PREFIX}{connection}:{status.invoice_id}"
        now = self.rt.clock()
        values = {
            "key": key,
            "connection": connection,
            "document_id": status.invoice_id,
            "kind": status.kind,
            "client_key": client.key,
            "number": status.number,
            "state": str(status.state),
            "currency": status.currency,
            "total": decimal_text(status.total),
            "amount_due": decimal_text(status.amount_due),
            "amount_paid": decimal_text(status.amount_paid),
            "due_date": status.due_date,
            "last_payment_date": status.last_payment_date,
            "source_updated_at": status.updated_at,
            "updated_at": now,
        }
        async with self.store.begin() as conn:
            stored: LedgerDocumentRow | None = await self.store.get(LedgerDocumentRow, key, conn=conn)
            if stored is not None and _stale(stored.source_updated_at, status.updated_at):
                return
            after = (str(status.state), decimal_text(status.amount_due))
            before = (stored.state, stored.amount_due) if stored is not None else None
            if before == after and stored is not None and stored.last_payment_date == status.last_payment_date:
                return
            await self.store.upsert(LedgerDocumentRow, values, conn)
            row = stored or LedgerDocumentRow.model_validate(values)
            version = f"{(status.updated_at or now).isoformat()}:{after[0]}:{after[1]}"
            await self.on_document(
                conn, row, before=before, after=after, version=version, last_payment=status.last_payment_date, now=now
            )
        log.info("ledger_document_tracked", key=key, client=client.key, number=status.number, state=after[0])


def _stale(stored: datetime | None, seen: datetime | None) -> bool:
    return stored is not None and seen is not None and seen < stored


def _crm_of(row: Document) -> str:
    """The CRM connection of a document's client (a client key starts with it: ``hubspot:company:7``)."""
    return row.crm_connection if isinstance(row, InvoiceRow) else row.client_key.split(":", 1)[0]
