"""Preview: what a mapping produces, with no effect (``syncd preview``).

Two questions an admin asks before trusting a mapping:

* **What does this deal become?** :func:`preview_deal` re-reads the deal from the CRM
  (reads only: no store write, no call to the invoicing tool), maps it with each
  pipeline's running mapping, adds the amount and cancellation history syncd keeps for
  it (:func:`syncd.engine.recurring.keep_history`, from the stored engagement) and drafts its
  invoices the way the engine does: the ``deal_won`` (or ``deliverable_accepted``) draft
  of a one-time engagement, and for the other types the events
  :func:`syncd.core.billing.due_events` yields as of now. Billing
  events already recorded are marked so (they would not be invoiced again); hourly
  events are drafted from time entries when due and are not previewed.
* **What would change if I switched to this file?** :func:`preview_mapping` maps every
  deal syncd has stored (:class:`~syncd.store.db.SourceRecordRow`, the last-seen copy of
  each) with the current and the proposed mapping and compares the client, engagement
  and won draft field by field: same, changed, newly failing, newly passing.

The stored copies hold the properties the *current* mapping reads (and the connector's
defaults); a property only the proposed mapping reads reads as absent there, and
:attr:`MappingDiff.unread` lists such properties so a surprising "newly failing" can be
told from a real one.

:func:`render_deal` and :func:`render_diff` print rich tables; ``as_json`` gives the same
content for ``--json``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlmodel import col

from syncd.core import billing
from syncd.core.errors import ConfigError, MappingError, ValidationFailed
from syncd.core.interfaces import (
    BillingEvent,
    BillingEventKind,
    Capability,
    Client,
    Engagement,
    EngagementType,
    InvoiceDraft,
    SourceRecord,
)
from syncd.core.mapping import MappedDeal, MappingDefaults, PipelineMapping, load_mapping
from syncd.engine import recurring
from syncd.engine.runtime import Pipeline, Runtime
from syncd.plumbing.settings import Config
from syncd.store.db import BillingEventRow, EngagementRow, OutcomeRow, SourceRecordRow, table_of

Status = Literal["same", "changed", "newly_failing", "newly_passing"]
STATUSES: tuple[Status, ...] = ("same", "changed", "newly_failing", "newly_passing")
_ONCE = (BillingEventKind.DEAL_WON, BillingEventKind.DELIVERABLE_ACCEPTED)
_SINCE_EVER = datetime(1970, 1, 1, tzinfo=UTC)
PAGE_SIZE = 200  # stored deals mapped per page by preview_mapping

# ---------------------------------------------------------------------------
# One deal
# ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DraftPreview:
    """A draft a deal would produce.

    Attributes:
        draft: the invoice or credit note, as it would be queued.
        event: the billing event it is for.
        recorded: the event's key is already recorded (so it would not be invoiced again).
    """

    draft: InvoiceDraft
    event: BillingEvent
    recorded: bool


@dataclass(frozen=True, kw_only=True)
class DealPreview:
    """What one pipeline's mapping makes of one deal.

    Attributes:
        mapping: the mapping file used.
        deal_id: the CRM's deal id.
        taken: the pipeline takes the deal (its ``[pipeline].when`` holds).
        client / engagement: the mapped values (``None`` when not taken or failed).
        drafts: the drafts it would produce now.
        notes: why there is no draft, or what was left out.
        error: the mapping's error, exactly as a dead letter would hold it.
        outcomes: what syncd has recorded for the deal without an invoice (skips,
            simulated events, outcomes that need attention), each ``kind reason: detail``.
    """

    mapping: Path
    deal_id: str
    taken: bool = True
    client: Client | None = None
    engagement: Engagement | None = None
    drafts: tuple[DraftPreview, ...] = ()
    notes: tuple[str, ...] = ()
    error: str | None = None
    outcomes: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        """The preview as JSON-ready values (``--json``)."""
        return {
            "mapping": str(self.mapping),
            "deal": self.deal_id,
            "taken": self.taken,
            "error": self.error,
            "client": self.client.model_dump(mode="json") if self.client else None,
            "engagement": self.engagement.model_dump(mode="json") if self.engagement else None,
            "drafts": [
                {
                    "event": item.event.model_dump(mode="json"),
                    "recorded": item.recorded,
                    "subtotal": format(item.draft.subtotal(), "f"),
                    **item.draft.model_dump(mode="json"),
                }
                for item in self.drafts
            ],
            "notes": list(self.notes),
            "outcomes": list(self.outcomes),
        }


async def preview_deal(runtime: Runtime, deal_id: str) -> list[DealPreview]:
    """Re-read ``deal_id`` and preview it with every pipeline's running mapping.

    Nothing is written and the invoicing tool is not called.

    Raises:
        NotFound: the CRM has no such deal.
        AuthError / RetriableError / FatalError: the CRM could not be read.
    """
    previews = [await _preview_with(runtime, pipeline, deal_id) for pipeline in list(runtime.pipelines)]
    recorded = await _recorded_outcomes(runtime, deal_id)
    return [dataclasses.replace(preview, outcomes=recorded) for preview in previews]


async def _recorded_outcomes(runtime: Runtime, deal_id: str) -> tuple[str, ...]:
    """The deal's recorded outcomes without an invoice, oldest first."""
    crms = {f"{pipeline.crm_name}:deal:{deal_id}" for pipeline in runtime.pipelines}
    rows = await runtime.store.select(
        OutcomeRow,
        sa.or_(col(OutcomeRow.object_id) == deal_id, col(OutcomeRow.engagement_key).in_(sorted(crms))),
        order_by=col(OutcomeRow.id),
    )
    return tuple(f"{row.kind} {row.reason} ({row.status}): {row.detail}" for row in rows)


async def _preview_with(runtime: Runtime, pipeline: Pipeline, deal_id: str) -> DealPreview:
    mapping = pipeline.mapping
    record = await pipeline.crm.fetch_deal(deal_id, mapping.source_properties)
    try:
        if not mapping.selects(record):
            note = f"{mapping.path} [pipeline].when does not take this deal: nothing is invoiced"
            return DealPreview(mapping=mapping.path, deal_id=deal_id, taken=False, notes=(note,))
        mapped = mapping.map_deal(record, defaults=runtime.defaults)
    except MappingError as exc:
        return DealPreview(mapping=mapping.path, deal_id=deal_id, error=str(exc))
    engagement = await _with_history(runtime, mapped, record)
    drafts, notes = await _drafts(runtime, pipeline, mapped.model_copy(update={"engagement": engagement}))
    return DealPreview(
        mapping=mapping.path,
        deal_id=deal_id,
        client=mapped.client,
        engagement=engagement,
        drafts=tuple(drafts),
        notes=tuple(notes),
    )


async def _with_history(runtime: Runtime, mapped: MappedDeal, record: SourceRecord) -> Engagement:
    """The engagement with the amount and cancellation history the engine keeps (read, not written)."""
    row = await runtime.store.get(EngagementRow, mapped.engagement.key)
    previous = Engagement.model_validate(row.data) if row is not None else None
    return recurring.keep_history(
        previous, mapped.engagement, recorded_at=record.modified_at, timezone=mapped.client.timezone
    )


async def _drafts(runtime: Runtime, pipeline: Pipeline, mapped: MappedDeal) -> tuple[list[DraftPreview], list[str]]:
    engagement, client = mapped.engagement, mapped.client
    now = runtime.clock()
    try:
        events = billing.due_events(
            engagement,
            as_of=now,
            timezone=client.timezone,
            billing_start=runtime.billing_start,
            credit_notes=Capability.CREDIT_NOTES in pipeline.invoicing.capabilities,
        )
    except ValidationFailed as exc:
        return [], [str(exc)]
    recorded = await _recorded_keys(runtime, engagement.key)
    drafts: list[DraftPreview] = []
    notes = _why_none(runtime, engagement, now) if not events else []
    earlier = 0
    for event in events:
        if event.key in recorded and event.kind not in _ONCE:
            earlier += 1
        elif engagement.type is EngagementType.HOURLY:
            notes.append(f"{event.kind} {event.occurrence}: drafted from time entries when due (not previewed)")
        else:
            try:
                item = _draft(pipeline.mapping, event, mapped, now, recorded=event.key in recorded)
                ready = recurring.ledger_ready(runtime, pipeline, item.draft)
                drafts.append(dataclasses.replace(item, draft=ready))
            except (ValidationFailed, MappingError) as exc:
                notes.append(str(exc))
    if earlier:
        notes.append(f"{earlier} earlier billing event(s) of this engagement are already recorded (not shown)")
    return drafts, notes


def _draft(
    mapping: PipelineMapping, event: BillingEvent, mapped: MappedDeal, now: datetime, *, recorded: bool
) -> DraftPreview:
    """The draft for ``event`` as the engine queues it (issue date: today in the client's zone)."""
    client = mapped.client
    options = mapping.invoice
    draft = billing.draft_for_event(
        event,
        mapped.engagement,
        client,
        issue_date=billing.issue_date_for(now, client.timezone),
        status=options.status,
        send=options.send,
        line_amount_types=options.line_amount_types,
    )
    return DraftPreview(draft=draft, event=event, recorded=recorded)


def _why_none(runtime: Runtime, engagement: Engagement, now: datetime) -> list[str]:
    if engagement.won_at is None:
        return ["the deal is not won ([pipeline].won does not hold): nothing is invoiced until it is"]
    if engagement.won_at < runtime.billing_start:
        return [f"won {engagement.won_at.isoformat()}, before billing_start {runtime.billing_start.isoformat()}"]
    return [f"no billing event is due as of {now.isoformat()}"]


async def _recorded_keys(runtime: Runtime, engagement_key: str) -> frozenset[str]:
    rows = await runtime.store.select(BillingEventRow, table_of(BillingEventRow).c.engagement_key == engagement_key)
    return frozenset(row.key for row in rows)


# ---------------------------------------------------------------------------
# A proposed mapping over the stored deals
# ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What one mapping makes of one stored deal, flattened for comparison.

    Attributes:
        fields: ``client.legal_name`` → value, ``engagement.lines[0].unit_price`` →
            value, ``draft.due_date`` → value … (JSON text; ``None`` for no value).
        error: the mapping error, when it fails.
    """

    fields: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True, kw_only=True)
class RecordDiff:
    """One stored deal under the current and the proposed mapping.

    Attributes:
        deal_id: the CRM's deal id.
        status: ``same``, ``changed``, ``newly_failing`` or ``newly_passing``.
        changes: ``(field, current, proposed)`` for each field that differs (``error``
            for a failure).
    """

    deal_id: str
    status: Status
    changes: tuple[tuple[str, Any, Any], ...] = ()


@dataclass(frozen=True, kw_only=True)
class MappingDiff:
    """A proposed mapping compared with the current one over the stored deals.

    Attributes:
        current / proposed: the two mapping files.
        records: one entry per stored deal of the pipeline, by deal id.
        unread: ``company.tax_code`` … properties only the proposed mapping reads (the
            stored copies were not fetched with them, so they read as absent here).
    """

    current: Path
    proposed: Path
    records: tuple[RecordDiff, ...]
    unread: tuple[str, ...] = ()

    def counts(self) -> dict[Status, int]:
        """How many deals are in each status."""
        return {status: sum(1 for record in self.records if record.status == status) for status in STATUSES}

    def as_json(self) -> dict[str, Any]:
        """The diff as JSON-ready values (``--json``)."""
        return {
            "current": str(self.current),
            "proposed": str(self.proposed),
            "counts": self.counts(),
            "unread_properties": list(self.unread),
            "records": [
                {
                    "deal": record.deal_id,
                    "status": record.status,
                    "changes": [{"field": f, "current": c, "proposed": p} for f, c, p in record.changes],
                }
                for record in self.records
            ],
        }


async def preview_mapping(runtime: Runtime, proposed_path: Path, *, pipeline: int | None = None) -> MappingDiff:
    """Map every stored deal of a pipeline with its current and the proposed mapping, and compare.

    Args:
        runtime: the runtime (only its store is read).
        proposed_path: the mapping file to try.
        pipeline: which ``[[pipelines]]`` entry (1 = the first); needed when there are several.

    Raises:
        MappingError: the proposed file is invalid (``problems`` lists each).
        ConfigError: ``pipeline`` is missing or out of range.
    """
    chosen = _pipeline(runtime, pipeline)
    proposed = load_mapping(proposed_path)
    current = chosen.mapping
    table = table_of(SourceRecordRow)
    stored = (table.c.connection == chosen.crm_name, table.c.object_type == current.rules.source)
    now = runtime.clock()
    records = []
    # A page of snapshots at a time (their JSON is the bulk), in object id order as before.
    async for page in runtime.store.pages(SourceRecordRow, *stored, key="object_id", size=PAGE_SIZE):
        for row in page:
            record = row.as_record()
            before = _outcome(current, record, runtime.defaults, now)
            after = _outcome(proposed, record, runtime.defaults, now)
            records.append(_compare(record.object_id, before, after))
    return MappingDiff(
        current=current.path, proposed=proposed.path, records=tuple(records), unread=_unread(current, proposed)
    )


def _pipeline(runtime: Runtime, index: int | None) -> Pipeline:
    pipelines = runtime.pipelines
    if index is None and len(pipelines) == 1:
        return pipelines[0]
    if index is None or not 1 <= index <= len(pipelines):
        listed = ", ".join(f"{n} = {p.settings.mapping}" for n, p in enumerate(pipelines, start=1))
        raise ConfigError(f"name the pipeline with --pipeline N (1 to {len(pipelines)}): {listed or 'none defined'}")
    return pipelines[index - 1]


def _outcome(mapping: PipelineMapping, record: SourceRecord, defaults: MappingDefaults, now: datetime) -> Outcome:
    try:
        if not mapping.selects(record):
            return Outcome(fields={"taken": False})
        mapped = mapping.map_deal(record, defaults=defaults)
        draft = _won_draft(mapping, mapped, now)
    except (MappingError, ValidationFailed) as exc:
        return Outcome(error=str(exc))
    values: dict[str, Any] = {
        "taken": True,
        "client": mapped.client.model_dump(mode="json"),
        "engagement": mapped.engagement.model_dump(mode="json"),
    }
    if draft is not None:
        values["draft"] = draft.model_dump(mode="json", exclude={"client", "issue_date"})
    return Outcome(fields=dict(_flatten(values)))


def _won_draft(mapping: PipelineMapping, mapped: MappedDeal, now: datetime) -> InvoiceDraft | None:
    """The one-time draft of a won deal, whenever it was won (the diff ignores billing_start)."""
    engagement = mapped.engagement
    events = (
        billing.deal_won_event(engagement, billing_start=_SINCE_EVER),
        billing.accepted_event(engagement, billing_start=_SINCE_EVER),
    )
    event = next((event for event in events if event is not None), None)
    if event is None:
        return None
    return _draft(mapping, event, mapped, now, recorded=False).draft


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list | tuple) and value:
        for index, item in enumerate(value):
            yield from _flatten(item, f"{prefix}[{index}]")
    else:
        yield prefix, None if isinstance(value, list | tuple) else value  # an empty list: no value


def _compare(deal_id: str, before: Outcome, after: Outcome) -> RecordDiff:
    if before.error is not None and after.error is None:
        return RecordDiff(deal_id=deal_id, status="newly_passing", changes=(("error", before.error, None),))
    if before.error is None and after.error is not None:
        return RecordDiff(deal_id=deal_id, status="newly_failing", changes=(("error", None, after.error),))
    if before.error != after.error:
        return RecordDiff(deal_id=deal_id, status="changed", changes=(("error", before.error, after.error),))
    names = list(dict.fromkeys([*before.fields, *after.fields]))
    changes = tuple(
        (name, before.fields.get(name), after.fields.get(name))
        for name in names
        if before.fields.get(name) != after.fields.get(name)
    )
    return RecordDiff(deal_id=deal_id, status="changed" if changes else "same", changes=changes)


def _unread(current: PipelineMapping, proposed: PipelineMapping) -> tuple[str, ...]:
    return tuple(
        f"{kind}.{name}"
        for kind, names in proposed.source_properties.items()
        for name in names
        if name not in current.source_properties.get(kind, ())
    )


# ---------------------------------------------------------------------------
# Entry points for the CLI: each owns a runtime
# ---------------------------------------------------------------------------


async def run_deal_preview(config: Config, deal_id: str) -> list[DealPreview]:
    """:func:`preview_deal` with a runtime of its own (the store is not migrated or written)."""
    runtime = await Runtime.start(config, migrate=False)
    try:
        return await preview_deal(runtime, deal_id)
    finally:
        await runtime.aclose()


async def run_mapping_preview(config: Config, proposed: Path, *, pipeline: int | None = None) -> MappingDiff:
    """:func:`preview_mapping` with a runtime of its own (the store is only read)."""
    runtime = await Runtime.start(config, migrate=False)
    try:
        return await preview_mapping(runtime, proposed, pipeline=pipeline)
    finally:
        await runtime.aclose()


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


def render_deal(previews: Sequence[DealPreview], console: Console) -> None:
    """Print each pipeline's preview of a deal as tables: client, engagement, drafts."""
    for preview in previews:
        console.rule(Text(f"deal {preview.deal_id} · {preview.mapping}"))
        if preview.error is not None:
            console.print("✗ the mapping fails:", preview.error, style="red", markup=False, highlight=False)
        if preview.client is not None:
            console.print(_fields_table("client", preview.client.model_dump(mode="json")))
        if preview.engagement is not None:
            console.print(_fields_table("engagement", preview.engagement.model_dump(mode="json", exclude={"lines"})))
        for item in preview.drafts:
            console.print(_draft_table(item))
            console.print(_lines_table(item.draft))
        for note in preview.notes:
            console.print("·", note, markup=False, highlight=False)
        for outcome in preview.outcomes:
            console.print("recorded:", outcome, markup=False, highlight=False)


def render_diff(diff: MappingDiff, console: Console) -> None:
    """Print the counts, then each deal that differs with its changed fields."""
    summary = Table(
        "same", "changed", "newly failing", "newly passing", title=Text(f"{diff.current} → {diff.proposed}")
    )
    summary.add_row(*(str(count) for count in diff.counts().values()))
    console.print(summary)
    if diff.unread:
        listed = ", ".join(diff.unread)
        console.print(f"· only the proposed mapping reads {listed}: stored copies lack them", markup=False)
    for record in diff.records:
        if record.status == "same":
            continue
        title = Text(f"deal {record.deal_id}: {record.status.replace('_', ' ')}")
        table = Table("field", "current", "proposed", title=title)
        for name, before, after in record.changes:
            table.add_row(Text(name), _shown(before), _shown(after))
        console.print(table)


def _fields_table(title: str, values: Mapping[str, Any]) -> Table:
    table = Table("field", "value", title=title)
    for name, value in _flatten(values):
        if value is not None and value != {}:
            table.add_row(Text(name), _shown(value))
    return table


def _draft_table(item: DraftPreview) -> Table:
    draft = item.draft
    title = f"{draft.kind.replace('_', ' ')} for {item.event.kind} {item.event.occurrence}"
    if item.recorded:
        title += " (already recorded: not invoiced again)"
    table = Table("field", "value", title=Text(title))
    for name, value in (
        ("key", draft.key),
        ("issue date", draft.issue_date.isoformat()),
        ("due date", draft.due_date.isoformat()),
        ("reference (PO)", draft.reference),
        ("currency", draft.currency),
        ("status", draft.status),
        ("amounts", draft.line_amount_types),
        ("subtotal", format(draft.subtotal(), "f")),
    ):
        table.add_row(name, _shown(value))
    return table


def _lines_table(draft: InvoiceDraft) -> Table:
    table = Table("description", "qty", "unit price", "amount", "account", "tax", "item", title="lines")
    for line in draft.lines:
        table.add_row(
            Text(line.description),
            format(line.quantity, "f"),
            format(line.unit_price, "f"),
            format(line.amount(draft.currency), "f"),
            _shown(line.account_code),
            _shown(line.tax_type),
            _shown(line.item_code),
        )
    return table


def _shown(value: Any) -> Text:
    """A cell as plain text: ``[client].name`` in a value is not rich markup."""
    return Text("—" if value is None else str(value))
