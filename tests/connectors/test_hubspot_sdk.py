"""The official hubspot-api-client SDK against the emulator served by uvicorn on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hubspot import HubSpot
from hubspot.crm import AssociationType
from hubspot.crm.associations.v4 import (
    BatchInputPublicFetchAssociationsBatchRequest,
    PublicFetchAssociationsBatchRequest,
)
from hubspot.crm.deals import (
    BatchInputSimplePublicObjectBatchInput,
    BatchReadInputSimplePublicObjectId,
    Filter,
    FilterGroup,
    PublicObjectSearchRequest,
    SimplePublicObjectBatchInput,
    SimplePublicObjectId,
    SimplePublicObjectInput,
)
from hubspot.crm.properties import ApiException, PropertyCreate

from connectors.hubspot.connector import TASK_TO_COMPANY_TYPE_ID, TASK_TO_DEAL_TYPE_ID
from connectors.hubspot.emulator import _ASSOCIATION_TYPES, HubSpotEmulator
from tests.servers import serve_in_thread


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[HubSpotEmulator, str]]:
    """The emulator on a free loopback port, in a thread, shut down after the module."""
    emulator = HubSpotEmulator(rate_limits=False)
    with serve_in_thread(emulator.app) as url:
        yield emulator, url


def api(url: str, pick: Any) -> Any:
    """One SDK API object pointed at the emulator (each discovery access builds a new client)."""
    instance = pick(HubSpot(access_token="pat-emulator").crm)
    instance.api_client.configuration.host = url
    return instance


@pytest.fixture(scope="module")
def deal_ids(served: tuple[HubSpotEmulator, str]) -> dict[str, str]:
    emulator, _ = served
    acme = emulator.add_company({"name": "Acme Ltd"})
    ann = emulator.add_contact({"firstname": "Ann"}, company_id=acme)
    deal = emulator.add_deal(
        {"dealname": "Website", "amount": "1500"},
        company_id=acme,
        contact_ids=[ann],
        line_items=[{"name": "Design", "quantity": "2", "price": "500"}],
    )
    return {"deal": deal, "acme": acme, "ann": ann}


def test_sdk_reads_a_deal_with_associations(served: tuple[HubSpotEmulator, str], deal_ids: dict[str, str]) -> None:
    """get_by_id returns the SDK's deal model with properties and HubSpot's association keys."""
    _, url = served
    deals = api(url, lambda crm: crm.deals.basic_api)

    deal = deals.get_by_id(
        deal_ids["deal"], properties=["dealname", "amount"], associations=["companies", "contacts", "line_items"]
    )

    assert deal.id == deal_ids["deal"]
    assert deal.properties["dealname"] == "Website"
    assert deal.properties["amount"] == "1500"
    assert deal.created_at.tzinfo is not None
    assert set(deal.associations) == {"companies", "contacts", "line items"}
    companies = {(item.id, item.type) for item in deal.associations["companies"].results}
    assert (deal_ids["acme"], "deal_to_company") in companies
    assert [item.id for item in deal.associations["contacts"].results] == [deal_ids["ann"]]


def test_sdk_reads_v4_association_labels(served: tuple[HubSpotEmulator, str], deal_ids: dict[str, str]) -> None:
    """The v4 associations API gives the Primary label the connector relies on."""
    _, url = served
    associations = api(url, lambda crm: crm.associations.v4.basic_api)

    page = associations.get_page("deals", deal_ids["deal"], "companies")

    assert [str(item.to_object_id) for item in page.results] == [deal_ids["acme"]]
    labels = {(kind.type_id, kind.label) for kind in page.results[0].association_types}
    assert labels == {(5, "Primary"), (341, None)}


def test_sdk_updates_deal_properties(served: tuple[HubSpotEmulator, str], deal_ids: dict[str, str]) -> None:
    """update() patches properties and the stage metadata sets hs_is_closed_won."""
    emulator, url = served
    deals = api(url, lambda crm: crm.deals.basic_api)

    updated = deals.update(deal_ids["deal"], SimplePublicObjectInput(properties={"dealstage": "closedwon"}))

    assert updated.properties["dealstage"] == "closedwon"
    assert emulator.deal(deal_ids["deal"])["properties"]["hs_is_closed_won"] == "true"


def test_sdk_searches_deals(served: tuple[HubSpotEmulator, str], deal_ids: dict[str, str]) -> None:
    """do_search filters deals and answers the SDK's total/results model."""
    _, url = served
    search = api(url, lambda crm: crm.deals.search_api)
    request = PublicObjectSearchRequest(
        filter_groups=[FilterGroup(filters=[Filter(property_name="dealname", operator="EQ", value="website")])],
        properties=["dealname"],
        limit=10,
    )

    found = search.do_search(public_object_search_request=request)

    assert found.total == 1
    assert found.results[0].id == deal_ids["deal"]


def test_sdk_lists_and_creates_properties(served: tuple[HubSpotEmulator, str]) -> None:
    """The properties API lists definitions, creates one, and answers 409 for a duplicate."""
    _, url = served
    properties = api(url, lambda crm: crm.properties.core_api)
    body = PropertyCreate(
        name="sdk_flag", label="SDK flag", type="string", field_type="text", group_name="dealinformation"
    )

    created = properties.create("deals", body)
    listed = properties.get_all("deals")
    with pytest.raises(ApiException) as duplicate:
        properties.create("deals", body)

    assert created.name == "sdk_flag"
    assert {"dealname", "dealstage", "sdk_flag"} <= {item.name for item in listed.results}
    assert duplicate.value.status == 409


def test_sdk_updates_deals_in_a_batch(served: tuple[HubSpotEmulator, str]) -> None:
    """batch_api.update writes every input and answers the SDK's BatchResponseSimplePublicObject."""
    emulator, url = served
    first, second = emulator.add_deal({"dealname": "First"}), emulator.add_deal({"dealname": "Second"})
    batch = api(url, lambda crm: crm.deals.batch_api)
    body = BatchInputSimplePublicObjectBatchInput(
        inputs=[
            SimplePublicObjectBatchInput(id=first, properties={"amount": "10"}),
            SimplePublicObjectBatchInput(id=second, properties={"amount": "20"}),
        ]
    )

    answer = batch.update(body)

    assert answer.status == "COMPLETE"
    assert {item.id: item.properties["amount"] for item in answer.results} == {first: "10", second: "20"}
    assert emulator.deal(second)["properties"]["amount"] == "20"


def test_sdk_reads_v4_associations_in_a_batch(served: tuple[HubSpotEmulator, str], deal_ids: dict[str, str]) -> None:
    """batch_api.get_page answers per deal from/to with labels, and a deal without companies as a 207 error."""
    emulator, url = served
    bare = emulator.add_deal({"dealname": "Bare"})
    batch = api(url, lambda crm: crm.associations.v4.batch_api)
    body = BatchInputPublicFetchAssociationsBatchRequest(
        inputs=[PublicFetchAssociationsBatchRequest(id=deal_ids["deal"]), PublicFetchAssociationsBatchRequest(id=bare)]
    )

    answer = batch.get_page("deals", "companies", body)

    (result,) = answer.results
    assert result._from.id == deal_ids["deal"]
    assert [str(item.to_object_id) for item in result.to] == [deal_ids["acme"]]
    assert {(kind.type_id, kind.label) for kind in result.to[0].association_types} == {(5, "Primary"), (341, None)}
    assert answer.num_errors == 1
    assert answer.errors[0].message == f"No company is associated with deal {bare}."


def test_sdk_reads_deals_in_a_batch_with_stage_history(
    served: tuple[HubSpotEmulator, str], deal_ids: dict[str, str]
) -> None:
    """batch_api.read answers propertiesWithHistory per deal, and a missing id as a 207 error."""
    _, url = served
    batch = api(url, lambda crm: crm.deals.batch_api)
    body = BatchReadInputSimplePublicObjectId(
        inputs=[SimplePublicObjectId(id=deal_ids["deal"]), SimplePublicObjectId(id="999999")],
        properties=["dealname"],
        properties_with_history=["dealstage"],
    )

    answer = batch.read(body)

    (deal,) = answer.results
    assert deal.id == deal_ids["deal"]
    assert deal.properties_with_history["dealstage"][-1].value == "appointmentscheduled"
    assert answer.num_errors == 1


def test_association_type_ids_are_the_sdks() -> None:
    """Every association type id the emulator and the connector use is the SDK's HubSpot-defined one.

    ``hubspot.crm.AssociationType`` lists them by name (``TASK_TO_DEAL = 216``); HubSpot's
    associate-records guide, "Association type ID values", has the same table.
    """
    singular = {
        "deals": "DEAL",
        "companies": "COMPANY",
        "contacts": "CONTACT",
        "line_items": "LINE_ITEM",
        "tasks": "TASK",
    }
    checked = 0
    for (from_kind, to_kind), (primary, plain) in _ASSOCIATION_TYPES.items():
        name = f"{singular[from_kind]}_TO_{singular[to_kind]}"
        assert plain[0] == getattr(AssociationType, name), name
        if primary is not None:
            assert primary[0] == getattr(AssociationType, f"PRIMARY_{name}"), f"PRIMARY_{name}"
        checked += 1
    assert checked == len(_ASSOCIATION_TYPES) >= 12
    assert (TASK_TO_DEAL_TYPE_ID, TASK_TO_COMPANY_TYPE_ID) == (
        AssociationType.TASK_TO_DEAL,
        AssociationType.TASK_TO_COMPANY,
    )
    assert _ASSOCIATION_TYPES[("deals", "tasks")][1][0] == AssociationType.DEAL_TO_TASK == 215
    assert _ASSOCIATION_TYPES[("companies", "tasks")][1][0] == AssociationType.COMPANY_TO_TASK == 191
