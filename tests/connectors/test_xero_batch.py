"""The Xero connector's batch role (CreatesInvoicesInBatches) against its emulator, over an ASGI transport.

Counts are the emulator's calls per operation (the spec's ``operationId``), so each test
states how many requests a batch costs.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, quote

import httpx
import pytest

from connectors.emulation import Fault
from connectors.xero.batches import BATCH_MAX, REQUEST_MAX_BYTES, WHERE_MAX_CHARS, batch_key, or_filters
from connectors.xero.connector import IDS_PER_READ, XeroConnector
from connectors.xero.emulator import UNSAVED_ID, compile_where
from connectors.xero.models import XeroRejected, contact_number, dump_json, load_json, stamp, where_literal
from syncd.core.errors import FatalError, NotFound, RetriableError, SyncdError
from syncd.core.interfaces import (
    Client,
    CreatesInvoicesInBatches,
    DraftKind,
    InvoiceDraft,
    InvoiceLine,
    InvoiceState,
    ReadsCustomersInBatches,
)
from tests.connectors.test_xero import API, Rig, client_record, draft, rig


def keys(count: int, prefix: str = "k") -> list[str]:
    return [f"{prefix}{index:02d}-" + "0123456789abcdef" * 2 for index in range(count)]


async def drafts_for(r: Rig, count: int, **overrides: Any) -> list[tuple[InvoiceDraft, str]]:
    contact_id = await r.connector.upsert_customer(client_record())
    return [(draft(key, **overrides), contact_id) for key in keys(count)]


def puts(r: Rig, path: str = "/Invoices") -> list[tuple[httpx.Request, httpx.Response]]:
    return [(q, a) for q, a in r.exchanges if q.method == "PUT" and q.url.path == API + path]


def ok(results: Any) -> dict[str, Any]:
    failed = {key: value for key, value in results.items() if isinstance(value, SyncdError)}
    assert not failed, failed
    return dict(results)


async def test_the_connector_plays_the_batch_role() -> None:
    """The Xero connector is a CreatesInvoicesInBatches and a ReadsCustomersInBatches."""
    async with rig() as r:
        assert isinstance(r.connector, CreatesInvoicesInBatches)
        assert isinstance(r.connector, ReadsCustomersInBatches)


async def test_sixteen_invoices_are_created_in_one_request() -> None:
    """16 drafts become 16 invoices in one PUT /Invoices?summarizeErrors=false, each stamped with its own key."""
    async with rig() as r:
        items = await drafts_for(r, 16)
        results = ok(await r.connector.create_invoices(items))
        assert r.emulator.calls["createInvoices"] == 1
        assert sorted(results) == sorted(d.key for d, _ in items)
        for key, status in results.items():
            assert status.stamped_key == key
            assert status.reference == f"PO-4411 · {stamp(key)}"
        ((request, answer),) = puts(r)
        assert parse_qs(request.url.query.decode())["summarizeErrors"] == ["false"]
        assert request.headers["Idempotency-Key"] == batch_key(d.key for d, _ in items)
        assert len(request.headers["Idempotency-Key"]) <= 128
        assert [i["StatusAttributeString"] for i in load_json(answer.content)["Invoices"]] == ["OK"] * 16
        assert len(r.emulator.invoices()) == 16


async def test_the_batch_key_depends_on_the_members_not_their_order() -> None:
    """The Idempotency-Key of a batch is the same for the same keys in any order, and differs for others."""
    assert batch_key(["a", "b"]) == batch_key(["b", "a"])
    assert batch_key(["a", "b"]) != batch_key(["a", "c"])


async def test_one_bad_element_among_ten_fails_alone_with_xeros_message() -> None:
    """One element Xero refuses maps to XeroRejected with its message; the other 9 are created, in one call."""
    async with rig() as r:
        items = await drafts_for(r, 10)
        bad_line = InvoiceLine(description="x", quantity=Decimal(1), unit_price=Decimal(1), account_code="999")
        bad_key = items[4][0].key
        items[4] = (draft(bad_key, lines=(bad_line,)), items[4][1])
        results = await r.connector.create_invoices(items)
        assert r.emulator.calls["createInvoices"] == 1
        error = results[bad_key]
        assert isinstance(error, XeroRejected)
        assert isinstance(error, FatalError)
        assert "Account code '999' is not a valid code for this document." in error.messages
        assert all(message in str(error) for message in error.messages)
        assert bad_key in str(error)
        assert all(not isinstance(v, SyncdError) for k, v in results.items() if k != bad_key)
        assert len(r.emulator.invoices()) == 9
        (_, answer) = puts(r)[0]
        refused = load_json(answer.content)["Invoices"][4]
        assert refused["StatusAttributeString"] == "ERROR"
        assert refused["HasErrors"] is True
        assert refused["InvoiceID"] == UNSAVED_ID
        assert refused["Date"].startswith("/Date(")


async def test_the_fault_plan_refuses_one_element_by_its_reference() -> None:
    """faults.refuse_element refuses the matching element with the given message; the rest are stored."""
    async with rig() as r:
        items = await drafts_for(r, 5)
        target = items[2][0].key
        r.emulator.faults.refuse_element(stamp(target), "Invoice # must be unique.")
        results = await r.connector.create_invoices(items)
        error = results[target]
        assert isinstance(error, XeroRejected)
        assert error.messages == ("Invoice # must be unique.",)
        assert r.emulator.faults.injected["element_refused"] == 1
        assert len(r.emulator.invoices()) == 4
        assert r.emulator.faults.element_faults == []


async def test_a_batch_answer_lost_once_is_replayed_by_its_idempotency_key() -> None:
    """A batch answer lost after Xero committed is resent by the HTTP layer with the same key: no second invoice."""
    async with rig() as r:
        items = await drafts_for(r, 16)
        r.emulator.faults.add(Fault(kind="drop_response", method="PUT", path_contains="/Invoices"))
        results = ok(await r.connector.create_invoices(items))
        assert len(results) == 16
        assert r.emulator.calls["createInvoices"] == 2
        assert r.emulator.calls["getInvoices"] == 0
        assert len(r.emulator.invoices()) == 16
        assert len({q.headers["Idempotency-Key"] for q, _ in puts(r)} | set()) == 1


async def test_every_answer_of_a_batch_lost_is_resolved_by_one_lookup_and_nothing_is_created_twice() -> None:
    """When every attempt's answer is lost, the members are found by their keys in one call; none is created again."""
    async with rig() as r:
        items = await drafts_for(r, 16)
        r.emulator.faults.add(Fault(kind="drop_response", method="PUT", path_contains="/Invoices", times=None))
        results = ok(await r.connector.create_invoices(items))
        stored = {i["InvoiceID"] for i in r.emulator.invoices()}
        assert len(stored) == 16
        assert {status.invoice_id for status in results.values()} == stored
        assert r.emulator.calls["getInvoices"] == 1
        assert r.emulator.calls["createInvoices"] == r.connector.http.max_attempts


async def test_a_batch_that_never_reached_xero_keeps_the_error_and_is_not_resent() -> None:
    """A batch refused with 503 on every attempt is looked up once; the missing members keep the retriable error."""
    async with rig() as r:
        items = await drafts_for(r, 4)
        r.emulator.faults.add(Fault(kind="status", status=503, method="PUT", path_contains="/Invoices", times=None))
        results = await r.connector.create_invoices(items)
        assert all(isinstance(value, RetriableError) for value in results.values())
        assert r.emulator.calls["getInvoices"] == 1
        assert r.emulator.invoices() == []


async def test_a_request_level_refusal_is_looked_up_then_split_in_halves() -> None:
    """A 400 for the whole request (no per-element answer) is looked up, then the missing are sent in halves."""
    async with rig() as r:
        items = await drafts_for(r, 16)
        r.emulator.faults.add(Fault(kind="status", status=400, method="PUT", path_contains="/Invoices"))
        results = ok(await r.connector.create_invoices(items))
        assert len(results) == 16
        assert r.emulator.calls["getInvoices"] == 1
        assert [len(load_json(q.content)["Invoices"]) for q, _ in puts(r)] == [16, 8, 8]
        assert len(r.emulator.invoices()) == 16


async def test_a_resent_batch_with_a_changed_body_finds_its_members_and_creates_none() -> None:
    """The same members sent again with another body (same key, refused 400) are found by key, not created again."""
    async with rig() as r:
        items = await drafts_for(r, 6)
        first = ok(await r.connector.create_invoices(items))
        changed = [(d.model_copy(update={"reference": "PO-CHANGED"}), c) for d, c in items]
        again = ok(await r.connector.create_invoices(changed))
        assert {k: s.invoice_id for k, s in again.items()} == {k: s.invoice_id for k, s in first.items()}
        assert [a.status_code for _, a in puts(r)] == [200, 400]
        assert r.emulator.calls["getInvoices"] == 1
        assert len(r.emulator.invoices()) == 6


async def test_a_bad_element_in_a_refused_request_is_isolated_by_halving() -> None:
    """After a request-level refusal, halving down to one element leaves only the bad one failing."""
    async with rig() as r:
        items = await drafts_for(r, 8)
        bad_key = items[5][0].key
        bad_line = InvoiceLine(description="x", quantity=Decimal(1), unit_price=Decimal(1), account_code="999")
        items[5] = (draft(bad_key, lines=(bad_line,)), items[5][1])
        r.emulator.faults.add(Fault(kind="status", status=422, method="PUT", path_contains="/Invoices"))
        results = await r.connector.create_invoices(items)
        assert isinstance(results[bad_key], XeroRejected)
        assert len([v for v in results.values() if not isinstance(v, SyncdError)]) == 7
        assert len(r.emulator.invoices()) == 7


def big_draft(key: str) -> InvoiceDraft:
    """A draft of about 90 kB: 20 lines with 4,000-character descriptions (Xero's LineItem.Description limit)."""
    line = InvoiceLine(
        description="D" * 4000, quantity=Decimal(1), unit_price=Decimal(10), account_code="200", tax_type="OUTPUT"
    )
    return draft(key, lines=(line,) * 20)


async def test_a_batch_over_three_and_a_half_megabytes_is_split_before_sending() -> None:
    """50 drafts of ~90 kB each (~4.5 MB) go in two requests, each within 3.5 MB; none is refused with 413."""
    async with rig() as r:
        contact_id = await r.connector.upsert_customer(client_record())
        items = [(big_draft(key), contact_id) for key in keys(50)]
        results = ok(await r.connector.create_invoices(items))
        assert len(results) == 50
        sizes = [len(q.content) for q, _ in puts(r)]
        assert len(sizes) == 2
        assert sum(sizes) > REQUEST_MAX_BYTES
        assert all(size <= REQUEST_MAX_BYTES for size in sizes)
        assert [a.status_code for _, a in puts(r)] == [200, 200]
        assert len(r.emulator.invoices()) == 50


async def test_a_body_over_the_limit_is_refused_413_then_looked_up_and_split() -> None:
    """Without the connector's size cap the emulator answers 413 and stores nothing; lookup and halves then succeed."""
    async with rig() as r:
        contact_id = await r.connector.upsert_customer(client_record())
        items = [(big_draft(key), contact_id) for key in keys(50)]
        r.connector.request_max_bytes = 10**9
        results = ok(await r.connector.create_invoices(items))
        assert [a.status_code for _, a in puts(r)] == [413, 200, 200]
        clauses = [f"Reference.Contains({where_literal(stamp(d.key))})" for d, _ in items]
        assert r.emulator.calls["getInvoices"] == len(or_filters(clauses, guard="Reference!=null"))
        assert len(results) == len(r.emulator.invoices()) == 50


async def test_the_count_cap_cuts_a_batch_into_requests_of_batch_max() -> None:
    """More drafts than batch_max (Xero's recommended 50) go in several requests of at most batch_max."""
    async with rig() as r:
        items = await drafts_for(r, 7)
        r.connector.batch_max = 3
        ok(await r.connector.create_invoices(items))
        assert [len(load_json(q.content)["Invoices"]) for q, _ in puts(r)] == [3, 3, 1]


async def test_invoices_and_credit_notes_mixed_go_in_one_request_each() -> None:
    """A mix of invoice and credit-note drafts costs one PUT /Invoices and one PUT /CreditNotes."""
    async with rig() as r:
        items = await drafts_for(r, 6)
        items = [
            (d.model_copy(update={"kind": DraftKind.CREDIT_NOTE}) if i % 2 else d, c) for i, (d, c) in enumerate(items)
        ]
        results = ok(await r.connector.create_invoices(items))
        assert r.emulator.calls["createInvoices"] == 1
        assert r.emulator.calls["createCreditNotes"] == 1
        assert sorted(s.kind for s in results.values()) == ["credit_note"] * 3 + ["invoice"] * 3
        assert len(r.emulator.invoices()) == len(r.emulator.credit_notes()) == 3


async def test_a_batch_of_one_is_the_single_path() -> None:
    """One draft goes exactly as create_invoice sends it: Idempotency-Key = its key, no summarizeErrors."""
    async with rig() as r:
        items = await drafts_for(r, 1)
        ok(await r.connector.create_invoices(items))
        ((request, _),) = puts(r)
        assert request.headers["Idempotency-Key"] == items[0][0].key
        assert "summarizeErrors" not in request.url.query.decode()


async def test_approved_invoices_that_ask_for_it_are_emailed_one_call_each() -> None:
    """Each created AUTHORISED invoice with send=True is emailed by its own call and reported SENT."""
    async with rig() as r:
        items = await drafts_for(r, 3, send=True)
        results = ok(await r.connector.create_invoices(items))
        assert r.emulator.calls["createInvoices"] == 1
        assert r.emulator.calls["emailInvoice"] == 3
        assert {s.state for s in results.values()} == {InvoiceState.SENT}


async def test_invoices_found_after_every_answer_was_lost_are_still_emailed() -> None:
    """A batch of send=True invoices whose answers are all lost: found by their keys, each is emailed once."""
    async with rig() as r:
        items = await drafts_for(r, 3, send=True)
        r.emulator.faults.add(Fault(kind="drop_response", method="PUT", path_contains="/Invoices", times=None))
        results = ok(await r.connector.create_invoices(items))
        assert r.emulator.calls["getInvoices"] == 1
        assert sorted(r.emulator.emails) == sorted(i["InvoiceID"] for i in r.emulator.invoices())
        assert len(r.emulator.emails) == 3
        assert {s.state for s in results.values()} == {InvoiceState.SENT}


async def test_the_same_batch_twice_is_replayed_by_xero() -> None:
    """The same batch sent twice within the key's window gets Xero's first answer: still 16 invoices."""
    async with rig() as r:
        items = await drafts_for(r, 16)
        first = ok(await r.connector.create_invoices(items))
        second = ok(await r.connector.create_invoices(list(reversed(items))))
        assert {k: s.invoice_id for k, s in first.items()} == {k: s.invoice_id for k, s in second.items()}
        assert len(r.emulator.invoices()) == 16


# ---------------------------------------------------------------------------
# find_invoices
# ---------------------------------------------------------------------------


async def test_find_invoices_returns_the_stamped_documents_of_one_kind_in_one_call() -> None:
    """find_invoices answers the keys found among documents of the asked kind, in one GET; others are absent."""
    async with rig() as r:
        items = await drafts_for(r, 4)
        note_key = items[3][0].key
        items[3] = (items[3][0].model_copy(update={"kind": DraftKind.CREDIT_NOTE}), items[3][1])
        created = ok(await r.connector.create_invoices(items))
        wanted = [d.key for d, _ in items] + ["f" * 32]
        found = await r.connector.find_invoices(wanted, kind=DraftKind.INVOICE)
        assert r.emulator.calls["getInvoices"] == 1
        assert found == {k: created[k] for k in wanted[:3]}
        notes = await r.connector.find_invoices(wanted, kind=DraftKind.CREDIT_NOTE)
        assert notes == {note_key: created[note_key]}
        assert r.emulator.calls["getCreditNotes"] == 1


async def test_a_key_that_is_a_prefix_of_another_does_not_match_it() -> None:
    """Reference.Contains("syncd:k") also matches syncd:k2; only the exact stamp counts."""
    async with rig() as r:
        contact_id = await r.connector.upsert_customer(client_record())
        long_key = KEY_PREFIX + "2"
        ok(await r.connector.create_invoices([(draft(long_key), contact_id), (draft("other-key-1"), contact_id)]))
        assert await r.connector.find_invoices([KEY_PREFIX], kind=DraftKind.INVOICE) == {}


KEY_PREFIX = "prefix-key-0123456789abcdef"


async def test_many_keys_are_looked_up_in_filters_within_the_length_cap() -> None:
    """60 keys are looked up in as many GETs as the where filters they need, each within WHERE_MAX_CHARS."""
    async with rig() as r:
        items = await drafts_for(r, 60)
        created = ok(await r.connector.create_invoices(items))
        before = len(r.exchanges)
        found = await r.connector.find_invoices([d.key for d, _ in items], kind=DraftKind.INVOICE)
        assert found == created
        wheres = [parse_qs(q.url.query.decode())["where"][0] for q, _ in r.exchanges[before:]]
        clauses = [f"Reference.Contains({where_literal(stamp(d.key))})" for d, _ in items]
        assert wheres == or_filters(clauses, guard="Reference!=null")
        assert len(wheres) > 1
        assert all(len(quote(w, safe="")) <= WHERE_MAX_CHARS for w in wheres)


def test_the_emulator_reads_ored_stamps_behind_the_null_check() -> None:
    """The emulator's where grammar takes guard&&(a||b) and skips documents without a Reference."""
    predicate = compile_where('Reference!=null&&(Reference.Contains("syncd:a")||Reference.Contains("syncd:b"))')
    assert predicate({"Reference": "PO 1 · syncd:b"})
    assert not predicate({"Reference": "syncd:c"})
    assert not predicate({"Reference": None})


# ---------------------------------------------------------------------------
# upsert_customers
# ---------------------------------------------------------------------------


async def test_upsert_customers_finds_adopts_and_creates_in_a_constant_number_of_calls() -> None:
    """Existing, unstamped same-name and new clients cost 2 GETs, 1 PUT and 1 adoption; a name clash fails alone."""
    async with rig() as r:
        existing = client_record("hubspot:company:1", "Acme Pty Ltd")
        stamped = r.emulator.seed_contact("Acme Pty Ltd", contact_number=contact_number(existing.key))
        unstamped_client = client_record("hubspot:company:2", "Globex Corporation")
        unstamped = r.emulator.seed_contact("Globex Corporation")
        clashing = client_record("hubspot:company:3", "Initech LLC")
        other = r.emulator.seed_contact("Initech LLC", contact_number="someone-else")
        new = [client_record(f"hubspot:company:{n}", f"New Client {n}") for n in range(10, 16)]
        results = await r.connector.upsert_customers([existing, unstamped_client, clashing, *new])
        assert results[existing.key] == stamped["ContactID"]
        assert results[unstamped_client.key] == unstamped["ContactID"]
        error = results[clashing.key]
        assert isinstance(error, FatalError)
        assert other["ContactID"] in str(error)
        assert "must be unique among active contacts" in str(error)
        created = {c["ContactNumber"]: c["ContactID"] for c in r.emulator.contacts()}
        for client in new:
            assert results[client.key] == created[contact_number(client.key)]
        assert r.emulator.calls["getContacts"] == 2  # the 9 numbers, then the 2 names the PUT refused
        assert r.emulator.calls["updateContact"] == 1
        assert r.emulator.calls["createContacts"] == 1
        adopted = next(c for c in r.emulator.contacts() if c["ContactID"] == unstamped["ContactID"])
        assert adopted["ContactNumber"] == unstamped_client.key


def retainer_clients(count: int) -> list[Client]:
    """Clients as bench/monthstart.py makes them: the engine's keys for its HubSpot companies
    (company, contact and deal per client, HubSpot emulator ids from 1001), its legal names."""
    return [client_record(f"hubspot:company:{1001 + 3 * n}", f"Retainer client {n} LLC") for n in range(count)]


def contact_wheres(r: Rig) -> list[str]:
    return [
        parse_qs(q.url.query.decode())["where"][0]
        for q, _ in r.exchanges
        if q.method == "GET" and q.url.path == API + "/Contacts"
    ]


async def test_fifty_new_clients_cost_two_gets_and_one_put() -> None:
    """50 new clients of the month-start benchmark: one chain of 2 filters ORing their numbers, then 1 PUT; no name read."""
    async with rig() as r:
        clients = retainer_clients(BATCH_MAX)
        results = ok(await r.connector.upsert_customers(clients))
        assert r.emulator.calls["getContacts"] == 2
        assert r.emulator.calls["createContacts"] == 1
        assert r.emulator.calls["updateContact"] == 0
        created = {c["ContactNumber"]: c["ContactID"] for c in r.emulator.contacts()}
        assert results == {client.key: created[contact_number(client.key)] for client in clients}
        wheres = contact_wheres(r)
        numbers = sorted(contact_number(client.key) for client in clients)
        assert wheres == or_filters([f"ContactNumber=={where_literal(number)}" for number in numbers])
        assert all(len(quote(w, safe="")) <= WHERE_MAX_CHARS for w in wheres)


async def test_a_lone_client_is_looked_up_by_number_in_one_get() -> None:
    """upsert_customer of a new client: one GET by its ContactNumber, then the PUT."""
    async with rig() as r:
        client = client_record()
        await r.connector.upsert_customer(client)
        assert contact_wheres(r) == [f"ContactNumber=={where_literal(client.key)}"]
        assert r.emulator.calls["getContacts"] == 1
        assert r.emulator.calls["createContacts"] == 1


async def test_a_contact_stamped_for_one_client_is_not_adopted_for_another_of_its_name() -> None:
    """A and B share a name; the contact stamped for A is A's by number, and refuses B's PUT by name: B's clash."""
    async with rig() as r:
        a = client_record("hubspot:company:a", "Shared Name LLC")
        b = client_record("hubspot:company:b", "Shared Name LLC")
        stamped = r.emulator.seed_contact("Shared Name LLC", contact_number=contact_number(a.key))
        results = await r.connector.upsert_customers([b, a])
        assert results[a.key] == stamped["ContactID"]
        error = results[b.key]
        assert isinstance(error, FatalError)
        assert error.place == "client.legal_name"
        assert stamped["ContactID"] in str(error)
        assert [(c["ContactID"], c["ContactNumber"]) for c in r.emulator.contacts()] == [(stamped["ContactID"], a.key)]
        assert r.emulator.calls["getContacts"] == 2  # the numbers, then B's name after the PUT's refusal
        assert r.emulator.calls["createContacts"] == 1
        assert r.emulator.calls["updateContact"] == 0


async def test_a_renamed_client_is_found_by_its_number_not_by_its_new_name() -> None:
    """The client's contact, stamped but under its old name, is the client's; an unstamped one with the new name is left."""
    async with rig() as r:
        renamed = client_record("hubspot:company:1", "New Name LLC")
        own = r.emulator.seed_contact("Old Name LLC", contact_number=contact_number(renamed.key))
        namesake = r.emulator.seed_contact("New Name LLC")
        new = client_record("hubspot:company:2", "Brand New LLC")
        results = ok(await r.connector.upsert_customers([renamed, new]))
        assert results[renamed.key] == own["ContactID"]
        assert results[new.key] not in (own["ContactID"], namesake["ContactID"])
        contacts = {c["ContactID"]: c for c in r.emulator.contacts()}
        assert contacts[own["ContactID"]]["Name"] == "Old Name LLC"
        assert "ContactNumber" not in contacts[namesake["ContactID"]]
        assert r.emulator.calls["getContacts"] == 1
        assert r.emulator.calls["updateContact"] == 0
        assert r.emulator.calls["createContacts"] == 1


def test_the_emulator_ors_clauses_on_different_fields() -> None:
    """ContactNumber=="x"||Name=="y" matches either side; a contact without a ContactNumber is not an error."""
    for text in ('ContactNumber=="x"||Name=="y"', 'ContactNumber=="x" OR Name=="y"'):
        predicate = compile_where(text)
        assert predicate({"ContactNumber": "x", "Name": "Other"})
        assert predicate({"Name": "y"})
        assert not predicate({"ContactNumber": "z", "Name": "Other"})
        assert not predicate({"Name": "Other"})


async def test_upsert_customers_of_known_clients_costs_one_call() -> None:
    """Clients already stamped at Xero are found by one GET ORing their ContactNumbers and names; nothing is written."""
    async with rig() as r:
        clients = [client_record(f"hubspot:company:{n}", f"Client {n}") for n in range(20)]
        first = await r.connector.upsert_customers(clients)
        calls = dict(r.emulator.calls)
        again = await r.connector.upsert_customers(clients)
        assert again == first
        assert r.emulator.calls["getContacts"] - calls["getContacts"] == 1
        assert r.emulator.calls["createContacts"] == calls["createContacts"] == 1


async def test_two_new_clients_with_one_name_create_one_contact_and_fail_the_other() -> None:
    """Two new clients sharing a legal name: Xero keeps names unique, so the second fails alone with the clash."""
    async with rig() as r:
        a, b = client_record("hubspot:company:a", "Same Name"), client_record("hubspot:company:b", "Same Name")
        results = await r.connector.upsert_customers([a, b])
        assert isinstance(results[a.key], str)
        assert isinstance(results[b.key], FatalError)
        assert len(r.emulator.contacts()) == 1


async def test_upsert_customer_still_raises_the_clash_for_one_client() -> None:
    """The single path shares the batch code and still raises the clash as a FatalError naming the field."""
    async with rig() as r:
        r.emulator.seed_contact("Northwind Traders LLC", contact_number="another-client")
        with pytest.raises(FatalError) as caught:
            await r.connector.upsert_customer(client_record())
        assert caught.value.place == "client.legal_name"


def contact_puts(r: Rig) -> list[list[str]]:
    """The names each PUT /Contacts carried, in order."""
    return [[c["Name"] for c in load_json(q.content)["Contacts"]] for q, _ in puts(r, "/Contacts")]


async def test_a_mixed_batch_reads_names_only_for_the_clients_whose_put_was_refused() -> None:
    """A new client, one with a hand-made unstamped namesake (adopted, no duplicate) and one whose name a contact
    stamped for another client holds (FatalError): GET numbers, PUT all three, GET the two refused names, POST one."""
    async with rig() as r:
        new = client_record("hubspot:company:10", "Fresh Client LLC")
        hand = client_record("hubspot:company:11", "Hand Made LLC")
        hand_made = r.emulator.seed_contact("Hand Made LLC")
        taken = client_record("hubspot:company:12", "Taken Name LLC")
        other = r.emulator.seed_contact("Taken Name LLC", contact_number="hubspot:company:99")
        results = await r.connector.upsert_customers([new, hand, taken])
        assert results[hand.key] == hand_made["ContactID"]
        error = results[taken.key]
        assert isinstance(error, FatalError)
        assert error.place == "client.legal_name"
        assert other["ContactID"] in str(error)
        contacts = {c["Name"]: c for c in r.emulator.contacts()}
        assert len(r.emulator.contacts()) == 3  # the two seeded and the new client's: no duplicate
        assert results[new.key] == contacts["Fresh Client LLC"]["ContactID"]
        assert contacts["Hand Made LLC"]["ContactNumber"] == hand.key
        assert contacts["Taken Name LLC"]["ContactNumber"] == "hubspot:company:99"
        assert contact_wheres(r) == [
            or_filters([f"ContactNumber=={where_literal(c.key)}" for c in (new, hand, taken)])[0],
            'Name=="Hand Made LLC"||Name=="Taken Name LLC"',
        ]
        assert contact_puts(r) == [["Fresh Client LLC", "Hand Made LLC", "Taken Name LLC"]]
        calls = r.emulator.calls
        assert (calls["getContacts"], calls["createContacts"], calls["updateContact"]) == (2, 1, 1)


async def test_one_unstamped_namesake_is_adopted_once_and_the_second_client_of_its_name_fails() -> None:
    """Two new clients named as one hand-made contact: the first adopts it; the second's error names it, now stamped."""
    async with rig() as r:
        first = client_record("hubspot:company:1", "Twin Name LLC")
        second = client_record("hubspot:company:2", "Twin Name LLC")
        hand_made = r.emulator.seed_contact("Twin Name LLC")
        results = await r.connector.upsert_customers([first, second])
        assert results[first.key] == hand_made["ContactID"]
        error = results[second.key]
        assert isinstance(error, FatalError)
        assert f"{hand_made['ContactID']} (ContactNumber {first.key!r})" in str(error)
        assert [(c["ContactID"], c["ContactNumber"]) for c in r.emulator.contacts()] == [
            (hand_made["ContactID"], first.key)
        ]
        calls = r.emulator.calls
        assert (calls["getContacts"], calls["createContacts"], calls["updateContact"]) == (2, 1, 1)


async def test_a_name_clash_in_the_halves_resent_after_a_refused_put_is_still_settled_by_name() -> None:
    """A PUT /Contacts refused as a whole is looked up by number and resent in halves; the elements those
    halves get refused for their name are still adopted or reported, after one GET of their names."""
    async with rig() as r:
        fresh = [client_record(f"hubspot:company:{n}", f"Fresh {n} LLC") for n in (1, 2)]
        hand = client_record("hubspot:company:3", "Hand Made LLC")
        hand_made = r.emulator.seed_contact("Hand Made LLC")
        taken = client_record("hubspot:company:4", "Taken Name LLC")
        other = r.emulator.seed_contact("Taken Name LLC", contact_number="hubspot:company:99")
        r.emulator.faults.add(Fault(kind="status", status=400, method="PUT", path_contains="/Contacts"))
        results = await r.connector.upsert_customers([*fresh, hand, taken])
        assert [a.status_code for _, a in puts(r, "/Contacts")] == [400, 200, 200]
        assert contact_puts(r) == [
            ["Fresh 1 LLC", "Fresh 2 LLC", "Hand Made LLC", "Taken Name LLC"],
            ["Fresh 1 LLC", "Fresh 2 LLC"],
            ["Hand Made LLC", "Taken Name LLC"],
        ]
        assert results[hand.key] == hand_made["ContactID"]
        error = results[taken.key]
        assert isinstance(error, FatalError)
        assert other["ContactID"] in str(error)
        created = {c["ContactNumber"]: c["ContactID"] for c in r.emulator.contacts()}
        assert all(results[c.key] == created[c.key] for c in fresh)
        assert len(r.emulator.contacts()) == 4
        numbers = or_filters([f"ContactNumber=={where_literal(c.key)}" for c in (*fresh, hand, taken)])[0]
        assert contact_wheres(r) == [numbers, numbers, 'Name=="Hand Made LLC"||Name=="Taken Name LLC"']
        assert r.emulator.calls["updateContact"] == 1


async def test_a_lone_contact_refused_as_a_whole_for_its_name_is_adopted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lone PUT /Contacts answered 400 ValidationException with the name clash (the spec's example on
    PUT /Contacts, as Xero answers without summarizeErrors=false) still leads to the adoption."""
    monkeypatch.setattr("connectors.xero.emulator._summarized", lambda request: True)
    async with rig() as r:
        hand_made = r.emulator.seed_contact("Northwind Traders LLC")
        assert await r.connector.upsert_customer(client_record()) == hand_made["ContactID"]
        assert [a.status_code for _, a in puts(r, "/Contacts")] == [400]
        (contact,) = r.emulator.contacts()
        assert contact["ContactNumber"] == "hubspot:company:42"
        calls = r.emulator.calls
        assert (calls["getContacts"], calls["createContacts"], calls["updateContact"]) == (2, 1, 1)


async def test_customers_details_reads_many_contacts_in_one_call() -> None:
    """customers_details answers each id as customer_details does, archived ones too, in one GET; unknown is NotFound."""
    async with rig() as r:
        ids = await r.connector.upsert_customers(
            [client_record(f"hubspot:company:{n}", f"Client {n}") for n in range(3)]
        )
        archived = r.emulator.seed_contact("Old Client", status="ARCHIVED")["ContactID"]
        unknown = "6f1c2e0a-0000-4000-8000-000000000000"
        wanted = [str(ids[f"hubspot:company:{n}"]) for n in range(3)] + [archived, unknown]
        before = r.emulator.calls["getContacts"]
        details = await r.connector.customers_details(wanted)
        assert r.emulator.calls["getContacts"] - before == 1
        for ident in wanted[:3]:
            assert details[ident] == await r.connector.customer_details(ident)
        assert details[archived] == await r.connector.customer_details(archived)
        assert isinstance(details[unknown], NotFound)


async def test_customers_details_reads_forty_ids_a_call() -> None:
    """More ids than IDS_PER_READ are read in several calls of at most that many."""
    async with rig() as r:
        ids = [r.emulator.seed_contact(f"Seeded {n}")["ContactID"] for n in range(IDS_PER_READ + 5)]
        details = await r.connector.customers_details(ids)
        assert r.emulator.calls["getContacts"] == 2
        assert {d["legal_name"] for d in details.values() if not isinstance(d, SyncdError)} == {
            f"Seeded {n}" for n in range(IDS_PER_READ + 5)
        }


# ---------------------------------------------------------------------------
# The emulator's batch contract
# ---------------------------------------------------------------------------


def invoice_body(contact_id: str, *codes: str) -> dict[str, Any]:
    return {
        "Invoices": [
            {
                "Type": "ACCREC",
                "Contact": {"ContactID": contact_id},
                "Date": "2025-03-03",
                "DueDate": "2025-03-17",
                "Status": "AUTHORISED",
                "Reference": f"ref-{n}",
                "LineItems": [{"Description": "x", "Quantity": 1, "UnitAmount": 10, "AccountCode": code}],
            }
            for n, code in enumerate(codes)
        ]
    }


async def put_invoices(connector: XeroConnector, body: Any, query: str, key: str) -> httpx.Response:
    headers = {"Content-Type": "application/json", "Idempotency-Key": key}
    http = connector.http
    return await http.client.request(
        "PUT",
        f"{http.base_url}/Invoices{query}",
        content=body if isinstance(body, bytes) else dump_json(body),
        headers={**http.headers, **headers},
        auth=http.auth,
    )


async def test_without_summarize_errors_false_a_bad_element_makes_a_400_but_the_good_ones_are_stored() -> None:
    """summarizeErrors defaults to true: one bad element answers 400 for the request, the good ones are created."""
    async with rig() as r:
        contact_id = await r.connector.upsert_customer(client_record())
        answer = await put_invoices(r.connector, invoice_body(contact_id, "200", "999", "200"), "", "summarized-1")
        assert answer.status_code == 400
        body = load_json(answer.content)
        assert body["Type"] == "ValidationException"
        assert [e["ValidationErrors"][0]["Message"] for e in body["Elements"]] == [
            "Account code '999' is not a valid code for this document."
        ]
        assert len(r.emulator.invoices()) == 2
        again = await put_invoices(r.connector, invoice_body(contact_id, "200", "999", "200"), "", "summarized-1")
        assert (again.status_code, again.content) == (400, answer.content)
        assert len(r.emulator.invoices()) == 2


async def test_the_emulator_refuses_a_body_over_three_and_a_half_megabytes_with_413() -> None:
    """A PUT body over 3,500,000 bytes is refused 413 before anything is stored."""
    async with rig() as r:
        contact_id = await r.connector.upsert_customer(client_record())
        body = invoice_body(contact_id, "200")
        body["Invoices"][0]["LineItems"][0]["Description"] = "x" * REQUEST_MAX_BYTES
        answer = await put_invoices(r.connector, body, "?summarizeErrors=false", "too-big")
        assert answer.status_code == 413
        assert r.emulator.invoices() == []
