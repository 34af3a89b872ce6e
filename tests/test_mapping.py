"""Loading, validating and applying pipeline mapping files (syncd/core/mapping.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from syncd.core.errors import MappingError
from syncd.core.interfaces import (
    Address,
    Client,
    Contact,
    Engagement,
    EngagementType,
    InvoiceLine,
    SourceRecord,
    TrackingOption,
)
from syncd.core.mapping import InvoiceOptions, MappingDefaults, PipelineMapping, load_mapping

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "mappings" / "hubspot-xero.toml"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
BERLIN = MappingDefaults(timezone="Europe/Berlin", currency="USD", payment_terms_days=30)
NEW_YORK = MappingDefaults(timezone="America/New_York", currency="CAD", payment_terms_days=45)


def fixture(name: str) -> SourceRecord:
    return SourceRecord.model_validate(json.loads((FIXTURES / name).read_text(encoding="utf-8")))


def with_data(record: SourceRecord, **changes: Any) -> SourceRecord:
    return record.model_copy(update={"data": {**record.data, **changes}})


def with_deal_properties(record: SourceRecord, **properties: Any) -> SourceRecord:
    deal = record.data["deal"]
    return with_data(record, deal={**deal, "properties": {**deal["properties"], **properties}})


def line_of(path: Path, prefix: str, after: str = "") -> int:
    """The 1-based line of the first line starting with ``prefix`` (after a line ``after``)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = lines.index(after) if after else 0
    return next(number for number, line in enumerate(lines, 1) if number > start and line.startswith(prefix))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def example() -> PipelineMapping:
    return load_mapping(EXAMPLE)


MINIMAL = """\
[pipeline]
won = { path = "deal.properties.dealstage", equals = "closedwon" }
won_at = { datetime = "deal.properties.closedate" }

[client]
legal_name = { path = "company.properties.legal_name" }

[engagement]
type = "one_time"
name = { path = "deal.properties.dealname" }
"""


# ---------------------------------------------------------------------------
# The worked example, golden
# ---------------------------------------------------------------------------


def test_worked_example_maps_a_deal_with_company_to_the_expected_client_and_engagement(
    example: PipelineMapping,
) -> None:
    """A HubSpot deal with company, two contacts and two line items maps exactly as expected."""
    record = fixture("hubspot_deal_with_company.json")

    mapped = example.map_deal(record, defaults=BERLIN)

    won_at = datetime(2024, 3, 28, 23, 30, tzinfo=UTC)
    assert mapped.client == Client(
        key="hubspot:company:501",
        legal_name="Northwind Traders GmbH",
        billing_contact=Contact(name="Sam Ortiz", first_name="Sam", last_name="Ortiz", email="ap@northwind.example"),
        address=Address(line1="Hafenstrasse 1", city="Hamburg", region="HH", postal_code="20457", country="Germany"),
        tax_id="DE123456789",
        currency="EUR",
        payment_terms_days=14,
        po_number="PO-DEFAULT",
        timezone="Europe/Berlin",
    )
    assert mapped.engagement == Engagement(
        key="hubspot:deal:8812",
        client_key="hubspot:company:501",
        type=EngagementType.RETAINER,
        name="Northwind website rebuild",
        currency="EUR",
        po_number="PO-2024-17",
        won_at=won_at,
        lines=(
            InvoiceLine(
                description="Discovery workshop",
                quantity=Decimal("1"),
                unit_price=Decimal("2500.00"),
                account_code="200",
                tax_type="OUTPUT",
                item_code="SETUP-FEE",
            ),
            InvoiceLine(
                description="Build sprint",
                quantity=Decimal("4"),
                unit_price=Decimal("2500.005"),
                account_code="200",
                tax_type="NONE",
                item_code="EXPORT-SERVICES",
            ),
        ),
        source_version="1711929600000",
    )
    assert mapped.won_at == won_at
    assert str(mapped.engagement.lines[1].unit_price) == "2500.005"


def test_worked_example_maps_a_deal_without_company_to_its_contact(example: PipelineMapping) -> None:
    """A deal without a company bills its only contact, with the defaults and a one_time type."""
    record = fixture("hubspot_deal_without_company.json")

    mapped = example.map_deal(record, defaults=NEW_YORK)

    won_at = datetime(2024, 3, 31, tzinfo=ZoneInfo("America/New_York"))
    assert mapped.client == Client(
        key="hubspot:contact:903",
        legal_name="Lee Chen",
        billing_contact=Contact(name="Lee Chen", first_name="Lee", last_name="Chen", email="lee@example.org"),
        currency="CAD",
        payment_terms_days=30,
        timezone="America/New_York",
    )
    assert mapped.engagement == Engagement(
        key="hubspot:deal:8813",
        client_key="hubspot:contact:903",
        type=EngagementType.ONE_TIME,
        name="Logo refresh",
        currency="CAD",
        won_at=won_at,
        lines=(
            InvoiceLine(
                description="Logo design",
                quantity=Decimal("1"),
                unit_price=Decimal("800"),
                account_code="200",
                tax_type="OUTPUT",
            ),
        ),
        source_version="1712016000000",
    )
    assert mapped.won_at == won_at
    assert mapped.won_at is not None
    assert mapped.won_at.astimezone(ZoneInfo("America/New_York")).day == 31


def test_worked_example_lists_the_properties_it_reads(example: PipelineMapping) -> None:
    """source_properties names every vendor property the worked example reads, per object type."""
    assert dict(example.source_properties) == {
        "deal": (
            "amount",
            "billing_type",
            "closedate",
            "deal_currency_code",
            "dealname",
            "dealstage",
            "hs_is_closed_won",
            "pipeline",
            "po_number",
        ),
        "company": (
            "address",
            "city",
            "country",
            "default_po_number",
            "legal_name",
            "name",
            "payment_terms_days",
            "state",
            "tax_id",
            "zip",
        ),
        "contact": ("email", "firstname", "lastname"),
        "line_item": ("description", "hs_sku", "name", "price", "quantity"),
    }


def test_worked_example_invoice_options_are_authorised_unsent_exclusive(example: PipelineMapping) -> None:
    """The worked example creates authorised, unsent invoices with tax-exclusive lines."""
    assert example.invoice == InvoiceOptions(status="authorised", send=False, line_amount_types="Exclusive")
    assert example.path == EXAMPLE


# ---------------------------------------------------------------------------
# selects and won_at
# ---------------------------------------------------------------------------


def test_selects_takes_deals_of_the_default_pipeline_only(example: PipelineMapping) -> None:
    """The when filter takes fixed-fee deals in the default pipeline and nothing else."""
    record = with_deal_properties(fixture("hubspot_deal_with_company.json"), billing_type="fixed_fee")

    assert example.selects(record)
    assert example.selects(with_deal_properties(record, billing_type=None))
    assert not example.selects(with_deal_properties(record, billing_type="retainer"))
    assert not example.selects(with_deal_properties(record, pipeline="partner-pipeline"))
    assert not example.selects(with_deal_properties(record, pipeline=None))
    assert not example.selects(record.model_copy(update={"object_type": "time_entry"}))


def test_won_at_is_none_while_the_deal_is_not_won(example: PipelineMapping) -> None:
    """A deal neither flagged closed-won nor in the closedwon stage has no won time."""
    record = with_deal_properties(
        fixture("hubspot_deal_with_company.json"), hs_is_closed_won="false", dealstage="contractsent"
    )

    assert example.won_at(record) is None
    assert example.map_deal(record, defaults=BERLIN).engagement.won_at is None


def test_won_at_reads_the_flag_or_the_stage(example: PipelineMapping) -> None:
    """Either the hs_is_closed_won flag or the closedwon stage makes the deal won at closedate."""
    record = fixture("hubspot_deal_with_company.json")
    by_flag = with_deal_properties(record, dealstage="custom-won-stage")
    by_stage = with_deal_properties(record, hs_is_closed_won="false")

    assert example.won_at(by_flag) == datetime(2024, 3, 28, 23, 30, tzinfo=UTC)
    assert example.won_at(by_stage) == datetime(2024, 3, 28, 23, 30, tzinfo=UTC)


def test_won_at_keeps_a_picked_date_in_the_clients_zone(example: PipelineMapping) -> None:
    """A closedate at midnight UTC (a picked date) is that date at midnight in the client's zone."""
    record = with_deal_properties(fixture("hubspot_deal_with_company.json"), closedate="2024-03-31T00:00:00.000Z")

    assert example.won_at(record, defaults=NEW_YORK) == datetime(2024, 3, 31, tzinfo=ZoneInfo("America/New_York"))
    assert example.won_at(record) == datetime(2024, 3, 31, tzinfo=UTC)


def test_a_won_deal_without_close_date_names_the_place(example: PipelineMapping) -> None:
    """A won deal with no closedate raises a MappingError at [pipeline].won_at naming the deal."""
    record = with_deal_properties(fixture("hubspot_deal_with_company.json"), closedate=None)

    with pytest.raises(MappingError) as caught:
        example.won_at(record)

    line = line_of(EXAMPLE, "won_at =")
    assert caught.value.place == f"{EXAMPLE}:{line} [pipeline].won_at"
    assert 'path "deal.properties.closedate" is empty on deal 8812' in str(caught.value)


# ---------------------------------------------------------------------------
# Record errors
# ---------------------------------------------------------------------------


def test_a_record_missing_a_required_field_names_file_line_key_field_and_record(tmp_path: Path) -> None:
    """A missing legal name raises a MappingError naming the file, line, key, path and deal."""
    path = write(tmp_path, MINIMAL)
    mapping = load_mapping(path)
    record = fixture("hubspot_deal_with_company.json")
    company = record.data["company"]
    properties = {k: v for k, v in company["properties"].items() if k != "legal_name"}
    record = with_data(record, company={**company, "properties": properties})

    with pytest.raises(MappingError) as caught:
        mapping.map_deal(record, defaults=BERLIN)

    assert caught.value.place == f"{path}:6 [client].legal_name"
    assert caught.value.message.startswith(
        'path "company.properties.legal_name" not found on deal 8812; known properties: '
    )
    assert "address, city, country, default_po_number, domain, name" in caught.value.message
    assert str(caught.value).startswith(f"{path}:6 [client].legal_name: path ")


def test_the_worked_example_names_every_source_it_tried_for_a_missing_legal_name(example: PipelineMapping) -> None:
    """With no company and no contact, the legal-name error lists each path of the coalesce."""
    record = with_data(fixture("hubspot_deal_with_company.json"), company=None, contacts=[])

    with pytest.raises(MappingError) as caught:
        example.map_deal(record, defaults=BERLIN)

    assert caught.value.place == f"{EXAMPLE}:{line_of(EXAMPLE, 'legal_name =')} [client].legal_name"
    message = caught.value.message
    assert message.startswith("no value for legal_name: ")
    for path in ("company.properties.legal_name", "company.properties.name", "contact.properties.firstname"):
        assert f'path "{path}" not found on deal 8812' in message


def test_a_line_item_price_that_is_not_a_number_names_the_item(example: PipelineMapping) -> None:
    """A price of "1,500.00" fails the line's unit_price, naming the line item and the deal."""
    record = fixture("hubspot_deal_with_company.json")
    items = [dict(item) for item in record.data["line_items"]]
    items[1] = {**items[1], "properties": {**items[1]["properties"], "price": "1,500.00"}}

    with pytest.raises(MappingError) as caught:
        example.map_deal(with_data(record, line_items=items), defaults=BERLIN)

    line = line_of(EXAMPLE, "unit_price =")
    assert caught.value.place == f"{EXAMPLE}:{line} [engagement.lines].unit_price"
    assert '"1,500.00" is not a plain decimal number' in caught.value.message
    assert "item 7002 of line_items on deal 8812" in caught.value.message


def test_a_float_price_in_a_record_is_refused(example: PipelineMapping) -> None:
    """A line-item price that arrives as a float is refused rather than rounded into Decimal."""
    record = fixture("hubspot_deal_with_company.json")
    items = [dict(item) for item in record.data["line_items"]]
    items[0] = {**items[0], "properties": {**items[0]["properties"], "price": 2500.1}}

    with pytest.raises(MappingError, match="is a float"):
        example.map_deal(with_data(record, line_items=items), defaults=BERLIN)


def test_a_lookup_without_default_names_the_unknown_key(tmp_path: Path) -> None:
    """A stage missing from a lookup table without default raises, listing the known keys."""
    path = write(
        tmp_path,
        MINIMAL.replace(
            'type = "one_time"', 'type = { lookup = "deal.properties.dealstage", table = { won = "hourly" } }'
        )
        + '\n[accounts]\ndefault = "200"\n',
    )
    mapping = load_mapping(path)
    record = fixture("hubspot_deal_with_company.json")

    with pytest.raises(MappingError) as caught:
        mapping.map_deal(record, defaults=BERLIN)

    assert caught.value.place == f"{path}:9 [engagement].type"
    assert '"closedwon"' in caught.value.message
    assert "known keys: won" in caught.value.message


def test_an_invalid_mapped_currency_is_a_record_error(tmp_path: Path) -> None:
    """A deal currency that is not ISO 4217 fails [client].currency for that record."""
    text = MINIMAL.replace(
        'legal_name = { path = "company.properties.legal_name" }',
        'legal_name = { path = "company.properties.legal_name" }\ncurrency = { path = "deal.properties.deal_currency_code" }',
    )
    path = write(tmp_path, text)
    mapping = load_mapping(path)
    record = with_deal_properties(fixture("hubspot_deal_with_company.json"), deal_currency_code="EURO")

    with pytest.raises(MappingError) as caught:
        mapping.map_deal(record, defaults=BERLIN)

    assert caught.value.place == f"{path}:7 [client].currency"
    assert (
        caught.value.message == "\"EURO\" is not a valid currency: not an ISO 4217 currency code: 'EURO' on deal 8812"
    )


# ---------------------------------------------------------------------------
# Load-time validation
# ---------------------------------------------------------------------------

MANY_MISTAKES = """\
[pipeline]
won = { path = "deal.properties.hs_is_closed_won", equals = true }
won_at = { datetime = "deal.properties.closedate" }
colour = "blue"

[client]
currency = "EURO"
payment_terms_days = { integer = "company.properties.payment_terms_days", default = -5 }
tax_id = { path = "compnay.properties.tax_id" }
legal_nme = { path = "company.properties.name" }

[engagement]
type = { lookpu = "deal.properties.billing_type", table = { a = "one_time" } }
cycle = "weekly"
po_number = { coalesce = [
  { path = "deal.properties.po_number" },
  { pth = "company.properties.default_po_number" },
] }
key = "hubspot:deal:1"

[engagement.lines]
description = { path = "item.properties.name" }
quantity = { number = "item.properties.quantity" }
unit_price = { money = "item.propertes.price" }
account_code = { lookup = "item.properties.hs_sku", table = "acount_codes" }

[invoice]
status = "sent"

[tables.account_codes]
X = "200"
"""


def test_a_file_with_many_mistakes_lists_them_all_with_line_and_key(tmp_path: Path) -> None:
    """Every mistake in a mapping file is listed at once, each with its line number and key."""
    path = write(tmp_path, MANY_MISTAKES)

    with pytest.raises(MappingError) as caught:
        load_mapping(path)

    expected = [
        f'{path}:4 [pipeline].colour: unknown key "colour"',
        f'{path}:6 [client].legal_name: missing required key "legal_name"',
        f"{path}:7 [client].currency: \"EURO\" is not a valid currency: not an ISO 4217 currency code: 'EURO'",
        f"{path}:8 [client].payment_terms_days: -5 is not a valid payment_terms_days: -5 is negative",
        f'{path}:9 [client].tax_id: path "compnay.properties.tax_id": unknown root "compnay" (did you mean "company"?);'
        " roots here: company, contact, contacts, deal, defaults, line_items, record",
        f'{path}:10 [client].legal_nme: unknown key "legal_nme" (did you mean "legal_name"?); [client] takes:'
        " account_code, address, billing_contact, currency, legal_name, payment_terms_days, po_number, tax_id,"
        " tax_type, timezone",
        f'{path}:12 [engagement].name: missing required key "name"',
        f'{path}:13 [engagement].type: unknown transform "lookpu" (did you mean "lookup"?)',
        f"{path}:14 [engagement].cycle: \"weekly\" is not a valid cycle: Input should be 'monthly', 'quarterly' or"
        " 'yearly'",
        f'{path}:17 [engagement].po_number.coalesce[1]: unknown transform "pth" (did you mean "path"?)',
        f'{path}:19 [engagement].key: "key" is set by syncd and cannot be mapped; remove it',
        f'{path}:24 [engagement.lines].unit_price: path "item.propertes.price": item has no "propertes" (did you mean'
        ' "properties"?); it has: id, properties',
        f'{path}:25 [engagement.lines].account_code: lookup table "acount_codes" is not defined (did you mean'
        ' "account_codes"?); add [tables.acount_codes]',
        f"{path}:28 [invoice].status: Input should be 'draft' or 'authorised' (got \"sent\")",
    ]
    assert caught.value.problems == expected
    assert str(caught.value).startswith(f"{path}: {len(expected)} problem(s); fix them and load again:\n  {path}:4 ")


def test_lookup_table_values_are_checked_against_the_field_type(tmp_path: Path) -> None:
    """A lookup table value that is not an engagement type is caught at load, at its key."""
    path = write(
        tmp_path,
        MINIMAL.replace('type = "one_time"', 'type = { lookup = "deal.properties.billing_type", table = "kinds" }')
        + '\n[tables.kinds]\nfixed = "onetime"\nretainer = "retainer"\n',
    )

    with pytest.raises(MappingError) as caught:
        load_mapping(path)

    (problem,) = caught.value.problems
    assert problem.startswith(f'{path}:9 [engagement].type: "onetime" is not a valid type: Input should be ')


def test_problems_inside_nested_tables_point_at_their_own_line(tmp_path: Path) -> None:
    """A bad item in a multi-line coalesce is reported on the item's line, with its index."""
    path = write(
        tmp_path,
        MINIMAL.replace(
            'legal_name = { path = "company.properties.legal_name" }',
            'legal_name = { coalesce = [\n  { path = "company.properties.legal_name" },\n\n  { template = "{x:>10}" },\n] }',
        ),
    )

    with pytest.raises(MappingError) as caught:
        load_mapping(path)

    assert caught.value.problems == [
        f'{path}:9 [client].legal_name.coalesce[1]: invalid path "x:>10": "x:>10" is not a name, an index or name[*]'
    ]


def test_a_bare_string_that_looks_like_a_path_is_refused(tmp_path: Path) -> None:
    """legal_name = "company.properties.name" is refused with a hint to write a path table."""
    path = write(tmp_path, MINIMAL.replace('{ path = "company.properties.legal_name" }', '"company.properties.name"'))

    with pytest.raises(MappingError) as caught:
        load_mapping(path)

    assert caught.value.problems == [
        f'{path}:6 [client].legal_name: "company.properties.name" looks like a path; write '
        '{ path = "company.properties.name" } (or { const = "company.properties.name" } for the text)'
    ]


def test_missing_and_unknown_top_level_tables_are_reported(tmp_path: Path) -> None:
    """A file without [client] and with a misspelt table reports both."""
    text = MINIMAL.replace('[client]\nlegal_name = { path = "company.properties.legal_name" }\n', "[clinet]\n")
    path = write(tmp_path, text)

    with pytest.raises(MappingError) as caught:
        load_mapping(path)

    assert caught.value.problems == [
        f"{path}:1: missing table [client]",
        f'{path}:5 clinet: unknown table [clinet] (did you mean "client"?); expected: accounts, client,'
        " engagement, invoice, pipeline, tables, tax_types, tracking",
    ]


def test_toml_syntax_errors_name_the_line(tmp_path: Path) -> None:
    """A TOML syntax error is a MappingError naming the file and line."""
    path = write(tmp_path, MINIMAL.replace('type = "one_time"', "type = one_time"))

    with pytest.raises(MappingError) as caught:
        load_mapping(path)

    assert str(caught.value).startswith(f"{path}:9: not valid TOML: ")


def test_an_unreadable_file_is_a_mapping_error(tmp_path: Path) -> None:
    """A mapping path that does not exist raises MappingError, not OSError."""
    with pytest.raises(MappingError, match="cannot read mapping file"):
        load_mapping(tmp_path / "missing.toml")


# ---------------------------------------------------------------------------
# The engagement table is generic over the model's fields
# ---------------------------------------------------------------------------


def test_any_engagement_field_is_mapped_by_a_key(tmp_path: Path) -> None:
    """Fields without dedicated code (cycle, anchor_day, start, end, amount, cap_hours) map by key."""
    path = write(
        tmp_path,
        MINIMAL
        + 'cycle = "monthly"\n'
        + 'anchor_day = { integer = "deal.properties.anchor" }\n'
        + 'start = { date = "deal.properties.start_date" }\n'
        + 'end = "2024-12-31"\n'
        + 'amount = { money = "deal.properties.amount", round = true }\n'
        + "cap_hours = 40\n",
    )
    mapping = load_mapping(path)
    record = with_deal_properties(
        fixture("hubspot_deal_with_company.json"), anchor="15", start_date="1704067200000", amount="1999.999"
    )

    engagement = mapping.map_deal(record, defaults=NEW_YORK).engagement

    assert (engagement.cycle, engagement.anchor_day) == ("monthly", 15)
    assert (engagement.start, engagement.end) == (datetime(2024, 1, 1).date(), datetime(2024, 12, 31).date())
    assert engagement.amount == Decimal("2000.00")
    assert str(engagement.amount) == "2000.00"
    assert engagement.cap_hours == Decimal(40)
    assert engagement.currency == "CAD"


def test_billing_contact_falls_back_to_the_primary_contact(example: PipelineMapping) -> None:
    """Without a contact carrying the label, the primary contact is the billing contact."""
    record = fixture("hubspot_deal_with_company.json")
    contacts = [{**contact, "labels": []} for contact in record.data["contacts"]]

    client = example.map_deal(with_data(record, contacts=contacts), defaults=BERLIN).client

    assert client.billing_contact == Contact(
        name="Dana Reyes", first_name="Dana", last_name="Reyes", email="dana@northwind.example"
    )
    assert client.key == "hubspot:company:501"


def test_a_deal_without_company_or_contacts_is_keyed_by_the_deal(tmp_path: Path) -> None:
    """With neither company nor contact, the client key falls back to the deal."""
    path = write(tmp_path, MINIMAL.replace('{ path = "company.properties.legal_name" }', '"Walk-in customer"'))
    mapping = load_mapping(path)
    record = with_data(fixture("hubspot_deal_with_company.json"), company=None, contacts=[])

    mapped = mapping.map_deal(record, defaults=BERLIN)

    assert mapped.client.key == "hubspot:deal:8812"
    assert mapped.client.legal_name == "Walk-in customer"
    assert mapped.client.currency == "USD"
    assert mapped.client.payment_terms_days == 30


def test_a_list_field_of_the_model_maps_as_a_repeated_table(tmp_path: Path) -> None:
    """A tuple-of-models Engagement field (milestones) maps per item with its own each."""
    path = write(
        tmp_path,
        MINIMAL
        + "\n[engagement.milestones]\n"
        + 'each = "line_items"\n'
        + 'id = { path = "item.id" }\n'
        + 'name = { path = "item.properties.name" }\n'
        + 'amount = { money = "item.properties.price" }\n',
    )
    mapping = load_mapping(path)

    milestones = mapping.map_deal(fixture("hubspot_deal_with_company.json"), defaults=BERLIN).engagement.milestones

    assert [(m.id, m.name, m.amount) for m in milestones] == [
        ("7001", "Discovery workshop", Decimal("2500.00")),
        ("7002", "Build sprint", Decimal("2500.005")),
    ]


def test_a_milestone_done_on_a_line_item_is_refused_at_load(tmp_path: Path) -> None:
    """A milestone's done_at read from a line item property is refused: syncd never hears of such a change."""
    path = write(
        tmp_path,
        MINIMAL
        + "\n[engagement.milestones]\n"
        + 'each = "line_items"\n'
        + 'id = { path = "item.id" }\n'
        + 'name = { path = "item.properties.name" }\n'
        + 'amount = { money = "item.properties.price" }\n'
        + 'done_at = { datetime = "item.properties.milestone_done_at" }\n',
    )

    with pytest.raises(MappingError) as caught:
        load_mapping(path)

    (problem,) = caught.value.problems
    assert problem.startswith(f"{path}:17 [engagement.milestones].done_at:")
    assert "cannot be marked done on a line item" in problem
    deal_property = path.read_text(encoding="utf-8").replace(
        "item.properties.milestone_done_at", "deal.properties.closedate"
    )
    path.write_text(deal_property, encoding="utf-8")
    assert load_mapping(path).source_properties["deal"]


def test_a_repeated_table_other_than_lines_needs_each(tmp_path: Path) -> None:
    """Only [engagement.lines] defaults its list to line_items; others must name theirs."""
    path = write(tmp_path, MINIMAL + '\n[engagement.milestones]\nid = { path = "item.id" }\n')

    with pytest.raises(MappingError) as caught:
        load_mapping(path)

    assert caught.value.problems == [
        f'{path}:12 [engagement.milestones].each: missing required key "each": the path of the list to repeat over'
    ]


def test_a_line_item_without_quantity_is_an_error_not_skipped(example: PipelineMapping) -> None:
    """The worked example skips zero-quantity items but fails an item that has no quantity."""
    record = fixture("hubspot_deal_with_company.json")
    items = [dict(item) for item in record.data["line_items"]]
    items[0] = {**items[0], "properties": {k: v for k, v in items[0]["properties"].items() if k != "quantity"}}

    with pytest.raises(MappingError) as caught:
        example.map_deal(with_data(record, line_items=items), defaults=BERLIN)

    assert caught.value.place == f"{EXAMPLE}:{line_of(EXAMPLE, 'quantity =')} [engagement.lines].quantity"
    assert caught.value.message.startswith('path "item.properties.quantity" not found on item 7001 of line_items')


TRICKY = '''\
# a comment with [brackets] and key = "value"
[pipeline]
won = { path = "deal.properties.dealstage", equals = "closedwon" }  # trailing [x]
won_at = { datetime = "deal.properties.closedate" }

[client]
legal_name = { template = """
{company.properties.name} = [not a table]
""" }
"po.number" = 'literal \\ string'
tax_id = { path = 'company.properties.tax_id' }

[engagement]
type = "one_time"
name = { coalesce = [
  "a,b", # comment ]
  { paht = "deal.properties.dealname" },
] }
'''


def test_line_numbers_survive_multi_line_strings_quoted_keys_and_comments(tmp_path: Path) -> None:
    """Keys after multi-line strings, quoted dotted keys and bracketed comments keep their lines."""
    path = write(tmp_path, TRICKY)

    with pytest.raises(MappingError) as caught:
        load_mapping(path)

    assert caught.value.problems == [
        f'{path}:10 [client]."po.number": unknown key "po.number" (did you mean "po_number"?); [client] takes:'
        " account_code, address, billing_contact, currency, legal_name, payment_terms_days, po_number, tax_id, tax_type,"
        " timezone",
        f'{path}:17 [engagement].name.coalesce[1]: unknown transform "paht" (did you mean "path"?)',
    ]


# ---------------------------------------------------------------------------
# Ledger codes and the deal line
# ---------------------------------------------------------------------------

HOURLY_MINIMAL = MINIMAL.replace('type = "one_time"', 'type = "hourly"')


def test_accounts_and_tax_types_tables_become_the_ledger_rules(tmp_path: Path) -> None:
    """[accounts] and [tax_types] compile to ledger rules; their codes are target codes at their keys."""
    path = write(
        tmp_path,
        HOURLY_MINIMAL
        + '\n[accounts]\ndefault = "200"\nby_line_kind = { hours = "260" }\n'
        + '\n[tax_types]\nby_engagement_type = { hourly = "OUTPUT" }\n',
    )
    mapping = load_mapping(path)
    assert mapping.ledger.accounts.default == "200"
    assert dict(mapping.ledger.accounts.by_line_kind) == {"hours": "260"}
    assert dict(mapping.ledger.tax_types.by_engagement_type) == {"hourly": "OUTPUT"}
    assert [(code.kind, code.code, code.place) for code in mapping.target_codes] == [
        ("account_code", "200", f"{path}:13 [accounts].default"),
        ("account_code", "260", f"{path}:14 [accounts].by_line_kind.hours"),
        ("tax_type", "OUTPUT", f"{path}:17 [tax_types].by_engagement_type.hourly"),
    ]


def test_a_mapping_whose_generated_lines_get_no_account_code_is_refused_at_load(tmp_path: Path) -> None:
    """An hourly mapping with no [accounts] default nor entry for hours lines is a load error naming [accounts]."""
    with pytest.raises(MappingError) as caught:
        load_mapping(write(tmp_path, HOURLY_MINIMAL + '\n[accounts]\nby_line_kind = { deposit = "200" }\n'))
    (problem,) = caught.value.problems
    assert (
        "pipeline.toml:12 [accounts]: no account code for the lines syncd makes of hourly engagements: hours" in problem
    )
    load_mapping(write(tmp_path, HOURLY_MINIMAL + '\n[accounts]\nby_engagement_type = { hourly = "200" }\n'))
    client_code = HOURLY_MINIMAL.replace(
        'legal_name = { path = "company.properties.legal_name" }',
        'legal_name = { path = "company.properties.legal_name" }\naccount_code = "260"',
    )
    assert load_mapping(write(tmp_path, client_code)).ledger.accounts.default is None


def test_unknown_line_kinds_and_engagement_types_in_accounts_are_reported_with_their_line(tmp_path: Path) -> None:
    """by_line_kind and by_engagement_type keys are checked, with a hint."""
    path = write(
        tmp_path,
        MINIMAL
        + '\n[accounts]\ndefault = "200"\nby_line_kind = { hour = "200" }\nby_engagement_type = { retainr = "200" }\n',
    )
    with pytest.raises(MappingError) as caught:
        load_mapping(path)
    assert caught.value.problems == [
        f'{path}:14 [accounts].by_line_kind: "hour" is not a known line kind (did you mean "hours"?); line kinds: adjustment,'
        " credit, deal, deduction, deposit, hours, item, milestone, period, proration",
        f'{path}:15 [accounts].by_engagement_type: "retainr" is not a known engagement type (did you mean "retainer"?);'
        " engagement types: hourly, milestone, one_time, retainer, subscription",
    ]


def test_a_client_account_code_and_tax_type_are_mapped_from_the_company(tmp_path: Path) -> None:
    """[client].account_code / tax_type read company properties onto the client."""
    text = MINIMAL.replace(
        'legal_name = { path = "company.properties.legal_name" }',
        'legal_name = { path = "company.properties.legal_name" }\n'
        'account_code = { path = "company.properties.xero_account_code" }\n'
        'tax_type = { path = "company.properties.xero_tax_type" }',
    )
    mapping = load_mapping(write(tmp_path, text))
    record = fixture("hubspot_deal_with_company.json")
    company = record.data["company"]
    record = with_data(
        record,
        company={
            **company,
            "properties": {**company["properties"], "xero_account_code": "260", "xero_tax_type": "NONE"},
        },
    )
    client = mapping.map_deal(record, defaults=BERLIN).client
    assert (client.account_code, client.tax_type) == ("260", "NONE")
    assert mapping.ledger.client_places["account_code"].endswith("pipeline.toml:7 [client].account_code")


def test_a_deal_without_line_items_is_billed_as_one_line_from_the_deal(example: PipelineMapping) -> None:
    """[engagement.lines.otherwise] makes one "deal" line from the deal's name and amount when it has no items."""
    record = with_deal_properties(fixture("hubspot_deal_with_company.json"), billing_type="fixed_fee")
    bare = with_data(record, line_items=[])
    (line,) = example.map_deal(bare, defaults=BERLIN).engagement.lines
    assert line == InvoiceLine(
        description="Northwind website rebuild", quantity=Decimal(1), unit_price=Decimal("12500.00"), kind="deal"
    )
    with_items = example.map_deal(record, defaults=BERLIN).engagement.lines
    assert [item.kind for item in with_items] == ["item", "item"]


def test_the_line_kind_cannot_be_mapped(tmp_path: Path) -> None:
    """kind is set by syncd: mapping it in [engagement.lines] is refused."""
    text = EXAMPLE.read_text(encoding="utf-8").replace(
        'item_code = { path = "item.properties.hs_sku" }',
        'item_code = { path = "item.properties.hs_sku" }\nkind = "deal"',
    )
    with pytest.raises(MappingError, match=r'\[engagement.lines\].kind: "kind" is set by syncd and cannot be mapped'):
        load_mapping(write(tmp_path, text))


def test_tracking_maps_category_options_onto_the_engagement_and_lists_its_constants(tmp_path: Path) -> None:
    """[tracking] maps a category to an option per deal; constants are target codes "Category/Option"."""
    text = (
        MINIMAL
        + '\n[tracking]\nRegion = { lookup = "deal.properties.pipeline", table = { default = "North" }, default = "South" }\n'
    )
    path = write(tmp_path, text)
    mapping = load_mapping(path)
    record = fixture("hubspot_deal_with_company.json")
    engagement = mapping.map_deal(record, defaults=BERLIN).engagement
    assert engagement.tracking == (TrackingOption(name="Region", option="North"),)
    other = mapping.map_deal(with_deal_properties(record, pipeline="partners"), defaults=BERLIN).engagement
    assert other.tracking == (TrackingOption(name="Region", option="South"),)
    assert [(code.kind, code.code) for code in mapping.target_codes] == [
        ("tracking", "Region/North"),
        ("tracking", "Region/South"),
    ]
    three = MINIMAL + '\n[tracking]\nA = "x"\nB = "y"\nC = "z"\n'
    with pytest.raises(MappingError, match=r"\[tracking\]: 3 tracking categories; a line takes at most 2"):
        load_mapping(write(tmp_path, three))
