"""HubSpot batch reads (``fetch_deals``) and batch write-backs (``write_billing_statuses``) against the emulator."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from connectors.emulation import Fault
from connectors.hubspot.connector import HubSpotConnector
from connectors.hubspot.emulator import HubSpotEmulator
from syncd.core.errors import AuthError, NotFound, RecordError, RetriableError
from syncd.core.interfaces import DealBillingStatus, ReadsDealsInBatches, WritesStatusInBatches
from tests.connectors.test_hubspot import (
    BASE,
    HOOK_URL,
    Clock,
    InFlight,
    MemoryTokens,
    build,
    seed_deal,
    settings,
    webhook_receiver,
)

AUTH = {"Authorization": "Bearer pat-emulator"}
WANTED = {"deal": ["po_number"], "company": ["city"], "contact": ["jobtitle"], "line_item": ["hs_sku"]}


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime(2024, 6, 3, 9, 0, tzinfo=UTC), tick_ms=1)


@pytest.fixture
def emulator(clock: Clock) -> HubSpotEmulator:
    # Three associations per page of a v4 batch read, so a deal with more pages them.
    return HubSpotEmulator(rate_limits=False, clock=clock, association_page_size=3)


@pytest.fixture
async def client(emulator: HubSpotEmulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=emulator.app)) as http:
        yield http


@pytest.fixture
def connector(client: httpx.AsyncClient, clock: Clock, emulator: HubSpotEmulator) -> HubSpotConnector:
    return build(client, clock, MemoryTokens(emulator))


def crm_calls(emulator: HubSpotEmulator) -> dict[str, int]:
    return {key: count for key, count in emulator.calls.items() if "/crm/" in key}


def status(state: str = "authorised", number: str = "INV-1") -> DealBillingStatus:
    return DealBillingStatus(invoice_number=number, state=state, amount_due=Decimal("120.50"), currency="EUR")


async def portal(emulator: HubSpotEmulator) -> list[str]:
    """Deals of every shape: full, bare, a company that is not primary, many contacts, shared records, a stage move."""
    full = seed_deal(emulator)
    bare = emulator.add_deal({"dealname": "Bare"})
    loose = emulator.add_company({"name": "Loose Co"})
    unprimary = emulator.add_deal({"dealname": "No primary"})
    emulator.associate("deals", unprimary, "companies", loose)
    crowd = [emulator.add_contact({"firstname": f"C{n}", "jobtitle": "Buyer"}) for n in range(8)]
    many = emulator.add_deal(
        {"dealname": "Many", "po_number": "PO-9"},
        company_id=full["acme"],
        contact_ids=[*crowd, full["ann"]],
        line_items=[{"name": f"Item {n}", "quantity": "1", "price": "10", "hs_sku": f"S{n}"} for n in range(7)],
    )
    emulator.label_contact(many, crowd[2], "Billing contact")
    shared = emulator.add_deal({"dealname": "Shared"}, company_id=full["acme"], contact_ids=[full["bob"]])
    await emulator.set_deal_properties(shared, {"dealstage": "closedwon"})
    return [full["deal"], bare, unprimary, many, shared]


# ---------------------------------------------------------------------------- fetch_deals


async def test_fetch_deals_reads_companies_contacts_and_line_items_side_by_side(
    clock: Clock, emulator: HubSpotEmulator
) -> None:
    """After the deals' batch read, the three association-then-read chains run at once (two round trips, not six).

    Each answer is held back 20 ms (an emulator latency fault) so that calls sent together
    are seen in flight together; the records are the same as ``fetch_deal``'s.
    """
    deal_ids = await portal(emulator)
    emulator.faults.add(Fault(kind="latency", latency_s=0.02, path_contains="/crm/", times=None))
    counting = InFlight(httpx.ASGITransport(app=emulator.app))
    async with httpx.AsyncClient(transport=counting) as http:
        connector = build(http, clock, MemoryTokens(emulator))
        batch = await connector.fetch_deals(deal_ids, WANTED)
        assert counting.most == 3
        assert counting.paths[0] == "/crm/v3/objects/deals/batch/read"
        assert sorted(counting.paths[1:4]) == [
            f"/crm/v4/associations/deals/{to_type}/batch/read" for to_type in ("companies", "contacts", "line_items")
        ]
        for deal_id in deal_ids:
            assert batch[deal_id] == await connector.fetch_deal(deal_id, WANTED), deal_id


async def test_fetch_deals_gives_each_deal_exactly_as_fetch_deal_does(
    connector: HubSpotConnector, emulator: HubSpotEmulator
) -> None:
    """fetch_deals answers, deal by deal, the very record fetch_deal does (company, contacts, labels, lines, stage time)."""
    deal_ids = await portal(emulator)

    batch = await connector.fetch_deals(deal_ids, WANTED)

    assert isinstance(connector, ReadsDealsInBatches)
    assert list(batch) == deal_ids
    for deal_id in deal_ids:
        assert batch[deal_id] == await connector.fetch_deal(deal_id, WANTED), deal_id
    many = batch[deal_ids[3]]
    assert not isinstance(many, BaseException)
    assert len(many.data["contacts"]) == 9  # three pages of three in the v4 batch read
    assert len(many.data["line_items"]) == 7
    assert many.data["line_items"][0]["properties"]["hs_sku"] == "S0"
    shared = batch[deal_ids[4]]
    assert not isinstance(shared, BaseException)
    assert shared.stage_changed_at is not None
    unprimary = batch[deal_ids[2]]
    assert not isinstance(unprimary, BaseException)
    assert unprimary.data["company"] is None


async def test_fetch_deals_pages_v4_associations_with_after(
    connector: HubSpotConnector, emulator: HubSpotEmulator
) -> None:
    """A deal with more associations than a page is read on with {id, after} until its last page."""
    deal_ids = await portal(emulator)

    await connector.fetch_deals([deal_ids[3]])

    # contacts: 9 over pages of 3; line items: 7 over pages of 3; companies: one page
    assert crm_calls(emulator)["POST /crm/v4/associations/deals/contacts/batch/read"] == 3
    assert crm_calls(emulator)["POST /crm/v4/associations/deals/line_items/batch/read"] == 3
    assert crm_calls(emulator)["POST /crm/v4/associations/deals/companies/batch/read"] == 1


async def test_fetch_deals_reads_16_deals_in_7_calls(connector: HubSpotConnector, emulator: HubSpotEmulator) -> None:
    """16 deals with a company, contacts and line items each cost 7 calls, not 6 per deal."""
    deal_ids = []
    for n in range(16):
        company = emulator.add_company({"name": f"Client {n}"})
        contact = emulator.add_contact({"firstname": f"Payer {n}"}, company_id=company)
        deal_ids.append(
            emulator.add_deal(
                {"dealname": f"Deal {n}"},
                company_id=company,
                contact_ids=[contact],
                line_items=[{"name": "Work", "quantity": "1", "price": "100"}],
            )
        )

    found = await connector.fetch_deals(deal_ids)

    assert all(not isinstance(record, BaseException) for record in found.values())
    assert sum(crm_calls(emulator).values()) == 7


async def test_fetch_deals_chunks_the_deal_read_at_50_with_history(
    connector: HubSpotConnector, emulator: HubSpotEmulator
) -> None:
    """More than 50 deals are read 50 at a time (HubSpot's cap when propertiesWithHistory is asked)."""
    deal_ids = [emulator.add_deal({"dealname": f"Deal {n}"}) for n in range(60)]

    found = await connector.fetch_deals(deal_ids)

    assert len(found) == 60
    assert crm_calls(emulator)["POST /crm/v3/objects/deals/batch/read"] == 2


async def test_a_deal_hubspot_does_not_return_maps_to_not_found(
    connector: HubSpotConnector, emulator: HubSpotEmulator
) -> None:
    """An unknown deal id is NotFound in the mapping; the others are read."""
    deal = emulator.add_deal({"dealname": "Real"})

    found = await connector.fetch_deals(["999999", deal])

    assert isinstance(found["999999"], NotFound)
    assert "999999" in str(found["999999"])
    assert found[deal] == await connector.fetch_deal(deal)


# ---------------------------------------------------------------------------- write_billing_statuses


async def test_write_billing_statuses_writes_every_deal_in_one_call(
    connector: HubSpotConnector, emulator: HubSpotEmulator, clock: Clock
) -> None:
    """Three deals' standings go out in one batch/update, land as PATCH would, and are not polled back."""
    await connector.ensure_properties()
    deal_ids = [emulator.add_deal({"dealname": f"Deal {n}"}) for n in range(3)]
    first = await connector.poll_changes(None, since=clock.now - timedelta(hours=1))
    before = crm_calls(emulator)

    results = await connector.write_billing_statuses({deal_id: status(number=deal_id) for deal_id in deal_ids})

    assert isinstance(connector, WritesStatusInBatches)
    assert results == dict.fromkeys(deal_ids)
    after = crm_calls(emulator)
    assert {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)} == {
        "POST /crm/v3/objects/deals/batch/update": 1
    }
    for deal_id in deal_ids:
        stored = emulator.deal(deal_id)["properties"]
        assert (stored["syncd_invoice_number"], stored["syncd_invoice_status"]) == (deal_id, "authorised")
        assert stored["syncd_amount_due"] == "120.50"
    clock.advance(seconds=1)
    following = await connector.poll_changes(first.cursor)
    assert [hint.object_id for hint in following.hints] == []  # our own writes


async def test_one_unknown_deal_among_ten_is_found_by_splitting_and_the_nine_are_written(
    connector: HubSpotConnector, emulator: HubSpotEmulator
) -> None:
    """A batch refused for one unknown deal is split until that deal is alone; the nine others are written."""
    await connector.ensure_properties()
    deal_ids = [emulator.add_deal({"dealname": f"Deal {n}"}) for n in range(9)]
    deal_ids.insert(6, "999999")
    writes_before = len(emulator.writes)

    results = await connector.write_billing_statuses({deal_id: status(number=f"N{deal_id}") for deal_id in deal_ids})

    bad = results["999999"]
    assert isinstance(bad, NotFound)
    assert bad.place == "deal 999999"
    assert {deal_id: error for deal_id, error in results.items() if deal_id != "999999"} == dict.fromkeys(
        [deal_id for deal_id in deal_ids if deal_id != "999999"]
    )
    for deal_id in deal_ids:
        if deal_id != "999999":
            assert emulator.deal(deal_id)["properties"]["syncd_invoice_number"] == f"N{deal_id}"
    # refused batches applied nothing: each good deal was written exactly once
    written = [write.object_id for write in emulator.writes[writes_before:]]
    assert sorted(written) == sorted(deal_id for deal_id in deal_ids if deal_id != "999999")
    calls = crm_calls(emulator)["POST /crm/v3/objects/deals/batch/update"]
    assert 2 < calls <= 1 + 2 * 4  # a split per level of a 10-deal batch


async def test_a_state_that_is_not_an_option_fails_that_deal_only(
    connector: HubSpotConnector, emulator: HubSpotEmulator
) -> None:
    """An unknown state is a RecordError for its deal before anything is sent; the rest go in one call."""
    await connector.ensure_properties()
    good, odd = emulator.add_deal({"dealname": "Good"}), emulator.add_deal({"dealname": "Odd"})

    results = await connector.write_billing_statuses({odd: status("mystery"), good: status()})

    assert isinstance(results[odd], RecordError)
    assert "mystery" in str(results[odd])
    assert results[good] is None
    assert emulator.deal(odd)["properties"].get("syncd_invoice_status") is None
    assert crm_calls(emulator)["POST /crm/v3/objects/deals/batch/update"] == 1


async def test_a_request_level_failure_is_raised_for_the_whole_batch(
    client: httpx.AsyncClient, clock: Clock, emulator: HubSpotEmulator
) -> None:
    """A refused token, or a 503 that outlasts the retries, is raised by both batch calls: not mapped per deal, not split."""
    deal = emulator.add_deal({"dealname": "Real"})
    refused = build(client, clock, MemoryTokens(emulator), settings(token="wrong"))
    with pytest.raises(AuthError):
        await refused.fetch_deals([deal])
    with pytest.raises(AuthError):
        await refused.write_billing_statuses({deal: status()})
    assert emulator.calls["POST /crm/v3/objects/deals/batch/update"] == 1

    connector = build(client, clock, MemoryTokens(emulator))
    await connector.ensure_properties()
    emulator.faults.add(Fault(kind="status", status=503, path_contains="/batch/update", times=None))
    sent = connector.http.calls
    with pytest.raises(RetriableError):
        await connector.write_billing_statuses({deal: status(), "999999": status()})
    assert connector.http.calls - sent == 5  # one request and its retries, never split


# ---------------------------------------------------------------------------- the emulator's batch routes


async def test_emulator_batch_update_applies_nothing_when_one_input_is_bad(
    client: httpx.AsyncClient, emulator: HubSpotEmulator
) -> None:
    """One undefined property fails the whole batch with HubSpot's 400; an unknown id with 404; over 100 inputs 400."""
    first, second = emulator.add_deal({"dealname": "One"}), emulator.add_deal({"dealname": "Two"})
    url = f"{BASE}/crm/v3/objects/deals/batch/update"

    bad_property = await client.post(
        url,
        json={
            "inputs": [
                {"id": first, "properties": {"dealname": "Changed"}},
                {"id": second, "properties": {"no_such_property": "x"}},
            ]
        },
        headers=AUTH,
    )
    unknown = await client.post(
        url,
        json={"inputs": [{"id": first, "properties": {"dealname": "Changed"}}, {"id": "424242", "properties": {}}]},
        headers=AUTH,
    )
    too_many = await client.post(
        url, json={"inputs": [{"id": first, "properties": {"dealname": "x"}}] * 101}, headers=AUTH
    )

    assert bad_property.status_code == 400
    assert "PROPERTY_DOESNT_EXIST" in bad_property.json()["message"]
    assert unknown.status_code == 404
    assert unknown.json()["category"] == "OBJECT_NOT_FOUND"
    assert unknown.json()["context"] == {"ids": ["424242"]}
    assert too_many.status_code == 400
    assert emulator.deal(first)["properties"]["dealname"] == "One"
    assert emulator.writes == []


async def test_emulator_batch_update_delivers_webhooks_and_history_as_patch_does(
    client: httpx.AsyncClient, emulator: HubSpotEmulator, clock: Clock
) -> None:
    """A batch update delivers each deal's subscribed property changes and records their history."""
    bodies: list[list[dict[str, Any]]] = []
    receive = webhook_receiver(clock, bodies)

    first = emulator.add_deal({"dealname": "One", "dealstage": "contractsent"})
    second = emulator.add_deal({"dealname": "Two", "dealstage": "contractsent"})
    async with httpx.AsyncClient(transport=httpx.MockTransport(receive)) as hooks:
        emulator.subscribe(HOOK_URL, hooks, properties=["dealstage"])
        answer = await client.post(
            f"{BASE}/crm/v3/objects/deals/batch/update",
            json={
                "inputs": [
                    {"id": first, "properties": {"dealstage": "closedwon"}},
                    {"id": second, "properties": {"dealname": "Renamed"}},
                ]
            },
            headers=AUTH,
        )

    assert answer.status_code == 200
    assert answer.json()["status"] == "COMPLETE"
    assert [result["id"] for result in answer.json()["results"]] == [first, second]
    assert [[(e["objectId"], e["propertyName"], e["changeSource"]) for e in body] for body in bodies] == [
        [(int(first), "dealstage", "API")]
    ]
    read = await client.get(
        f"{BASE}/crm/v3/objects/deals/{first}", params={"propertiesWithHistory": "dealstage"}, headers=AUTH
    )
    assert [entry["value"] for entry in read.json()["propertiesWithHistory"]["dealstage"]][:2] == [
        "closedwon",
        "contractsent",
    ]
    assert [write.object_id for write in emulator.writes] == [first, second]


async def test_emulator_batch_reads_refuse_more_inputs_than_hubspot_takes(
    client: httpx.AsyncClient, emulator: HubSpotEmulator
) -> None:
    """51 deals with propertiesWithHistory, or 1,001 v4 association inputs, are refused with a 400."""
    with_history = await client.post(
        f"{BASE}/crm/v3/objects/deals/batch/read",
        json={"inputs": [{"id": str(n)} for n in range(51)], "properties": [], "propertiesWithHistory": ["dealstage"]},
        headers=AUTH,
    )
    associations = await client.post(
        f"{BASE}/crm/v4/associations/deals/contacts/batch/read",
        json={"inputs": [{"id": str(n)} for n in range(1001)]},
        headers=AUTH,
    )

    assert with_history.status_code == 400
    assert "property histories is 50" in with_history.json()["message"]
    assert associations.status_code == 400


async def test_emulator_v4_batch_read_lists_a_record_without_associations_as_an_error(
    client: httpx.AsyncClient, emulator: HubSpotEmulator
) -> None:
    """A deal without companies, or an unknown id, is a NO_ASSOCIATIONS_FOUND error of a 207; the others are results."""
    company = emulator.add_company({"name": "Acme"})
    linked, bare = (
        emulator.add_deal({"dealname": "Linked"}, company_id=company),
        emulator.add_deal({"dealname": "Bare"}),
    )

    answer = await client.post(
        f"{BASE}/crm/v4/associations/deals/companies/batch/read",
        json={"inputs": [{"id": linked}, {"id": bare}, {"id": "999999"}]},
        headers=AUTH,
    )

    assert answer.status_code == 207
    body = answer.json()
    assert [(result["from"]["id"], [to["toObjectId"] for to in result["to"]]) for result in body["results"]] == [
        (linked, [int(company)])
    ]
    assert body["numErrors"] == 2
    assert [error["message"] for error in body["errors"]] == [
        f"No company is associated with deal {bare}.",
        "No company is associated with deal 999999.",
    ]
    assert {error["subCategory"] for error in body["errors"]} == {"crm.associations.NO_ASSOCIATIONS_FOUND"}
