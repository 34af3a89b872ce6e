"""The Xero connector: the :class:`~syncd.core.interfaces.Invoicing` role on Xero's Accounting API.

Customers are Xero contacts stamped with syncd's client key in ``ContactNumber``;
invoices are ``ACCREC`` invoices (credit notes ``ACCRECCREDIT``) created with the
``Idempotency-Key`` header and stamped ``syncd:<key>`` in ``Reference``, so a lost answer
is resolved by :meth:`XeroConnector.find_invoice`, never by creating again. Many
customers and documents go in few requests through the
:class:`~syncd.core.interfaces.CreatesInvoicesInBatches` methods (caps, batch keys and
per-element answers: :mod:`connectors.xero.batches`); the one-record methods share their code.

Sources (Xero developer documentation):

* Endpoints, parameters and schemas: ``specs/xero/xero_accounting.yaml``
  (server ``https://api.xero.com/api.xro/2.0``).
* Rate limits, 60 calls/minute and 5 concurrent per organisation, 429 on breach:
  https://developer.xero.com/faq/limits
* ``Accept: application/json`` (Xero answers XML otherwise) and the ``xero-tenant-id``
  header: https://developer.xero.com/documentation/api/accounting/requests-and-responses
  and spec ``components.parameters.requiredHeader``; custom connections need no tenant
  header: https://developer.xero.com/faq/custom-integration
* Codes for the drift guard: ``GET /Accounts`` (``Account.Code``, ``Status``
  ACTIVE/ARCHIVED/DELETED), ``GET /TaxRates`` (``TaxRate.TaxType``, ``Status``
  ACTIVE/DELETED/ARCHIVED/PENDING), ``GET /Currencies`` (``Currency.Code``) and
  ``GET /TrackingCategories`` (``Name`` and ``Options[].Name``, as ``Category/Option``): spec
  ``components.schemas.Account``, ``TaxRate``, ``Currency`` and ``TrackingCategory``. Item codes (``GET /Items``)
  are not read: the emulator does not serve Items, so they could not be tested.
* Idempotency: spec ``components.parameters.idempotencyKey`` ("safely retry requests
  without the risk of duplicate processing. 128 character max") and
  https://developer.xero.com/documentation/guides/idempotent-requests/idempotency/
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, ClassVar

import structlog

from connectors.xero.auth import (
    ClientCredentials,
    StaticToken,
    TenantDiscovery,
    XeroAuth,
    XeroCodeFlow,
    XeroErrors,
    refreshing_tokens,
    request_token,
    token_valid,
)
from connectors.xero.batches import (
    BATCH_MAX,
    REQUEST_MAX_BYTES,
    XeroElementResult,
    batch_key,
    elements,
    or_filters,
    packed,
)
from connectors.xero.models import (
    CONTACT_FIELDS,
    XeroContact,
    XeroContacts,
    XeroCreditNote,
    XeroCreditNotes,
    XeroInvoice,
    XeroInvoices,
    XeroOrganisations,
    XeroPagination,
    XeroRejected,
    allocation_payload,
    contact_details,
    contact_number,
    contact_payload,
    credit_note_payload,
    credit_note_state,
    credit_note_status,
    dump_json,
    invoice_payload,
    invoice_status,
    load_json,
    stamp,
    stamped_key,
    where_literal,
)
from connectors.xero.settings import API_PATH, XeroSettings
from connectors.xero.webhooks import XeroWebhookVerifier
from syncd.core.errors import AuthError, FatalError, NotFound, RetriableError, SyncdError
from syncd.core.interfaces import (
    AllocatesCredit,
    Allocation,
    Capability,
    ChangeHint,
    ChangePage,
    Client,
    CodeKind,
    CreatesInvoicesInBatches,
    CreditNoteStatus,
    DraftKind,
    HasLockDates,
    InvoiceDraft,
    InvoiceState,
    InvoiceStatus,
    Invoicing,
    InvoicingCodes,
    LockDates,
    ReadsCreditNotes,
    ReadsCustomersInBatches,
)
from syncd.plumbing.http import RateLimit, Rejected, VendorHttp, within
from syncd.plumbing.registry import ConnectorContext, ConnectorSpec
from syncd.plumbing.tokens import RotatingTokens

log = structlog.get_logger("connectors.xero")

CREDENTIAL_PROBE = "syncd-credential-check"  # a refresh token that cannot exist (see XeroConnector._client_refused)
PAGE_SIZE = 100  # "Up to 100 invoices will be returned in a single API call" (spec GET /Invoices ``page``)
# App-wide limit, used only when the per-minute limit is switched off but concurrency is
# not: "App Minute Limit: 10,000 calls per minute" (https://developer.xero.com/faq/limits).
APP_MINUTE_LIMIT = 10_000
# ContactIDs per ``GET /Contacts?IDs=...``: 40 GUIDs of 36 characters and their encoded
# commas keep the query under connectors.xero.batches.WHERE_MAX_CHARS (1,800).
IDS_PER_READ = 40

# Statuses whose codes can no longer be used on a new invoice (spec Account.Status, TaxRate.Status).
RETIRED_STATUSES = frozenset({"ARCHIVED", "DELETED"})


def _limits(settings: XeroSettings) -> list[RateLimit]:
    """Xero's per-minute and concurrent limits (``None`` or 0 switches either off)."""
    per_minute = settings.rate_limit_per_min or (APP_MINUTE_LIMIT if settings.max_concurrent else None)
    return within(per_minute, 60, concurrency=settings.max_concurrent or None)


def _headers(settings: XeroSettings) -> dict[str, str]:
    headers = {"Accept": "application/json"}
    if settings.tenant_id:
        headers["Xero-tenant-id"] = settings.tenant_id
    return headers


def _content_key(prefix: str, body: Mapping[str, Any]) -> str:
    """An idempotency key for a write without a billing key: a hash of its body."""
    return f"syncd-{prefix}-" + hashlib.sha256(dump_json(body)).hexdigest()[:48]


def _is_name_clash(messages: tuple[str, ...]) -> bool:
    """Whether Xero refused a new contact because an active contact already has its name.

    Xero's message, from the spec's 400 example on ``PUT /Contacts``: "The contact name …
    is already assigned to another contact. The contact name must be unique across all
    active contacts." :meth:`XeroConnector.upsert_customers` relies on this refusal to
    look names up only for the clients it hits.
    """
    return any("contact name" in message and "already assigned to another contact" in message for message in messages)


@dataclass(frozen=True, kw_only=True)
class _DocumentKind:
    """What differs between creating invoices and credit notes at Xero."""

    name: str
    draft_kind: DraftKind
    path: str
    collection: str
    payload: Callable[[InvoiceDraft, str, int | None], dict[str, Any]]
    read: Callable[[Mapping[str, Any]], InvoiceStatus]

    def status(self, raw: Mapping[str, Any]) -> InvoiceStatus:
        """The canonical status of one element of an answer."""
        return self.read(raw)


_KINDS: Mapping[DraftKind, _DocumentKind] = {
    DraftKind.INVOICE: _DocumentKind(
        name="invoice",
        draft_kind=DraftKind.INVOICE,
        path="/Invoices",
        collection="Invoices",
        payload=invoice_payload,
        read=lambda raw: invoice_status(XeroInvoice.model_validate(raw)),
    ),
    DraftKind.CREDIT_NOTE: _DocumentKind(
        name="credit_note",
        draft_kind=DraftKind.CREDIT_NOTE,
        path="/CreditNotes",
        collection="CreditNotes",
        payload=credit_note_payload,
        read=lambda raw: credit_note_status(XeroCreditNote.model_validate(raw)),
    ),
}


def _by_member(answers: list[Mapping[str, Any]], keys: list[str]) -> dict[str, Mapping[str, Any]]:
    """Each member's element of a batch answer, by the stamp in its ``Reference``, else by position.

    Xero answers the elements in the order sent; the stamp is checked so that an answer
    in another order is still read right.
    """
    by_stamp = {stamped_key(str(raw.get("Reference") or "")): raw for raw in answers}
    if all(key in by_stamp for key in keys):
        return {key: by_stamp[key] for key in keys}
    return dict(zip(keys, answers, strict=False))


def _contact_refused(client: Client, same_name: list[XeroContact], messages: Sequence[str]) -> SyncdError:
    """The error of a contact Xero refused: a name clash says what to do; anything else quotes Xero."""
    if _is_name_clash(tuple(messages)):
        taken = ", ".join(f"{c.contact_id} (ContactNumber {c.contact_number!r})" for c in same_name) or "?"
        return FatalError(
            f"xero: cannot create a contact for client {client.key}: the name {client.legal_name!r} "
            f"belongs to contact {taken}, stamped for another client, and Xero contact names must be "
            "unique among active contacts; rename one of them in Xero, or clear that contact's "
            "ContactNumber so syncd adopts it",
            place="client.legal_name",
        )
    return XeroRejected(
        f"xero: PUT /Contacts refused the contact of client {client.key}: " + "; ".join(messages),
        status=400,
        messages=messages,
        place="client",
    )


@dataclass
class _ContactsPut:
    """What ``PUT /Contacts`` made of the clients sent.

    Attributes:
        results: per client key, its new ContactID or its error.
        clashes: the clients refused because their name is taken, with Xero's messages:
            left to :meth:`XeroConnector._settle_clashes`.
    """

    results: dict[str, str | SyncdError] = field(default_factory=dict)
    clashes: list[tuple[Client, tuple[str, ...]]] = field(default_factory=list)

    def refused(self, client: Client, messages: tuple[str, ...], error: SyncdError) -> None:
        """Record a refusal: a name clash is kept for adoption, anything else is ``error``."""
        if _is_name_clash(messages):
            self.clashes.append((client, messages))
        else:
            self.results[client.key] = error

    def merge(self, other: _ContactsPut) -> None:
        """Add another request's outcome."""
        self.results.update(other.results)
        self.clashes += other.clashes


class XeroConnector:
    """One Xero connection, playing the :class:`~syncd.core.interfaces.Invoicing` role.

    Args:
        settings: the connection's settings.
        ctx: the engine's context (HTTP factory, token store, clock).
    """

    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {
            Capability.IDEMPOTENCY_KEYS,
            Capability.CREDIT_NOTES,
            Capability.SEND_INVOICE,
            Capability.WEBHOOKS,
            Capability.CREDIT_ALLOCATION,
            Capability.LOCK_DATES,
        }
    )

    def __init__(self, settings: XeroSettings, ctx: ConnectorContext) -> None:
        self.settings = settings
        self.ctx = ctx
        tenants: TenantDiscovery | None = None
        if settings.grant == "client_credentials":
            self.tokens: ClientCredentials | RotatingTokens = ClientCredentials(
                settings, ctx.client, ctx.tokens, ctx.clock, on_failure=ctx.token_refresh_failed
            )
        else:
            self.tokens = refreshing_tokens(
                settings, ctx.client, ctx.tokens, ctx.clock, ctx.connection, on_failure=ctx.token_refresh_failed
            )
            tenants = None if settings.tenant_id else TenantDiscovery(settings, ctx.client, ctx.connection)
        self.api_url = settings.base_url.rstrip("/") + API_PATH
        self.page_size = PAGE_SIZE
        self.batch_max = BATCH_MAX  # elements per batch write (Xero's recommendation, connectors.xero.batches)
        self.request_max_bytes = REQUEST_MAX_BYTES  # body bytes per write (Xero's limit, connectors.xero.batches)
        self._short_code: str | None = None
        self.http: VendorHttp = ctx.make_http(
            base_url=self.api_url,
            auth=XeroAuth(self.tokens, tenants),
            headers=_headers(settings),
            limits=_limits(settings),
            errors=XeroErrors(ctx.connection, settings),
        )

    # -- plumbing -------------------------------------------------------------

    def _unitdp(self) -> dict[str, Any]:
        return {"unitdp": self.settings.unitdp} if self.settings.unitdp else {}

    async def _get(self, path: str, params: Mapping[str, Any] | None = None, **headers: str) -> Any:
        response = await self.http.request("GET", path, params=params, headers=headers or None)
        return load_json(response.content)

    async def _write(
        self, method: str, path: str, body: Mapping[str, Any], *, key: str, params: Mapping[str, Any] | None = None
    ) -> Any:
        """A PUT/POST with ``Idempotency-Key``: the shared retries are then safe."""
        headers = {"Content-Type": "application/json", "Idempotency-Key": key}
        response = await self.http.request(method, path, params=params, content=dump_json(body), headers=headers)
        return load_json(response.content) if response.content else None

    # -- customers ------------------------------------------------------------

    async def _contacts(self, where: str) -> tuple[XeroContact, ...]:
        return XeroContacts.model_validate(await self._get("/Contacts", {"where": where})).contacts

    async def _contacts_matching(self, field: str, values: Collection[str]) -> list[XeroContact]:
        """Contacts whose ``field`` equals one of ``values``: one ``GET /Contacts`` per filter of :func:`or_filters`.

        The filters OR the values, ``field=="a"||field=="b"||...``, chunked by length (the
        spec has no list parameter for ContactNumber or Name, only ``IDs`` for ContactIDs).
        ``||`` (or ``OR``) joins the clauses of a ``where`` filter
        (https://developer.xero.com/documentation/api/accounting/requests-and-responses).
        An ORed filter is not one of the optimised ones ("individually or combined with
        the AND operator", and ContactNumber is not among the fields:
        https://developer.xero.com/documentation/api/accounting/contacts, "Optimised use of
        the where filter"); its answer is small, far under the 100k contacts beyond which
        Xero refuses an unoptimised filter (same page). A contact matched by several
        filters is listed once.
        """
        found: dict[str, XeroContact] = {}
        for where in or_filters([f"{field}=={where_literal(value)}" for value in sorted(set(values))]):
            for contact in await self._contacts(where):
                found.setdefault(contact.contact_id, contact)
        return list(found.values())

    async def upsert_customer(self, client: Client) -> str:
        """Find the contact stamped with the client's key, else create or adopt it; its ContactID.

        The stamp is ``ContactNumber`` = the client key, or ``syncd-<sha256 prefix>``
        when the key is longer than Xero's 50 characters (:func:`contact_number`).
        A contact of the exact ``Name`` is adopted only if it has no ContactNumber.
        An existing contact is returned as it is (its details are not overwritten).
        The same steps as :meth:`upsert_customers`, for one client: a new client costs one
        ``GET /Contacts`` (``ContactNumber=="<number>"``) and one ``PUT /Contacts``; a
        contact made by hand under its name, one more ``GET`` (by name) and the adopting
        ``POST``.

        Raises:
            FatalError: the name belongs to a contact stamped for another client, or
                Xero refused the new contact (:class:`~connectors.xero.models.XeroRejected`).
        """
        result = (await self.upsert_customers([client]))[client.key]
        if isinstance(result, SyncdError):
            raise result
        return result

    async def upsert_customers(self, clients: Sequence[Client]) -> Mapping[str, str | SyncdError]:
        """Per ``client.key``, its ContactID (found, created or adopted as :meth:`upsert_customer`), or its error.

        A constant number of calls for any number of clients, in three steps:

        1. One chain of ``GET /Contacts`` ORing the clients' ContactNumbers
           (:meth:`_contacts_matching`; 2 GETs for 50 clients of the month-start
           benchmark): a contact whose ContactNumber is the client's is the client's,
           whatever its name.
        2. One ``PUT /Contacts?summarizeErrors=false`` creating all the others.
        3. Only if Xero refused some of them because their name is taken (Xero keeps
           contact names unique among active contacts, see :func:`_is_name_clash`): one
           chain of ``GET /Contacts`` ORing those names; a contact of the exact name and
           no ContactNumber (made by hand before syncd) is adopted with a
           ``POST /Contacts/{id}`` stamping it, each such contact once; a name held by a
           contact stamped for another client fails its client alone
           (:class:`~syncd.core.errors.FatalError`).

        So 50 new clients cost 2 GETs and 1 PUT, a lone new client 1 GET and 1 PUT, and a
        lone client whose contact was made by hand 1 GET, 1 refused PUT, 1 GET and 1 POST.
        Any other refusal of an element fails its client alone
        (:class:`~connectors.xero.models.XeroRejected`). An error of a whole request
        (auth, Xero down) is raised: every client fails alike.
        """
        unique = list({client.key: client for client in clients}.values())
        numbers = {client.key: contact_number(client.key) for client in unique}
        stamped = {c.contact_number: c for c in await self._contacts_matching("ContactNumber", numbers.values())}
        results: dict[str, str | SyncdError] = {}
        missing = []
        for client in unique:
            found = stamped.get(numbers[client.key])
            if found is not None:
                results[client.key] = found.contact_id
            else:
                missing.append(client)
        if not missing:
            return results
        put = await self._create_contacts(missing, numbers)
        results.update(put.results)
        if put.clashes:
            results.update(await self._settle_clashes(put.clashes, numbers))
        return results

    async def _settle_clashes(
        self, clashes: Sequence[tuple[Client, tuple[str, ...]]], numbers: Mapping[str, str]
    ) -> dict[str, str | SyncdError]:
        """Clients whose new contact Xero refused for its name: adopt the unstamped namesake, else the clash.

        One chain of ``GET /Contacts`` ORing their names. Per client, in order: a contact
        of that exact name stamped with the client's own number (created meanwhile, by an
        earlier attempt) is the client's; else an active one without a ContactNumber, not
        yet adopted for another client of the batch, is adopted; else the clash is the
        client's error, listing the contacts holding the name (:func:`_contact_refused`).
        """
        named = await self._contacts_matching("Name", {client.legal_name for client, _ in clashes})
        adopted: dict[str, str] = {}  # ContactID -> the ContactNumber it was stamped with here
        results: dict[str, str | SyncdError] = {}
        for client, messages in clashes:
            number = numbers[client.key]
            same_name = [c for c in named if c.name == client.legal_name]
            own = next((c for c in same_name if c.contact_number == number), None)
            if own is not None:
                results[client.key] = own.contact_id
                continue
            free = next(
                (
                    c
                    for c in same_name
                    if not c.contact_number
                    and (c.contact_status or "ACTIVE") == "ACTIVE"
                    and c.contact_id not in adopted
                ),
                None,
            )
            if free is None:
                holders = [
                    c.model_copy(update={"contact_number": adopted[c.contact_id]}) if c.contact_id in adopted else c
                    for c in same_name
                ]
                results[client.key] = _contact_refused(client, holders, messages)
                continue
            adopted[free.contact_id] = number
            try:
                results[client.key] = await self._adopt(free, number, client)
            except Rejected as exc:
                results[client.key] = exc
        return results

    async def _adopt(self, contact: XeroContact, number: str, client: Client) -> str:
        body = {"Contacts": [{"ContactID": contact.contact_id, "ContactNumber": number}]}
        await self._write("POST", f"/Contacts/{contact.contact_id}", body, key=_content_key("adopt", body))
        log.info("xero_contact_adopted", contact_id=contact.contact_id, client_key=client.key, contact_number=number)
        return contact.contact_id

    async def _create_contacts(self, wanted: Sequence[Client], numbers: Mapping[str, str]) -> _ContactsPut:
        """``PUT /Contacts?summarizeErrors=false`` with a new contact per client; what came of each.

        An element refused for a name clash is left to :meth:`_settle_clashes`; any other
        refused element is its client's :class:`~connectors.xero.models.XeroRejected`. A
        refusal of the whole request (no per-element answer) is looked up by ContactNumber
        and the rest sent again in halves (:meth:`_contacts_again`), so that a contact
        that was created is found, never refused as a clash with itself; a lone client
        refused as a whole for a name clash is left to :meth:`_settle_clashes` too.
        """
        body = {"Contacts": [contact_payload(client, numbers[client.key]) for client in wanted]}
        params = {"summarizeErrors": "false"}
        put = _ContactsPut()
        try:
            data = await self._write("PUT", "/Contacts", body, key=_content_key("contact", body), params=params)
        except Rejected as exc:
            if len(wanted) > 1:
                return await self._contacts_again(wanted, numbers)
            put.refused(wanted[0], exc.messages, exc)
            return put
        answers = elements(data, "Contacts")
        for client, raw in zip(wanted, answers, strict=False):
            outcome = XeroElementResult.model_validate(raw)
            if outcome.failed:
                put.refused(client, tuple(outcome.messages), _contact_refused(client, [], outcome.messages))
                continue
            created = XeroContact.model_validate(raw)
            log.info("xero_contact_created", contact_id=created.contact_id, client_key=client.key)
            put.results[client.key] = created.contact_id
        for client in wanted[len(answers) :]:
            put.results[client.key] = RetriableError(f"xero: PUT /Contacts gave no answer for client {client.key}")
        return put

    async def _contacts_again(self, wanted: Sequence[Client], numbers: Mapping[str, str]) -> _ContactsPut:
        """After a refused ``PUT /Contacts``: the clients' contacts found by ContactNumber, the rest sent in halves."""
        looked_up = await self._contacts_matching("ContactNumber", [numbers[client.key] for client in wanted])
        stamped = {c.contact_number: c for c in looked_up}
        put = _ContactsPut()
        missing = []
        for client in wanted:
            found = stamped.get(numbers[client.key])
            if found is not None:
                put.results[client.key] = found.contact_id
            else:
                missing.append(client)
        half = len(missing) // 2
        for part in (missing[:half], missing[half:]):
            if part:
                put.merge(await self._create_contacts(part, numbers))
        return put

    async def customer_details(self, customer_id: str) -> dict[str, str | None]:
        """``GET /Contacts/{ContactID}`` (spec ``getContact``), in ``Client.ledger_details`` form."""
        data = await self._get(f"/Contacts/{customer_id}")
        contacts = data.get("Contacts") or [] if isinstance(data, dict) else []
        if not contacts:
            raise NotFound(f"xero: no contact {customer_id}")
        return contact_details(contacts[0])

    async def customers_details(self, customer_ids: Sequence[str]) -> Mapping[str, dict[str, str | None] | SyncdError]:
        """Many contacts' details in :meth:`customer_details` form, by ContactID; an unknown id maps to NotFound.

        ``GET /Contacts?IDs=a,b,...&includeArchived=true``: the spec's ``IDs`` parameter ("Filter
        by a comma separated list of ContactIDs. Allows you to retrieve a specific set of
        contacts in a single call"), :data:`IDS_PER_READ` ids a call so the URL stays short;
        archived contacts are included, as ``GET /Contacts/{ContactID}`` returns them too.
        """
        wanted = list(dict.fromkeys(customer_ids))
        found: dict[str, dict[str, str | None] | SyncdError] = {}
        for start in range(0, len(wanted), IDS_PER_READ):
            chunk = wanted[start : start + IDS_PER_READ]
            data = await self._get("/Contacts", {"IDs": ",".join(chunk), "includeArchived": "true"})
            by_id = {str(raw.get("ContactID", "")).lower(): raw for raw in elements(data, "Contacts")}
            for ident in chunk:
                raw = by_id.get(ident.lower())
                found[ident] = contact_details(raw) if raw is not None else NotFound(f"xero: no contact {ident}")
        return found

    async def update_customer(
        self, customer_id: str, client: Client, key: str, *, fields: Collection[str] | None = None
    ) -> None:
        """``POST /Contacts/{ContactID}`` (spec ``updateContact``) with the client's current details.

        With ``fields``, only the Contact keys holding those details are sent
        (:data:`~connectors.xero.models.CONTACT_FIELDS`), so the contact's other details
        are not written. A detail with no value is not sent (it is not cleared).
        """
        payload = contact_payload(client, contact_number(client.key))
        if fields is not None:
            keep = {name for field in fields for name in CONTACT_FIELDS.get(field, ())}
            payload = {name: value for name, value in payload.items() if name in keep or name == "ContactNumber"}
        contact = {**payload, "ContactID": customer_id}
        await self._write("POST", f"/Contacts/{customer_id}", {"Contacts": [contact]}, key=f"contact-{key}")
        log.info("xero_contact_updated", contact_id=customer_id, client_key=client.key, fields=sorted(fields or []))

    # -- invoices -------------------------------------------------------------

    async def create_invoice(self, draft: InvoiceDraft, customer_id: str) -> InvoiceStatus:
        """Create the invoice (or credit note) idempotently; email an approved invoice if asked.

        ``Idempotency-Key: draft.key`` makes a retried PUT return the first result; the
        ``syncd:<key>`` stamp in ``Reference`` lets :meth:`find_invoice` recover it later.

        Raises:
            XeroRejected: (a :class:`~syncd.core.errors.FatalError`) Xero's validation messages.
        """
        kind = _KINDS[draft.kind]
        body = kind.payload(draft, customer_id, self.settings.unitdp)
        data = await self._write("PUT", kind.path, body, key=draft.key, params=self._unitdp())
        return await self._created(draft, kind.status(elements(data, kind.collection)[0]))

    async def _created(self, draft: InvoiceDraft, status: InvoiceStatus) -> InvoiceStatus:
        """Log a created document and email it when the draft asks (invoices only), one call each."""
        if draft.kind is DraftKind.CREDIT_NOTE:
            log.info("xero_credit_note_created", credit_note_id=status.invoice_id, number=status.number, key=draft.key)
            if draft.send:
                # The Accounting API has an Email action for invoices only (spec: no
                # /CreditNotes/{id}/Email path).
                log.warning("xero_credit_note_not_emailed", credit_note_id=status.invoice_id, key=draft.key)
            return status
        log.info("xero_invoice_created", invoice_id=status.invoice_id, number=status.number, key=draft.key)
        if draft.send and status.state is InvoiceState.AUTHORISED:
            await self.send_invoice(status.invoice_id, draft.key)
            status = status.model_copy(update={"state": InvoiceState.SENT})
        return status

    async def create_invoices(
        self, items: Sequence[tuple[InvoiceDraft, str]]
    ) -> Mapping[str, InvoiceStatus | SyncdError]:
        """Create many invoices and credit notes in few requests; per ``draft.key``, its status or error.

        Invoices go in ``PUT /Invoices?summarizeErrors=false``, credit notes in
        ``PUT /CreditNotes?summarizeErrors=false``, each element stamped with its own key
        in ``Reference`` (as :meth:`create_invoice`), each request holding at most
        :attr:`batch_max` elements and :data:`~connectors.xero.batches.REQUEST_MAX_BYTES`
        of body, with an ``Idempotency-Key`` derived from its members' keys
        (:func:`~connectors.xero.batches.batch_key`; the HTTP layer's own retries resend it
        unchanged, which Xero replays). Xero answers each element: a refused one maps to
        :class:`~connectors.xero.models.XeroRejected` with Xero's messages, the others to
        their status. A request of one element is exactly :meth:`create_invoice`.

        Never resent blindly: when a request still fails after the HTTP layer's retries,
        or is refused as a whole (a 4xx without per-element answers, such as 413), its
        members are first looked up by their keys in one call (:meth:`find_invoices`);
        those found are done. After a refusal the missing ones are sent again in halves,
        down to a request of one, which isolates a bad element; after a failure they keep
        the error (the engine retries them later, looking them up first). Emailing stays
        one call per invoice, after creation.
        """
        unique = list({draft.key: (draft, customer_id) for draft, customer_id in items}.values())
        results: dict[str, InvoiceStatus | SyncdError] = {}
        for kind in _KINDS.values():
            members = [(d, c) for d, c in unique if _KINDS[d.kind] is kind]
            size = functools.partial(self._element_size, kind)
            for run in packed(members, size=size, max_count=self.batch_max, max_bytes=self.request_max_bytes):
                results.update(await self._create_run(kind, run))
        return results

    def _element_size(self, kind: _DocumentKind, item: tuple[InvoiceDraft, str]) -> int:
        draft, customer_id = item
        return len(dump_json(kind.payload(draft, customer_id, self.settings.unitdp)[kind.collection][0]))

    async def _create_run(
        self, kind: _DocumentKind, run: list[tuple[InvoiceDraft, str]]
    ) -> dict[str, InvoiceStatus | SyncdError]:
        """One request for ``run``; on a failure or a refusal of the whole request, look up, then split."""
        if len(run) == 1:
            draft, customer_id = run[0]
            try:
                return {draft.key: await self.create_invoice(draft, customer_id)}
            except (Rejected, RetriableError) as exc:
                return {draft.key: exc}
        try:
            return await self._put_run(kind, run)
        except RetriableError as exc:
            found = await self._find_members(kind, run)
            log.warning("xero_batch_failed", kind=kind.name, size=len(run), found=len(found), error=str(exc))
            failed: dict[str, InvoiceStatus | SyncdError] = {}
            for draft, _ in run:  # one found still gets its email, as after a refusal
                failed[draft.key] = await self._after_lookup(draft, found[draft.key]) if draft.key in found else exc
            return failed
        except Rejected as exc:
            found = await self._find_members(kind, run)
            log.warning("xero_batch_refused", kind=kind.name, size=len(run), found=len(found), error=str(exc))
            results: dict[str, InvoiceStatus | SyncdError] = {}
            for draft, _ in run:
                if draft.key in found:
                    results[draft.key] = await self._after_lookup(draft, found[draft.key])
            missing = [(d, c) for d, c in run if d.key not in found]
            half = len(missing) // 2
            for part in (missing[:half], missing[half:]):
                if part:
                    results.update(await self._create_run(kind, part))
            return results

    async def _find_members(
        self, kind: _DocumentKind, run: list[tuple[InvoiceDraft, str]]
    ) -> Mapping[str, InvoiceStatus]:
        return await self.find_invoices([draft.key for draft, _ in run], kind=kind.draft_kind)

    async def _after_lookup(self, draft: InvoiceDraft, status: InvoiceStatus) -> InvoiceStatus | SyncdError:
        """A document found after a lost or refused request: email it if that was still to do."""
        if draft.send and draft.kind is DraftKind.INVOICE and status.state is InvoiceState.AUTHORISED:
            try:
                await self.send_invoice(status.invoice_id, draft.key)
            except (Rejected, RetriableError) as exc:
                return exc
            return status.model_copy(update={"state": InvoiceState.SENT})
        return status

    async def _put_run(
        self, kind: _DocumentKind, run: list[tuple[InvoiceDraft, str]]
    ) -> dict[str, InvoiceStatus | SyncdError]:
        body = {
            kind.collection: [
                kind.payload(draft, customer_id, self.settings.unitdp)[kind.collection][0] for draft, customer_id in run
            ]
        }
        params = {**self._unitdp(), "summarizeErrors": "false"}
        key = batch_key(draft.key for draft, _ in run)
        data = await self._write("PUT", kind.path, body, key=key, params=params)
        answers = _by_member(elements(data, kind.collection), [draft.key for draft, _ in run])
        results: dict[str, InvoiceStatus | SyncdError] = {}
        unanswered = []
        for draft, _ in run:
            raw = answers.get(draft.key)
            if raw is None:
                unanswered.append(draft.key)
                continue
            outcome = XeroElementResult.model_validate(raw)
            if outcome.failed:
                results[draft.key] = XeroRejected(
                    f"{self.ctx.connection}: PUT {kind.path} refused {kind.name} {draft.key}: "
                    + "; ".join(outcome.messages),
                    status=400,
                    messages=outcome.messages,
                    place=f"{kind.collection}[Reference=syncd:{draft.key}]",
                )
                continue
            try:
                results[draft.key] = await self._created(draft, kind.status(raw))
            except (Rejected, RetriableError) as exc:  # the email, after the document was created
                results[draft.key] = exc
        if unanswered:
            found = await self.find_invoices(unanswered, kind=kind.draft_kind)
            for key in unanswered:
                results[key] = found.get(key) or RetriableError(
                    f"{self.ctx.connection}: PUT {kind.path} answered no element for {key}, and none is stamped with it"
                )
        return results

    async def send_invoice(self, invoice_id: str, key: str) -> None:
        """``POST /Invoices/{id}/Email`` with an empty object; Xero answers 204 (spec ``emailInvoice``)."""
        await self._write("POST", f"/Invoices/{invoice_id}/Email", {}, key=f"{key}-email")
        log.info("xero_invoice_emailed", invoice_id=invoice_id, key=key)

    async def void_invoice(self, invoice_id: str, key: str) -> InvoiceStatus:
        """Void an approved invoice with no payments: ``POST /Invoices/{InvoiceID}`` with ``Status: VOIDED``.

        "Voiding an invoice: you can void an AUTHORISED invoice that has no payments
        applied" (https://developer.xero.com/documentation/api/accounting/invoices,
        Updating invoices; spec ``updateInvoice``). Xero refuses it once a payment is
        applied, answered as :class:`~connectors.xero.models.XeroRejected`.
        """
        body = {"Invoices": [{"InvoiceID": invoice_id, "Status": "VOIDED"}]}
        data = await self._write("POST", f"/Invoices/{invoice_id}", body, key=f"{key}-void", params=self._unitdp())
        status = invoice_status(XeroInvoices.model_validate(data).invoices[0])
        log.info("xero_invoice_voided", invoice_id=invoice_id, number=status.number, key=key)
        return status

    async def find_invoice(self, key: str, *, kind: DraftKind) -> InvoiceStatus | None:
        """The document of ``kind`` whose ``Reference`` carries ``syncd:<key>``, else ``None``.

        Only the list of ``kind`` is read (``GET /Invoices`` or ``GET /CreditNotes``): one
        request, and a key is never matched against the other kind of document. Uses
        ``where=Reference!=null&&Reference.Contains("syncd:<key>")``: Xero's filter needs
        the null check first on an optional string field (the ``where`` notes of
        https://developer.xero.com/documentation/api/accounting/requests-and-responses).
        A 404 on the look-up means nothing was found (``None``), never a failure. A
        voided match is returned only when no live one exists. :meth:`find_invoices` for one key.
        """
        return (await self.find_invoices([key], kind=kind)).get(key)

    async def find_invoices(self, keys: Sequence[str], *, kind: DraftKind) -> Mapping[str, InvoiceStatus]:
        """The documents of ``kind`` stamped with these keys, by key (keys not found are absent).

        One ``GET`` per chunk of keys whose ``where`` ORs the stamps,
        ``Reference!=null&&(Reference.Contains("syncd:a")||Reference.Contains("syncd:b"))``,
        each filter within :data:`~connectors.xero.batches.WHERE_MAX_CHARS`. A document
        counts for a key only when its ``Reference`` carries exactly that stamp; per key a
        live document wins over a voided one, as in :meth:`find_invoice`.
        """
        document = _KINDS[kind]
        wanted = set(keys)
        clauses = [f"Reference.Contains({where_literal(stamp(key))})" for key in dict.fromkeys(keys)]
        matches: dict[str, list[InvoiceStatus]] = {}
        for where in or_filters(clauses, guard="Reference!=null"):
            for raw in elements(await self._look_up(document.path, where), document.collection):
                status = document.status(raw)
                if status.stamped_key in wanted:
                    matches.setdefault(str(status.stamped_key), []).append(status)
        found: dict[str, InvoiceStatus] = {}
        for key, statuses in matches.items():
            live = [status for status in statuses if status.state is not InvoiceState.VOIDED]
            found[key] = (live or statuses)[0]
        return found

    async def _look_up(self, path: str, where: str) -> Any:
        # unitdp as on every other read of a document, so its content compares equal (syncd.store.trail).
        try:
            return await self._get(path, {"where": where, **self._unitdp()})
        except NotFound:
            return {}

    async def get_invoice(self, invoice_id: str) -> InvoiceStatus:
        """Re-read one invoice (or, for a credit note's id, that credit note)."""
        try:
            data = await self._get(f"/Invoices/{invoice_id}", self._unitdp())
            return invoice_status(XeroInvoices.model_validate(data).invoices[0])
        except NotFound:
            data = await self._get(f"/CreditNotes/{invoice_id}", self._unitdp())
            notes = XeroCreditNotes.model_validate(data).credit_notes
            if not notes:
                raise NotFound(f"xero: no invoice or credit note {invoice_id}") from None
            return credit_note_status(notes[0])

    async def poll_changes(self, cursor: str | None, *, since: datetime | None = None) -> ChangePage:
        """Invoices and credit notes changed since ``cursor``, each list read as its own feed.

        A list is read ordered by ``UpdatedDateUTC`` with ``If-Modified-Since`` (spec
        ``GET /Invoices`` and ``GET /CreditNotes``: ``order``, ``page``, ``pageSize``,
        header ``ifModifiedSince``). After a full page the next read is page 1 again from
        the last ``UpdatedDateUTC`` seen, not page N+1: a document changed while the poll
        is between pages moves to the end of the order, and under page numbers it would
        shift another document onto a page already read, which would then never be
        reported. Documents at that boundary instant are read again and dropped by
        (id, ``UpdatedDateUTC``), the hint's event id, which the inbox also
        de-duplicates on. Only when a whole page shares one instant (more documents
        changed in the same millisecond than a page holds) does the feed turn to the
        next page at the same instant; within such a run, a document changed again
        between two reads can still shift another of the run past the page boundary.

        The cursor is opaque JSON, one entry per list (see :class:`_Feed`). ``None``
        starts now (or at ``since``, when given, for a first poll that catches up). While
        ``more`` is true only the lists with pages left are read. Credit notes come as
        hints with ``object_type='credit_note'`` (a credit note's credit changes when it
        is allocated).
        """
        if cursor is None:
            start = self.ctx.clock() if since is None else min(self.ctx.clock(), since)
            start = start.astimezone(UTC).replace(microsecond=0)
            feeds = {name: _Feed(since=start) for name in _FEEDS}
            if since is None:
                return ChangePage(hints=(), cursor=_cursor(feeds))
        else:
            feeds = _parse_cursor(cursor)
        # A new round reads every list; a round in progress only the lists with pages left.
        due = [name for name in _FEEDS if feeds[name].more] or list(_FEEDS)
        hints: list[ChangeHint] = []
        for name in due:
            rows, full = await self._read_feed(name, feeds[name])
            hints += [self._poll_hint(name, ident, at) for ident, at in rows if feeds[name].is_new(ident, at)]
            feeds[name] = feeds[name].after(rows, full=full)
        return ChangePage(hints=tuple(hints), cursor=_cursor(feeds), more=any(feed.more for feed in feeds.values()))

    async def _read_feed(self, name: str, feed: _Feed) -> tuple[list[tuple[str, datetime]], bool]:
        """One page of a list: (id, ``UpdatedDateUTC``) of each document, and whether pages follow."""
        params = {"page": feed.page, "pageSize": self.page_size, "order": "UpdatedDateUTC ASC"}
        headers = {"If-Modified-Since": _modified_since(feed.since)}
        if name == "invoice":
            invoices = XeroInvoices.model_validate(await self._get("/Invoices", params, **headers))
            found = [(invoice.invoice_id, invoice.updated) for invoice in invoices.invoices]
            pagination = invoices.pagination
        else:
            notes = XeroCreditNotes.model_validate(await self._get("/CreditNotes", params, **headers))
            found = [(note.credit_note_id, note.updated) for note in notes.credit_notes]
            pagination = notes.pagination
        full = _has_more(pagination, len(found), feed.page, self.page_size)
        return [(ident, at) for ident, at in found if at is not None], full

    def _poll_hint(self, object_type: str, ident: str, updated: datetime) -> ChangeHint:
        return ChangeHint(
            connection=self.ctx.connection,
            object_type=object_type,
            object_id=ident,
            event_id=f"poll:{ident}:{updated.isoformat()}",
            occurred_at=updated,
            kind="poll",
        )

    # -- credit notes, allocations and lock dates -------------------------------

    async def get_credit_note(self, credit_note_id: str) -> CreditNoteStatus:
        """Re-read one credit note (``GET /CreditNotes/{id}``), with its ``RemainingCredit``."""
        notes = XeroCreditNotes.model_validate(await self._get(f"/CreditNotes/{credit_note_id}", self._unitdp()))
        if not notes.credit_notes:
            raise NotFound(f"xero: no credit note {credit_note_id}")
        return credit_note_state(notes.credit_notes[0])

    async def allocate_credit_note(self, credit_note_id: str, invoice_id: str, amount: Decimal, key: str) -> Allocation:
        """Apply ``amount`` of a credit note to an invoice: ``PUT /CreditNotes/{id}/Allocations``.

        Spec operation ``createCreditNoteAllocation`` (body ``Allocations`` of ``Invoice``,
        ``Amount``, ``Date``; it takes the ``Idempotency-Key`` header, sent as ``key``, so a
        retried call applies the credit once). Both documents are re-read afterwards for
        the credit left and the amount due.

        Raises:
            XeroRejected: Xero refused it (more than the credit left or the amount due,
                another contact or currency, a document not approved).
        """
        body = allocation_payload(invoice_id, amount, self.ctx.clock().date())
        await self._write("PUT", f"/CreditNotes/{credit_note_id}/Allocations", body, key=key)
        note = await self.get_credit_note(credit_note_id)
        invoice = await self.get_invoice(invoice_id)
        log.info("xero_credit_allocated", credit_note_id=credit_note_id, invoice_id=invoice_id, key=key)
        return Allocation(
            credit_note_id=credit_note_id,
            invoice_id=invoice_id,
            amount=amount,
            remaining_credit=note.remaining_credit,
            invoice_amount_due=invoice.amount_due,
        )

    async def invoice_url(self, invoice_id: str) -> str:
        """A link that opens the invoice in Xero's web app, in this organisation.

        Xero's deep links: the organisation's ``ShortCode`` (from ``GET /Organisation``,
        read once) and ``redirecturl=/AccountsReceivable/View.aspx?InvoiceID={id}``
        ("View an invoice", https://developer.xero.com/documentation/api-guides/deep-link-xero).
        """
        if self._short_code is None:
            organisations = XeroOrganisations.model_validate(await self._get("/Organisation")).organisations
            self._short_code = organisations[0].short_code if organisations else None
        login = self.settings.deep_link_url
        if not self._short_code:
            return f"{login}?redirecturl=/AccountsReceivable/View.aspx?InvoiceID={invoice_id}"
        return f"{login}?shortcode={self._short_code}&redirecturl=/AccountsReceivable/View.aspx?InvoiceID={invoice_id}"

    async def lock_dates(self) -> LockDates:
        """``PeriodLockDate`` and ``EndOfYearLockDate`` from ``GET /Organisation`` (spec schema ``Organisation``)."""
        organisations = XeroOrganisations.model_validate(await self._get("/Organisation")).organisations
        if not organisations:
            raise FatalError("xero: GET /Organisation returned no organisation")
        found = organisations[0]
        return LockDates(period_lock=found.period_lock_date, end_of_year_lock=found.end_of_year_lock_date)

    # -- codes (drift guard) --------------------------------------------------

    async def codes(self) -> Mapping[CodeKind, frozenset[str]]:
        """The organisation's account codes, tax types and currencies in use now.

        Archived and deleted accounts and tax rates are left out (an invoice cannot use
        them). Item codes are not listed (see the module docstring), so they are not
        checked.
        """
        accounts = await self._get("/Accounts")
        tax_rates = await self._get("/TaxRates")
        currencies = await self._get("/Currencies")
        tracking = await self._get("/TrackingCategories")
        return {
            "account_code": _live_codes(accounts, "Accounts", "Code"),
            "tax_type": _live_codes(tax_rates, "TaxRates", "TaxType"),
            "currency": _live_codes(currencies, "Currencies", "Code"),
            "tracking": _tracking_options(tracking),
        }

    # -- health ---------------------------------------------------------------

    async def check(self) -> list[str]:
        """Problems with credentials or organisation, from one ``GET /Organisation``.

        With the code flow a stored, still valid access token is used as it is; an
        expired one is reported (the daemon refreshes it) and never refreshed here,
        because a refresh spends the single-use refresh token. A custom connection asks
        for a fresh token with the configured client id and secret (a stored one is not
        reused, so a wrong secret is reported); it is used for this call only, not stored.
        """
        http = self.http
        if self.settings.grant == "client_credentials":
            try:
                payload = await request_token(self.settings, self.ctx.client, {"grant_type": "client_credentials"})
            except SyncdError as exc:
                return [str(exc)]
            # The connection's own plumbing (limits, attempts), with that token and no renewal.
            http = copy.copy(self.http)
            http.auth = XeroAuth(StaticToken(str(payload["access_token"])))
        else:
            refused = await self._client_refused()
            if refused:
                return [refused]
            stored = await self.ctx.tokens.load()
            if not stored:
                return ["xero: no stored tokens; run `syncd auth xero` to connect this organisation"]
            if not token_valid(stored, self.ctx.clock().timestamp()):
                return [
                    "xero: the stored access token has expired; the daemon refreshes it on its next call "
                    "(check never refreshes, as that would spend the single-use refresh token)"
                ]
            http = self.ctx.make_http(
                base_url=self.api_url,
                auth=XeroAuth(StaticToken(str(stored["access_token"]))),
                headers=_headers(self.settings),
                limits=_limits(self.settings),
            )
        return await self._check_organisation(http)

    async def _client_refused(self) -> str | None:
        """Whether the token endpoint rejects the configured client id and secret (code flow).

        It is asked to refresh a token that cannot exist: a token endpoint authenticates
        the client before it looks at the grant, answering ``invalid_client`` for a wrong
        id or secret and ``invalid_grant`` otherwise (RFC 6749 section 5.2, the error
        codes of the token endpoint). So a wrong secret is found without spending the
        stored single-use refresh token.
        """
        form = {"grant_type": "refresh_token", "refresh_token": CREDENTIAL_PROBE}
        try:
            await request_token(self.settings, self.ctx.client, form)
        except AuthError as exc:
            if "invalid_client" in str(exc):
                return "xero: the token endpoint rejected client_id/client_secret (invalid_client)"
            return None
        except SyncdError as exc:
            return f"xero: token endpoint: {exc}"
        return None

    async def _check_organisation(self, http: VendorHttp) -> list[str]:
        try:
            response = await http.request("GET", "/Organisation")
        except SyncdError as exc:
            return [f"xero: GET /Organisation failed: {exc}"]
        organisations = XeroOrganisations.model_validate(load_json(response.content)).organisations
        if not organisations:
            return ["xero: GET /Organisation returned no organisation"]
        organisation = organisations[0]
        problems = []
        tenant = self.settings.tenant_id
        if tenant and organisation.organisation_id and organisation.organisation_id.lower() != tenant.lower():
            problems.append(f"xero: tenant_id {tenant} answers as organisation {organisation.organisation_id}")
        if organisation.organisation_status and organisation.organisation_status != "ACTIVE":
            problems.append(f"xero: organisation {organisation.name!r} is {organisation.organisation_status}")
        return problems


def _tracking_options(data: Any) -> frozenset[str]:
    """``Category/Option`` of every active option of every active tracking category.

    Spec schemas ``TrackingCategory`` (``Name``, ``Status`` ACTIVE/ARCHIVED/DELETED,
    ``Options``) and ``TrackingOption`` (``Name``, ``Status``), ``GET /TrackingCategories``.
    """
    rows = data.get("TrackingCategories") if isinstance(data, Mapping) else None
    if not isinstance(rows, list):
        raise FatalError("xero: GET /TrackingCategories answered without a TrackingCategories list")
    return frozenset(
        f"{row['Name']}/{option['Name']}"
        for row in rows
        if isinstance(row, Mapping) and row.get("Name") and row.get("Status") not in RETIRED_STATUSES
        for option in row.get("Options") or []
        if isinstance(option, Mapping) and option.get("Name") and option.get("Status") not in RETIRED_STATUSES
    )


def _live_codes(data: Any, collection: str, key: str) -> frozenset[str]:
    """The ``key`` of each row of ``data[collection]`` whose ``Status`` is not archived or deleted."""
    rows = data.get(collection) if isinstance(data, Mapping) else None
    if not isinstance(rows, list):
        raise FatalError(f"xero: GET /{collection} answered without a {collection} list")
    return frozenset(
        str(row[key])
        for row in rows
        if isinstance(row, Mapping) and row.get(key) and row.get("Status") not in RETIRED_STATUSES
    )


_FEEDS = ("invoice", "credit_note")  # the lists poll_changes reads, named as their hints' object_type


@dataclass(frozen=True, kw_only=True)
class _Feed:
    """Where the poll of one list stands.

    Attributes:
        since: the ``If-Modified-Since`` of the next read: the last ``UpdatedDateUTC``
            seen (the start, before any).
        page: the page to read at ``since``; above 1 only while a run of documents that
            share the instant ``since`` is longer than a page.
        seen: ids already reported at exactly ``since``, not reported again.
        more: pages are left in this round.
    """

    since: datetime
    page: int = 1
    seen: frozenset[str] = frozenset()
    more: bool = False

    def is_new(self, ident: str, at: datetime) -> bool:
        """Whether a listed (id, ``UpdatedDateUTC``) is a change not reported yet."""
        return at > self.since or (at == self.since and ident not in self.seen)

    def after(self, rows: list[tuple[str, datetime]], *, full: bool) -> _Feed:
        """The feed after reading ``rows`` (in ``UpdatedDateUTC`` order); ``full``: pages follow."""
        last = max([self.since, *(at for _, at in rows)])
        at_last = {ident for ident, at in rows if at == last}
        if last == self.since:
            at_last |= self.seen
            if full:  # the whole page shares the instant ``since``: the only way on is the next page
                return _Feed(since=last, page=self.page + 1, seen=frozenset(at_last), more=True)
        return _Feed(since=last, seen=frozenset(at_last), more=full)


def _modified_since(moment: datetime) -> str:
    """``If-Modified-Since`` as ISO-8601 UTC, with milliseconds when it has any.

    The spec's example for the header (``components.parameters.ifModifiedSince``) is
    ``2020-02-06T12:17:43.202-08:00``; ``UpdatedDateUTC`` carries milliseconds too.
    """
    return moment.astimezone(UTC).isoformat(timespec="milliseconds" if moment.microsecond else "seconds")


def _cursor(feeds: Mapping[str, _Feed]) -> str:
    return json.dumps(
        {
            name: {"since": feed.since.isoformat(), "page": feed.page, "seen": sorted(feed.seen), "more": feed.more}
            for name, feed in feeds.items()
        }
    )


def _parse_cursor(cursor: str) -> dict[str, _Feed]:
    try:
        data = json.loads(cursor)
        if "since" in data:  # the earlier form, one page number for both lists: resume both from its ``since``
            return {name: _Feed(since=_aware(data["since"])) for name in _FEEDS}
        return {
            name: _Feed(
                since=_aware(data[name]["since"]),
                page=int(data[name]["page"]),
                seen=frozenset(str(ident) for ident in data[name]["seen"]),
                more=bool(data[name]["more"]),
            )
            for name in _FEEDS
        }
    except (ValueError, KeyError, TypeError) as exc:
        raise FatalError(f"xero: unreadable poll cursor {cursor[:80]!r}; reset the connection's cursor") from exc


def _aware(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"poll cursor time {text!r} has no UTC offset")
    return moment


def _has_more(pagination: XeroPagination | None, count: int, page: int, page_size: int) -> bool:
    if pagination is not None:
        return page < pagination.page_count
    return count >= page_size


def factory(settings: XeroSettings, ctx: ConnectorContext) -> XeroConnector:
    """Build the connector for one connection."""
    return XeroConnector(settings, ctx)


def verifier(settings: XeroSettings, clock: Callable[[], datetime]) -> XeroWebhookVerifier:
    """Build the webhook verifier for one connection.

    The factory is not told the connection's name, so hints carry ``settings.connector``
    (``"xero"``) as their connection until the engine passes the name.
    """
    key = settings.webhook_key.get_secret_value() if settings.webhook_key is not None else None
    return XeroWebhookVerifier(key=key, connection=settings.connector, tenant_id=settings.tenant_id, clock=clock)


SPEC = ConnectorSpec(
    name="xero",
    roles=frozenset(
        {
            Invoicing,
            CreatesInvoicesInBatches,
            ReadsCustomersInBatches,
            InvoicingCodes,
            AllocatesCredit,
            ReadsCreditNotes,
            HasLockDates,
        }
    ),
    settings_model=XeroSettings,
    factory=factory,
    verifier=verifier,
    secret_fields=("client_secret", "webhook_key", "refresh_token"),
    code_flow=XeroCodeFlow(),
)

__all__ = ["SPEC", "XeroConnector", "XeroSettings", "factory", "verifier"]
