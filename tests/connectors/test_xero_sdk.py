"""The official xero-python SDK against the Xero emulator served by uvicorn on 127.0.0.1.

The SDK's ``AccountingApi(api_client, base_url=...)`` takes the API root
(XeroAPI/xero-python ``xero_python/accounting/api/accounting_api.py``: ``base_url =
"https://api.xero.com/api.xro/2.0"``), so it is pointed at the emulator's ``/api.xro/2.0``.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from decimal import Decimal
from typing import Any

import httpx
import pytest
from xero_python.accounting import (
    AccountingApi,
    Contact,
    Contacts,
    CurrencyCode,
    Invoice,
    Invoices,
    LineAmountTypes,
    LineItem,
    RequestEmpty,
)
from xero_python.api_client import ApiClient
from xero_python.api_client.configuration import Configuration
from xero_python.api_client.oauth2 import OAuth2Token
from xero_python.exceptions import AccountingBadRequestException

from connectors.xero.emulator import API, XeroEmulator
from tests.servers import serve_in_thread


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[XeroEmulator, str]]:
    """The emulator on a free loopback port, in a thread, shut down after the module."""
    emulator = XeroEmulator(rate_limits=False)
    with serve_in_thread(emulator.app) as url:
        yield emulator, url


@pytest.fixture(scope="module")
def accounting(served: tuple[XeroEmulator, str]) -> AccountingApi:
    """The SDK's AccountingApi with a client-credentials token from the emulator."""
    emulator, url = served
    answer = httpx.post(
        f"{url}/connect/token",
        data={"grant_type": "client_credentials"},
        auth=(emulator.client_id, emulator.client_secret),
    )
    token: dict[str, Any] = {**answer.json(), "scope": answer.json()["scope"].split()}
    client = ApiClient(
        Configuration(oauth2_token=OAuth2Token(client_id=emulator.client_id, client_secret=emulator.client_secret)),
        pool_threads=1,
    )

    @client.oauth2_token_getter
    def _get() -> dict[str, Any]:
        return token

    @client.oauth2_token_saver
    def _save(fresh: dict[str, Any]) -> None:
        token.update(fresh)

    return AccountingApi(client, base_url=f"{url}{API}")


def test_the_sdk_creates_a_contact_and_reads_it_as_its_model(
    served: tuple[XeroEmulator, str], accounting: AccountingApi
) -> None:
    """create_contacts returns the SDK's Contact with Xero's generated id and status."""
    emulator, _ = served
    answer = accounting.create_contacts(
        emulator.tenant_id,
        Contacts(contacts=[Contact(name="Bruce Banner", email_address="hulk@avengers.com", contact_number="SDK-1")]),
    )
    (contact,) = answer.contacts
    assert isinstance(contact, Contact)
    assert contact.name == "Bruce Banner"
    assert contact.contact_number == "SDK-1"
    assert contact.contact_status == "ACTIVE"
    found = accounting.get_contacts(emulator.tenant_id, where='ContactNumber=="SDK-1"')
    assert [c.contact_id for c in found.contacts] == [contact.contact_id]


def test_the_sdk_creates_an_invoice_and_reads_invoices_back(
    served: tuple[XeroEmulator, str], accounting: AccountingApi
) -> None:
    """create_invoices, get_invoices (where + page) and get_invoice yield the SDK's Invoice models."""
    emulator, _ = served
    contact = emulator.seed_contact("Wayne Enterprises", email="ap@wayne.example")
    invoice = Invoice(
        type="ACCREC",
        contact=Contact(contact_id=contact["ContactID"]),
        date=date(2025, 3, 3),
        due_date=date(2025, 3, 17),
        line_amount_types=LineAmountTypes.EXCLUSIVE,
        reference="SDK test",
        status="AUTHORISED",
        currency_code=CurrencyCode.AUD,
        line_items=[
            LineItem(description="Widget", quantity=2.0, unit_amount=20.0, account_code="200", tax_type="OUTPUT")
        ],
    )
    created = accounting.create_invoices(emulator.tenant_id, Invoices(invoices=[invoice]), idempotency_key="sdk-1")
    (made,) = created.invoices
    assert isinstance(made, Invoice)
    assert made.invoice_number == "INV-0001"
    assert (made.sub_total, made.total_tax, made.total, made.amount_due) == (40, 4, 44, 44)
    assert made.status == "AUTHORISED"
    assert made.date == date(2025, 3, 3)
    assert made.due_date == date(2025, 3, 17)
    assert made.updated_date_utc.tzinfo is not None

    page = accounting.get_invoices(emulator.tenant_id, where='Reference=="SDK test"', page=1)
    assert [i.invoice_id for i in page.invoices] == [made.invoice_id]
    assert page.pagination.item_count == 1

    (one,) = accounting.get_invoice(emulator.tenant_id, made.invoice_id).invoices
    (line,) = one.line_items
    assert (line.description, line.line_amount, line.tax_amount) == ("Widget", Decimal("40.00"), Decimal("4.00"))
    assert one.contact.contact_id == contact["ContactID"]
    assert one.currency_code == CurrencyCode.AUD

    assert accounting.email_invoice(emulator.tenant_id, made.invoice_id, RequestEmpty()) is None
    assert emulator.emails == [made.invoice_id]
    again = accounting.create_invoices(emulator.tenant_id, Invoices(invoices=[invoice]), idempotency_key="sdk-1")
    assert again.invoices[0].invoice_id == made.invoice_id
    assert len(emulator.invoices()) == 1


def test_the_sdk_surfaces_a_validation_exception(served: tuple[XeroEmulator, str], accounting: AccountingApi) -> None:
    """A rejected invoice raises the SDK's AccountingBadRequestException carrying Xero's message."""
    emulator, _ = served
    bad = Invoice(type="ACCREC", contact=Contact(contact_id=emulator.seed_contact("Stark Industries")["ContactID"]))
    bad.line_items = [LineItem(description="x", quantity=1.0, unit_amount=1.0, account_code="999")]
    with pytest.raises(AccountingBadRequestException) as caught:
        accounting.create_invoices(emulator.tenant_id, Invoices(invoices=[bad]))
    assert caught.value.reason == "Account code '999' is not a valid code for this document."


def _sdk_invoice(contact_id: str, reference: str, account_code: str) -> Invoice:
    return Invoice(
        type="ACCREC",
        contact=Contact(contact_id=contact_id),
        date=date(2025, 3, 3),
        due_date=date(2025, 3, 17),
        reference=reference,
        status="AUTHORISED",
        line_items=[LineItem(description="Widget", quantity=1.0, unit_amount=10.0, account_code=account_code)],
    )


def test_the_sdk_reads_per_element_results_with_summarize_errors_false(
    served: tuple[XeroEmulator, str], accounting: AccountingApi
) -> None:
    """create_invoices(summarize_errors=False) answers 200 with each element's StatusAttributeString, HasErrors
    and ValidationErrors as the SDK's Invoice models; the good elements are stored."""
    emulator, _ = served
    contact_id = emulator.seed_contact("Oscorp Industries")["ContactID"]
    before = len(emulator.invoices())
    batch = Invoices(
        invoices=[
            _sdk_invoice(contact_id, "sdk-batch-1", "200"),
            _sdk_invoice(contact_id, "sdk-batch-2", "999"),
            _sdk_invoice(contact_id, "sdk-batch-3", "200"),
        ]
    )
    answer = accounting.create_invoices(emulator.tenant_id, batch, summarize_errors=False, idempotency_key="sdk-b1")
    first, refused, third = answer.invoices
    assert all(isinstance(invoice, Invoice) for invoice in answer.invoices)
    assert (first.status_attribute_string, first.has_errors) == ("OK", False)
    assert (third.status_attribute_string, third.has_errors) == ("OK", False)
    assert (refused.status_attribute_string, refused.has_errors) == ("ERROR", True)
    assert "Account code '999' is not a valid code for this document." in [
        error.message for error in refused.validation_errors
    ]
    assert refused.date == date(2025, 3, 3)
    assert {first.reference, third.reference} == {"sdk-batch-1", "sdk-batch-3"}
    assert len(emulator.invoices()) == before + 2
    again = accounting.create_invoices(emulator.tenant_id, batch, summarize_errors=False, idempotency_key="sdk-b1")
    assert [i.invoice_id for i in again.invoices] == [i.invoice_id for i in answer.invoices]
    assert len(emulator.invoices()) == before + 2


def test_the_sdk_gets_a_400_for_a_summarized_batch_while_the_good_elements_are_stored(
    served: tuple[XeroEmulator, str], accounting: AccountingApi
) -> None:
    """By default (summarized) one bad element raises the SDK's bad-request exception; the good one is still created."""
    emulator, _ = served
    contact_id = emulator.seed_contact("Umbrella Corporation")["ContactID"]
    before = len(emulator.invoices())
    batch = Invoices(
        invoices=[_sdk_invoice(contact_id, "sdk-sum-1", "200"), _sdk_invoice(contact_id, "sdk-sum-2", "999")]
    )
    with pytest.raises(AccountingBadRequestException):
        accounting.create_invoices(emulator.tenant_id, batch)
    assert [i["Reference"] for i in emulator.invoices()[before:]] == ["sdk-sum-1"]
