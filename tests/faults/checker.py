"""The one check every fault scenario ends with: exactly once, nothing lost, nothing leaked.

Run after a scenario has settled, over the emulators' records (in-process state: the
scenario owns them) and syncd's store (a SQLite file or a PostgreSQL database):

1. **At most one vendor document per billing-event key.** Every invoice and credit note
   at Xero carrying syncd's ``syncd:<key>`` stamp in its ``Reference`` is counted per key.
2. **Every billing event ends as exactly one of** an invoice, a dead letter (of its
   effect, or a ``manual_credit``) or a recorded outcome (``outcomes.billing_event_key``).
   One that ends as none is a *loss*; so is a deal the scenario won that has no billing
   event or outcome at all (``expect_won``), and an event or effect left unsettled.
   Likewise at most one active vendor contact per client stamp (``ContactNumber``).
3. **syncd's invoice table and the vendor's documents match one to one**: same key,
   document id, number, currency and total.
4. **The CRM shows the vendor's final state and never went backwards.** The deal's
   ``syncd_*`` properties equal the standing computed from the vendor's documents
   (:func:`syncd.core.receivables.deal_status`); in the HubSpot emulator's write history
   (``HubSpotEmulator.writes``) the invoice numbers only grow, the total invoiced never
   falls and, at the same total, the amount due never rises (unless the scenario
   reversed a payment: ``reversals``). A deal whose write-back was dead-lettered is
   left out of the first half: its dead letter is the record a person acts on.
5. **No secret** (client secrets, tokens, webhook secrets) in any log text given, nor in
   dead letters, outcomes or the last errors of events and effects.

:func:`check` returns a :class:`Report` with the counts RELIABILITY.md tabulates; its
:meth:`Report.assert_ok` fails the test listing every problem. With
``SYNCD_SOAK_REPORT`` set (``make soak``), :func:`record` appends each report as one
JSON line for ``tests/faults/soak.py``.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from connectors.hubspot.connector import BillingProperty
from connectors.hubspot.emulator import HubSpotEmulator
from connectors.xero.emulator import XeroEmulator
from connectors.xero.models import XeroCreditNote, XeroInvoice, credit_note_status, dump_json, invoice_status
from syncd.core import receivables
from syncd.store.db import (
    BillingEventRow,
    DeadLetterRow,
    EffectRow,
    EventRow,
    InvoiceRow,
    OutcomeRow,
    Store,
)

STAMP = re.compile(r"(?:^|\s)syncd:(\S+)")
REPORT_ENV = "SYNCD_SOAK_REPORT"


@dataclass(kw_only=True)
class Report:
    """What one scenario ended with.

    Attributes:
        scenario / seed: which run this is (set by :func:`record`).
        billing_events: billing events syncd recorded (live ones; simulated ones send nothing).
        invoices: documents at the vendor carrying a syncd stamp.
        duplicates: vendor documents beyond the first for a key.
        losses: billing events (or won deals) that ended as nothing, plus unsettled work.
        dead_letters: dead letters recorded.
        outcomes: outcomes recorded (skips, simulated, attention).
        problems: every broken rule, one sentence each.
    """

    scenario: str = ""
    seed: int | None = None
    billing_events: int = 0
    invoices: int = 0
    duplicates: int = 0
    losses: int = 0
    dead_letters: int = 0
    outcomes: int = 0
    problems: list[str] = field(default_factory=list)

    def assert_ok(self) -> None:
        """Fail listing every problem, if there is one."""
        assert not self.problems, "fault checker found:\n- " + "\n- ".join(self.problems)


@dataclass(frozen=True, kw_only=True)
class _State:
    billing_events: list[BillingEventRow]
    invoices: list[InvoiceRow]
    dead_letters: list[DeadLetterRow]
    outcomes: list[OutcomeRow]
    events: list[EventRow]
    effects: list[EffectRow]


async def read_state(database_url: str) -> _State:
    """Every row the checker looks at, read once."""
    store = Store.open(database_url)
    try:
        return _State(
            billing_events=await store.select(BillingEventRow),
            invoices=await store.select(InvoiceRow),
            dead_letters=await store.select(DeadLetterRow),
            outcomes=await store.select(OutcomeRow),
            events=await store.select(EventRow),
            effects=await store.select(EffectRow),
        )
    finally:
        await store.close()


async def check(
    database_url: str,
    hub: HubSpotEmulator,
    xero: XeroEmulator,
    *,
    expect_won: Iterable[str] = (),
    secrets: Iterable[str] = (),
    texts: Iterable[tuple[str, str]] = (),
    reversals: bool = False,
    settled: bool = True,
    today: date | None = None,
) -> Report:
    """Check a settled scenario (module docstring); the report lists every problem.

    Args:
        database_url: syncd's database.
        hub / xero: the scenario's emulators.
        expect_won: CRM deal ids the scenario moved to won: each must end as a billing
            event or an outcome.
        secrets: values that must appear nowhere.
        texts: (where, text) pairs to search for them (log files, captured output).
        reversals: the scenario reversed a payment, so an amount due may rise again.
        today: the day the vendor's state is judged on (overdue or not); the real today by default.
        settled: every event and effect must be settled (nothing pending); ``False`` for
            a scenario that ends with work waiting on a person (a billing event whose
            effect is still pending is then in progress, not lost).
    """
    state = await read_state(database_url)
    report = Report(
        billing_events=sum(1 for row in state.billing_events if not row.simulated),
        dead_letters=len(state.dead_letters),
        outcomes=len(state.outcomes),
    )
    documents = _vendor_documents(xero)
    report.invoices = sum(len(found) for found in documents.values())
    _one_per_key(documents, report)
    _one_contact_per_client(xero, report)
    _every_event_ends(state, expect_won, settled, report)
    _one_to_one(state, documents, report)
    _crm_matches(state, documents, hub, reversals, today or datetime.now(UTC).date(), report)
    _no_secrets(state, [s for s in secrets if s], list(texts), report)
    return report


def _vendor_documents(xero: XeroEmulator) -> dict[str, list[dict[str, Any]]]:
    """Stamped documents at the vendor, by billing-event key (each with its canonical status)."""
    found: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for kind, documents in (("invoice", xero.invoices()), ("credit_note", xero.credit_notes())):
        for raw in documents:
            match = STAMP.search(raw.get("Reference") or "")
            if match is None:
                continue
            body = dump_json(raw)
            if kind == "invoice":
                status = invoice_status(XeroInvoice.model_validate_json(body))
            else:
                status = credit_note_status(XeroCreditNote.model_validate_json(body))
            found[match.group(1)].append({"kind": kind, "status": status})
    return found


def _one_per_key(documents: dict[str, list[dict[str, Any]]], report: Report) -> None:
    for key, found in sorted(documents.items()):
        if len(found) > 1:
            report.duplicates += len(found) - 1
            ids = ", ".join(doc["status"].invoice_id for doc in found)
            report.problems.append(f"{len(found)} vendor documents carry key {key}: {ids}")


def _one_contact_per_client(xero: XeroEmulator, report: Report) -> None:
    numbers: dict[str, int] = defaultdict(int)
    for contact in xero.contacts():
        if contact.get("ContactNumber") and contact.get("ContactStatus", "ACTIVE") == "ACTIVE":
            numbers[str(contact["ContactNumber"])] += 1
    for number, count in sorted(numbers.items()):
        if count > 1:
            report.duplicates += count - 1
            report.problems.append(f"{count} vendor contacts carry the client stamp {number}")


def _every_event_ends(state: _State, expect_won: Iterable[str], settled: bool, report: Report) -> None:
    invoiced = {row.key for row in state.invoices}
    buried: set[str] = set()
    effects = {str(row.id): row for row in state.effects}
    for letter in state.dead_letters:
        payload = letter.payload or {}
        if letter.source == "effect" and letter.ref in effects:
            buried.add(effects[letter.ref].key)
        elif payload.get("key"):
            buried.add(str(payload["key"]))
    settled_by_outcome = {row.billing_event_key for row in state.outcomes if row.billing_event_key}
    in_progress = {row.key for row in state.effects if row.status == "pending"} if not settled else set()
    for event in state.billing_events:
        if event.simulated or event.key in in_progress:
            continue
        ends = [
            name
            for name, keys in (("an invoice", invoiced), ("a dead letter", buried), ("an outcome", settled_by_outcome))
            if event.key in keys
        ]
        if not ends:
            report.losses += 1
            report.problems.append(f"billing event {event.key} ended as no invoice, dead letter or outcome")
        elif "an invoice" in ends and "a dead letter" in ends:
            report.problems.append(f"billing event {event.key} ended as both {' and '.join(ends)}")
    engagements = {row.engagement_key for row in state.billing_events}
    touched = {row.object_id for row in state.outcomes if row.object_type == "deal"}
    deals_billed = {row.crm_object_id for row in state.invoices}
    for deal in expect_won:
        if not any(key.endswith(f":{deal}") or f":{deal}:" in key for key in engagements) and not (
            deal in touched or deal in deals_billed
        ):
            report.losses += 1
            report.problems.append(f"deal {deal} was won but has no billing event, invoice or outcome")
    if settled:
        for kind, rows in (("event", state.events), ("effect", state.effects)):
            for row in rows:
                if row.status == "pending":
                    report.losses += 1
                    report.problems.append(
                        f"{kind} {row.id} is still pending after the scenario settled "
                        f"(attempts {row.attempts}, last error {row.last_error!r})"
                    )


def _one_to_one(state: _State, documents: dict[str, list[dict[str, Any]]], report: Report) -> None:
    recorded = {row.key: row for row in state.invoices}
    for key, row in sorted(recorded.items()):
        found = documents.get(key, [])
        match = next((doc["status"] for doc in found if doc["status"].invoice_id == row.invoice_id), None)
        if match is None:
            report.problems.append(
                f"syncd recorded {row.kind} {row.number} ({row.invoice_id}) for {key}; the vendor has no such document"
            )
            continue
        if (match.number, match.currency, match.total) != (row.number, row.currency, Decimal(row.total)):
            report.problems.append(
                f"{key}: syncd recorded {row.number} {row.total} {row.currency}, the vendor has "
                f"{match.number} {match.total} {match.currency}"
            )
    for key in sorted(set(documents) - set(recorded)):
        report.problems.append(f"the vendor has a document for {key} that syncd never recorded")


def _crm_matches(
    state: _State,
    documents: dict[str, list[dict[str, Any]]],
    hub: HubSpotEmulator,
    reversals: bool,
    today: date,
    report: Report,
) -> None:
    by_deal: dict[str, list[InvoiceRow]] = defaultdict(list)
    for row in state.invoices:
        by_deal[row.crm_object_id].append(row)
    # A write-back given up on is a dead letter a person acts on: the deal may lag behind then.
    given_up = {
        str(row.payload.get("crm_object_id"))
        for row in state.effects
        if row.kind == "write_crm_status" and row.status == "dead"
    }
    for deal_id, rows in sorted(by_deal.items()):
        if deal_id in given_up:
            continue
        vendor = []
        for row in sorted(rows, key=lambda r: r.created_at):
            match = next(
                (d["status"] for d in documents.get(row.key, []) if d["status"].invoice_id == row.invoice_id), None
            )
            if match is not None:
                vendor.append(_document(row.kind, match))
        expected = receivables.deal_status(vendor, today)
        if expected is None:
            continue
        shown = hub.deal(deal_id)["properties"]
        _compare(deal_id, expected, shown, report)
        _never_backwards(deal_id, hub, reversals, report)


def _document(kind: str, status: Any) -> receivables.Document:
    return receivables.Document(
        kind=kind,
        number=status.number,
        state=str(status.state),
        currency=status.currency,
        total=status.total,
        amount_due=status.amount_due,
        due_date=status.due_date,
    )


def _compare(deal_id: str, expected: Any, shown: dict[str, Any], report: Report) -> None:
    wanted = {
        BillingProperty.INVOICE_NUMBER: expected.invoice_number or "",
        BillingProperty.INVOICE_STATUS: str(expected.state),
        BillingProperty.AMOUNT_DUE: expected.amount_due,
        BillingProperty.TOTAL_INVOICED: expected.total_invoiced,
    }
    for name, value in wanted.items():
        got = shown.get(name.value)
        same = _decimal(got) == value if isinstance(value, Decimal) else (got or "") == value
        if not same:
            report.problems.append(f"deal {deal_id}: {name.value} shows {got!r}, the vendor's state says {value!s}")


def _never_backwards(deal_id: str, hub: HubSpotEmulator, reversals: bool, report: Report) -> None:
    numbers: set[str] = set()
    total = Decimal(0)
    due: Decimal | None = None
    for write in (w for w in hub.writes if w.object_type == "deals" and w.object_id == deal_id):
        values = write.properties
        if BillingProperty.INVOICE_NUMBER.value not in values:
            continue
        now_numbers = {n.strip() for n in (values[BillingProperty.INVOICE_NUMBER.value] or "").split(",") if n.strip()}
        now_total = _decimal(values.get(BillingProperty.TOTAL_INVOICED.value)) or Decimal(0)
        now_due = _decimal(values.get(BillingProperty.AMOUNT_DUE.value))
        if not numbers <= now_numbers:
            report.problems.append(
                f"deal {deal_id}: a write-back dropped invoice numbers {sorted(numbers - now_numbers)}"
            )
        if now_total < total:
            report.problems.append(f"deal {deal_id}: total invoiced went back from {total} to {now_total}")
        elif now_total == total and due is not None and now_due is not None and now_due > due and not reversals:
            report.problems.append(f"deal {deal_id}: amount due went back up from {due} to {now_due}")
        numbers, total, due = now_numbers, now_total, now_due


def _decimal(value: Any) -> Decimal | None:
    if value in (None, ""):
        return None
    return Decimal(str(value))


def _no_secrets(state: _State, secrets: Sequence[str], texts: list[tuple[str, str]], report: Report) -> None:
    stored: list[tuple[str, str]] = []
    for letter in state.dead_letters:
        stored.append(
            (f"dead letter {letter.id}", json.dumps([letter.reason, letter.place, letter.payload], default=str))
        )
    for outcome in state.outcomes:
        stored.append((f"outcome {outcome.key}", f"{outcome.detail} {outcome.place}"))
    for kind, rows in (("event", state.events), ("effect", state.effects)):
        stored += [(f"{kind} {row.id} last_error", row.last_error or "") for row in rows]
    for where, text in [*texts, *stored]:
        for index, secret in enumerate(secrets):
            if secret in text:
                # Never print the secret itself: say which one (by position) and where.
                report.problems.append(f"secret #{index} ({len(secret)} characters) appears in {where}")


def emulator_secrets(hub: HubSpotEmulator, xero: XeroEmulator) -> list[str]:
    """Every credential the emulators know: configured secrets and every token they issued."""
    issued = [token for token, grant in xero._grants.items() if grant.kind != "code"]
    return [
        hub.token,
        hub.client_secret,
        hub.refresh_token,
        *hub._access_tokens,
        xero.client_secret,
        xero.webhook_key,
        *issued,
    ]


def log_texts(*paths: Path) -> list[tuple[str, str]]:
    """(file name, text) of each log file that exists."""
    return [(path.name, path.read_text(errors="replace")) for path in paths if path.exists()]


def record(report: Report, scenario: str, seed: int | None = None) -> Report:
    """Name the report and, under ``make soak``, append it to ``SYNCD_SOAK_REPORT`` as a JSON line."""
    report.scenario, report.seed = scenario, seed
    target = os.environ.get(REPORT_ENV)
    if target:
        with Path(target).open("a", encoding="utf-8") as out:
            out.write(json.dumps(asdict(report)) + "\n")
    return report
