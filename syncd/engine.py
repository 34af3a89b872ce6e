"""Inbox → process → outbox, the executor, and dead letters.

The flow (DESIGN §1), each arrow a committed row before the next step starts:

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

Failures are handled per record: retriable ones go back to the queue with back-off
(or the vendor's ``Retry-After``); mapping, validation and fatal ones go to the
dead-letter table with the reason and the place, and the rest keep flowing.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from syncd import billing, hours, recurring
from syncd.errors import (
    AuthError,
    FatalError,
    MappingError,
    NotFound,
    RecordError,
    RetriableError,
    SyncdError,
)
from syncd.interfaces import (
    BillingEvent,
    BillingEventKind,
    Client,
    DealBillingStatus,
    Engagement,
    InvoiceDraft,
    InvoiceState,
    InvoiceStatus,
    SendsInvoices,
    SourceRecord,
)
from syncd.runtime import Pipeline, Runtime
from syncd.store import (
    BillingEventRow,
    ClientRow,
    DeadLetterRow,
    EffectRow,
    EngagementRow,
    EventRow,
    InvoiceRow,
    SourceRecordRow,
    decimal_text,
    table_of,
)

log = structlog.get_logger("syncd.engine")

CREATE_INVOICE = "create_invoice"
WRITE_CRM_STATUS = "write_crm_status"
BACKOFF_CAP_S = 3600


def backoff_s(attempts: int, retry_after_s: float | None = None) -> float:
    """Seconds before the next attempt: the vendor's Retry-After, else 5·2ⁿ capped at an hour."""
    if retry_after_s is not None:
        return min(float(BACKOFF_CAP_S), retry_after_s)
    return float(min(BACKOFF_CAP_S, 5 * 2 ** max(0, attempts - 1)))


def crm_status_for(row: InvoiceRow, today: date) -> DealBillingStatus:
    """What to write on the deal for an invoice row, with overdue derived from ``today``."""
    due = Decimal(row.amount_due)
    days_overdue = (today - row.due_date).days if row.due_date and due > 0 else 0
    state = row.state
    if days_overdue > 0 and state in {InvoiceState.AUTHORISED, InvoiceState.SENT, InvoiceState.PARTIALLY_PAID}:
        state = "overdue"
    return DealBillingStatus(
        invoice_number=row.number,
        state=state,
        amount_due=due,
        currency=row.currency,
        due_date=row.due_date,
        days_overdue=max(0, days_overdue),
    )


class Engine:
    """Claims and processes inbox events and outbox effects for one :class:`Runtime`."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.store = runtime.store
        self._idle: deque[asyncio.Future[None]] = deque()
        self._pending = False

    def notify(self) -> None:
        """Wake one idle worker (new events or effects were stored).

        Waking every idle worker for each row cost an empty claim per worker (BENCHMARKS.md);
        a woken worker keeps claiming while there is work, and each further notify wakes
        one more. With no worker idle, the next one to go idle finds ``_pending`` and
        claims again at once.
        """
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._pending = True

    # -- workers --------------------------------------------------------------------------

    async def run_worker(self, stop: asyncio.Event, *, batch: int = 10, idle_s: float = 1.0) -> None:
        """Process events and effects until ``stop`` is set, then finish the claimed batch."""
        while not stop.is_set():
            try:
                done = await self.process_events(batch) + await self.execute_effects(batch)
            except Exception:  # the database is away, or a bug: keep the worker alive
                log.exception("worker_error")
                done = 0
            if done == 0:
                await self._idle_until_notified(stop, idle_s)

    async def _idle_until_notified(self, stop: asyncio.Event, idle_s: float) -> None:
        """Sleep until :meth:`notify`, ``stop``, or ``idle_s`` (due retries need a look)."""
        if self._pending:
            self._pending = False
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._idle.append(waiter)
        stopping: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        watched: list[asyncio.Future[Any]] = [waiter, stopping]
        await asyncio.wait(watched, timeout=idle_s, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        waiter.cancel()

    async def drain(self, *, rounds: int = 50) -> None:
        """Process until nothing is due (tests and the demo use this instead of sleeping)."""
        for _ in range(rounds):
            if await self.process_events(100) + await self.execute_effects(100) == 0:
                return

    # -- inbox ----------------------------------------------------------------------------

    async def process_events(self, limit: int) -> int:
        """Claim and process up to ``limit`` due events; how many were claimed."""
        now = self.rt.clock()
        rows = await self.store.claim(
            EventRow, owner=self.rt.owner, limit=limit, lease_s=self.rt.config.daemon.lease_s, now=now
        )
        for row in rows:
            await self._settle(EventRow, row, "event", self._route_event)
        return len(rows)

    async def _route_event(self, row: EventRow) -> bool:
        handled = False
        for pipeline in self.rt.pipelines:
            if row.object_type == "deal" and pipeline.crm_name == row.connection:
                await self.process_deal(pipeline, row.object_id)
                handled = True
            elif row.object_type == "invoice" and pipeline.invoicing_name == row.connection:
                await self.refresh_invoice(pipeline, row.object_id)
                handled = True
            elif row.object_type == "time_entry" and pipeline.time_tracking_name == row.connection:
                await self.process_time_entry(pipeline, row)
                handled = True
        if not handled:
            log.debug("event_ignored", connection=row.connection, object_type=row.object_type, object_id=row.object_id)
        return False

    async def process_deal(self, pipeline: Pipeline, deal_id: str) -> str | None:
        """Re-read a deal, map it, and queue its invoice if a billing event is due.

        The engagement is stored with the history the source does not keep (amount
        changes, when a cancellation was first seen: :func:`syncd.recurring.keep_history`),
        then every billing event due for it is queued (:func:`syncd.recurring.bill_engagement`):
        ``deal_won`` as before, and the periods, changes, milestones and hours of the
        other engagement types.

        Returns:
            the billing event key queued (``deal_won`` first), or ``None``.

        Raises:
            MappingError: the deal does not fit the mapping (dead-lettered by the caller).
        """
        now = self.rt.clock()
        try:
            record = await pipeline.crm.fetch_deal(deal_id, pipeline.mapping.source_properties)
        except NotFound:
            log.info("deal_gone", connection=pipeline.crm_name, deal_id=deal_id)
            return None
        await self._remember(record, now)
        if not pipeline.mapping.selects(record):
            return None
        mapped = pipeline.mapping.map_deal(record, defaults=self.rt.defaults)
        async with self.store.begin() as conn:
            await self._save_client(conn, mapped.client, now)
            previous = await self.store.get(EngagementRow, mapped.engagement.key, conn=conn)
            engagement = recurring.keep_history(
                Engagement.model_validate(previous.data) if previous is not None else None,
                mapped.engagement,
                recorded_at=record.modified_at,
                timezone=mapped.client.timezone,
            )
            await self.store.upsert(EngagementRow, _engagement_values(engagement, pipeline, deal_id, now), conn)
        await self._check_divergence(mapped.engagement, record)
        event = billing.deal_won_event(mapped.engagement, billing_start=self.rt.billing_start)
        won = None
        if event is not None:
            won = await self.queue_invoice(pipeline, event, mapped.engagement, mapped.client, deal_id)
        keys = await recurring.bill_engagement(self, pipeline, engagement, mapped.client, deal_id)
        return won or (keys[0] if keys else None)

    async def process_time_entry(self, pipeline: Pipeline, row: EventRow) -> None:
        """Read a time tracker's new hours on a hint, and queue what they make due.

        The first hint of a batch reads every entry changed since the last read
        (:func:`syncd.hours.sync_entries`); a hint whose entry version is already stored
        reads nothing more. The pipeline's hourly engagements billing the projects
        concerned are then billed (cap steps, periods: :func:`syncd.recurring.bill_projects`;
        only what is due and not yet recorded).
        """
        tracker, connection = pipeline.time_tracker, pipeline.time_tracking_name
        if tracker is None or connection is None:
            return
        known = await hours.stored_project(self.store, connection, row.object_id, row.occurred_at)
        projects = {known} if known is not None else await hours.sync_entries(self.rt, connection, tracker)
        await recurring.bill_projects(self, pipeline, projects)

    async def record_event(self, event: BillingEvent, client_key: str) -> str | None:
        """Record a billing event that has nothing to invoice (an hourly period without hours).

        Recording it keeps it from being computed again; hours logged late for that
        period are billed by the next period or cap step.

        Returns:
            the event key if it was new, else ``None``.
        """
        row = self._event_row(event, live=self.rt.pilot_allows(client_key))
        async with self.store.begin() as conn:
            if not await self.store.add_billing_event(conn, row):
                return None
        log.info("billing_event_settled", key=event.key, kind=str(event.kind), engagement=event.engagement_key)
        return str(event.key)

    async def surface_credit(self, pipeline: Pipeline, credit: billing.ManualCredit) -> str | None:
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
        async with self.store.begin() as conn:
            if not await self.store.add_billing_event(conn, self._event_row(event, live=live)):
                return None
            await conn.execute(sa.insert(table_of(DeadLetterRow)).values(**letter))
        log.warning("manual_credit_owed", key=event.key, live=live, detail=credit.message())
        return str(event.key)

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
        self, pipeline: Pipeline, event: BillingEvent, engagement: Engagement, client: Client, crm_object_id: str
    ) -> str | None:
        """Draft the invoice for ``event`` (:func:`syncd.billing.draft_for_event`) and queue it.

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
        return await self.queue_draft(pipeline, event, draft, crm_object_id)

    async def queue_draft(
        self,
        pipeline: Pipeline,
        event: BillingEvent,
        draft: InvoiceDraft,
        crm_object_id: str,
        *,
        on_recorded: Callable[[AsyncConnection], Awaitable[None]] | None = None,
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

        Returns:
            the event key if it was new, else ``None`` (already recorded: nothing queued).
        """
        draft = billing.with_ledger_codes(
            draft, pipeline.mapping.ledger, known=billing.known_codes(self.rt.extra, pipeline.invoicing_name)
        )
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
        payload = {
            "draft": draft.model_dump(mode="json"),
            "crm": pipeline.crm_name,
            "crm_object_id": crm_object_id,
            "triggered_at": event.occurred_at.isoformat(),
        }
        async with self.store.begin() as conn:
            if not await self.store.add_billing_event(conn, row):
                return None
            await self.store.add_effect(
                conn,
                key=event.key,
                kind=CREATE_INVOICE,
                connection=pipeline.invoicing_name,
                payload=payload,
                now=now,
                client_key=draft.client.key,
                status="pending" if live else "simulated",
            )
            if on_recorded is not None:
                await on_recorded(conn)
        log.info(
            "billing_event_recorded", key=event.key, kind=str(event.kind), engagement=event.engagement_key, live=live
        )
        self.notify()
        return str(event.key)

    async def _remember(self, record: SourceRecord, now: datetime) -> None:
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
        )

    async def _save_client(self, conn: Any, client: Client, now: datetime) -> None:
        existing = await self.store.get(ClientRow, client.key, conn=conn)
        ids = dict(existing.external_ids) if existing is not None else {}
        ids.update(client.external_ids)
        await self.store.upsert(
            ClientRow,
            {
                "key": client.key,
                "legal_name": client.legal_name,
                "data": client.model_dump(mode="json", exclude={"external_ids"}),
                "external_ids": ids,
                "updated_at": now,
            },
            conn,
        )

    async def _check_divergence(self, engagement: Engagement, record: SourceRecord) -> None:
        """A deal edited, reopened or lost after it was invoiced: record it, never re-invoice or void.

        Only invoices of the deal's own lines (won or accepted deliverables) are compared;
        period, milestone and hours invoices bill other amounts by design.
        """
        line_kinds = [str(BillingEventKind.DEAL_WON), str(BillingEventKind.DELIVERABLE_ACCEPTED)]
        billed_lines = sa.select(_col(BillingEventRow, "key")).where(_col(BillingEventRow, "kind").in_(line_kinds))
        invoices = await self.store.select(
            InvoiceRow,
            _col(InvoiceRow, "engagement_key") == engagement.key,
            _col(InvoiceRow, "kind") == "invoice",
            _col(InvoiceRow, "key").in_(billed_lines),
        )
        for invoice in invoices:
            notes = []
            if engagement.won_at is None:
                notes.append("deal is no longer won")
            subtotal = sum((line.amount(engagement.currency) for line in engagement.lines), Decimal(0))
            if invoice.subtotal is not None and engagement.lines and subtotal != Decimal(invoice.subtotal):
                notes.append(f"deal lines now total {subtotal} {engagement.currency}, invoiced {invoice.subtotal}")
            divergence = "; ".join(notes) or None
            if divergence != invoice.divergence:
                await self.store.update(
                    InvoiceRow, [_col(InvoiceRow, "key") == invoice.key], {"divergence": divergence}
                )
                if divergence:
                    log.warning(
                        "invoice_divergence",
                        invoice=invoice.number,
                        engagement=engagement.key,
                        version=record.version,
                        divergence=divergence,
                    )

    async def refresh_invoice(self, pipeline: Pipeline, invoice_id: str) -> None:
        """Re-read an invoice syncd created and queue a write-back if its status changed."""
        rows = await self.store.select(
            InvoiceRow,
            _col(InvoiceRow, "invoice_id") == invoice_id,
            _col(InvoiceRow, "invoicing_connection") == pipeline.invoicing_name,
        )
        if not rows:
            return
        status = await pipeline.invoicing.get_invoice(invoice_id)
        await self._record_status(rows[0], status)

    async def _record_status(self, row: InvoiceRow, status: InvoiceStatus) -> None:
        now = self.rt.clock()
        values = _status_values(status)
        changed = any(str(getattr(row, k)) != str(v) for k, v in values.items() if k != "updated_at")
        if not changed:
            return
        async with self.store.begin() as conn:
            await conn.execute(
                sa.update(table_of(InvoiceRow))
                .where(_col(InvoiceRow, "key") == row.key)
                .values(**values, updated_at=now)
            )
            await self._queue_crm_status(conn, row.key, row.crm_connection, values, now)
        log.info("invoice_status_changed", invoice=row.number, state=values["state"], amount_due=values["amount_due"])

    async def _queue_crm_status(
        self, conn: Any, invoice_key: str, crm: str, values: dict[str, Any], now: datetime
    ) -> None:
        fingerprint = f"{invoice_key}:{values['state']}:{values['amount_due']}:{values.get('number')}"
        key = "crm:" + hashlib.sha256(fingerprint.encode()).hexdigest()[:32]
        await self.store.add_effect(
            conn, key=key, kind=WRITE_CRM_STATUS, connection=crm, payload={"invoice_key": invoice_key}, now=now
        )
        self.notify()

    async def refresh_aging(self) -> int:
        """Queue a write-back for every unpaid invoice past due (daily: overdue days grow).

        Returns:
            how many write-backs were queued (one per invoice per day at most).
        """
        now = self.rt.clock()
        open_states = [str(InvoiceState.AUTHORISED), str(InvoiceState.SENT), str(InvoiceState.PARTIALLY_PAID)]
        rows = await self.store.select(InvoiceRow, _col(InvoiceRow, "state").in_(open_states))
        queued = 0
        for row in rows:
            if row.due_date is None or row.due_date >= now.date():
                continue
            key = "aging:" + hashlib.sha256(f"{row.key}:{now.date().isoformat()}".encode()).hexdigest()[:32]
            async with self.store.begin() as conn:
                queued += await self.store.add_effect(
                    conn,
                    key=key,
                    kind=WRITE_CRM_STATUS,
                    connection=row.crm_connection,
                    payload={"invoice_key": row.key},
                    now=now,
                )
        if queued:
            self.notify()
        return queued

    # -- outbox ---------------------------------------------------------------------------

    async def execute_effects(self, limit: int) -> int:
        """Claim and execute up to ``limit`` due effects; how many were claimed."""
        now = self.rt.clock()
        rows = await self.store.claim(
            EffectRow, owner=self.rt.owner, limit=limit, lease_s=self.rt.config.daemon.lease_s, now=now
        )
        for row in rows:
            await self._settle(EffectRow, row, "effect", self._execute)
        return len(rows)

    async def _execute(self, row: EffectRow) -> bool:
        """Run one effect; ``True`` when it settled its own row (in its own transaction)."""
        if row.kind == CREATE_INVOICE:
            await self._create_invoice(row)
            return True
        if row.kind == WRITE_CRM_STATUS:
            await self._write_crm_status(row)
            return False
        raise FatalError(f"unknown effect kind {row.kind!r}", place=f"effects.id={row.id}")

    async def _create_invoice(self, row: EffectRow) -> None:
        draft = InvoiceDraft.model_validate(row.payload["draft"])
        invoicing = self.rt.connectors[row.connection]
        customer_id = await self._customer_id(row.connection, invoicing, draft.client)
        # Only a retry can follow a create whose answer was lost (or a crash after it):
        # the first attempt skips the lookup, every later one looks up before creating.
        status = await invoicing.find_invoice(draft.key) if row.attempts > 1 else None
        created = status is None
        if status is None:
            status = await invoicing.create_invoice(draft, customer_id)
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
            "triggered_at": triggered_at,
            "created_at": now,
            "updated_at": now,
            "totals_mismatch": mismatch,
        }
        async with self.store.begin() as conn:
            await self.store.upsert(InvoiceRow, values, conn)
            if not await self.store.finish(
                EffectRow, row, status="done", now=now, result={"invoice_id": status.invoice_id}, conn=conn
            ):
                raise _Fenced()
            await self._queue_crm_status(conn, draft.key, row.payload["crm"], _status_values(status), now)
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

    async def _customer_id(self, connection: str, invoicing: Any, client: Client) -> str:
        """The client's customer id at the invoicing tool, created at most once.

        Two effects of the same client may run at once (on two replicas): the lock makes
        the second wait and then read the id the first stored.
        """
        async with self.store.named_lock(f"customer:{connection}:{client.key}"):
            row = await self.store.get(ClientRow, client.key)
            known = row.external_ids.get(connection) if row is not None else None
            if known:
                return str(known)
            customer_id = str(await invoicing.upsert_customer(client))
            if row is not None:
                ids = {**row.external_ids, connection: customer_id}
                await self.store.update(ClientRow, [_col(ClientRow, "key") == client.key], {"external_ids": ids})
            return customer_id

    async def _write_crm_status(self, row: EffectRow) -> None:
        invoice = await self.store.get(InvoiceRow, row.payload["invoice_key"])
        if invoice is None:
            raise RecordError(f"invoice {row.payload['invoice_key']} is not recorded", place=f"effects.id={row.id}")
        client = await self.store.get(ClientRow, invoice.client_key)
        zone = ZoneInfo(client.data.get("timezone", "UTC") if client else "UTC")
        status = crm_status_for(invoice, self.rt.clock().astimezone(zone).date())
        await self.rt.connectors[row.connection].write_billing_status(invoice.crm_object_id, status)
        log.info("crm_status_written", deal=invoice.crm_object_id, invoice=invoice.number, state=status.state)

    # -- settling -------------------------------------------------------------------------

    async def _settle(self, model: Any, row: Any, source: str, work: Callable[[Any], Awaitable[bool]]) -> None:
        """Run ``work`` for a claimed row and settle it: done, retry later, or dead-letter.

        ``work`` returns ``True`` when it already settled the row in its own transaction.
        """
        log_ctx = {"source": source, "id": row.id, "attempt": row.attempts}
        try:
            settled = await work(row)
        except _Fenced:
            log.warning("lease_lost", **log_ctx)
            return
        except (RetriableError, AuthError) as exc:
            await self._retry_or_bury(model, row, source, exc)
            return
        except (MappingError, RecordError, FatalError) as exc:
            await self._bury(model, row, source, exc)
            return
        except SyncdError as exc:
            await self._bury(model, row, source, exc)
            return
        except Exception as exc:  # a bug or an untranslated library error: retry, then bury
            log.exception("work_crashed", **log_ctx)
            await self._retry_or_bury(model, row, source, RetriableError(f"unexpected {type(exc).__name__}: {exc}"))
            return
        if not settled:
            await self.store.finish(model, row, status="done", now=self.rt.clock())

    async def _retry_or_bury(self, model: Any, row: Any, source: str, exc: SyncdError) -> None:
        if row.attempts >= self.rt.config.daemon.max_attempts:
            await self._bury(model, row, source, exc)
            return
        wait = backoff_s(row.attempts, getattr(exc, "retry_after_s", None))
        if isinstance(exc, AuthError):
            wait = max(wait, 300.0)
        now = self.rt.clock()
        await self.store.finish(
            model, row, status="pending", now=now, error=str(exc), next_at=now + timedelta(seconds=wait)
        )
        log.warning("work_retry", source=source, id=row.id, attempt=row.attempts, wait_s=wait, error=str(exc))

    async def _bury(self, model: Any, row: Any, source: str, exc: SyncdError) -> None:
        now = self.rt.clock()
        payload = {
            k: getattr(row, k)
            for k in ("connection", "object_type", "object_id", "event_id", "kind", "key")
            if hasattr(row, k)
        }
        async with self.store.begin() as conn:
            if not await self.store.finish(model, row, status="dead", now=now, error=str(exc), conn=conn):
                return
            await self.store.dead_letter(
                source=source,
                ref=str(row.id),
                connection=row.connection,
                reason=exc.message,
                place=exc.place,
                payload=payload,
                now=now,
                conn=conn,
            )
        log.error("dead_lettered", source=source, id=row.id, reason=exc.message, place=exc.place)


class _Fenced(Exception):
    """This worker's lease was taken over; its result is discarded."""


def _col(model: Any, name: str) -> Any:
    return table_of(model).c[name]


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
    }


def _totals_mismatch(draft: InvoiceDraft, status: InvoiceStatus) -> str | None:
    """Compare the tool's subtotal with the draft's; a difference is flagged, not fixed."""
    if status.subtotal is None:
        return None
    expected = draft.subtotal()
    if status.subtotal == expected:
        return None
    return f"draft subtotal {expected} {draft.currency}, {status.currency} tool subtotal {status.subtotal}"
