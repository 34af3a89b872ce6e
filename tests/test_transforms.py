"""The mapping vocabulary: each transform and condition (syncd/core/transforms.py)."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from syncd.core.errors import MappingError
from syncd.core.money import minor_units, round_money
from syncd.core.transforms import (
    Cond,
    Condition,
    Const,
    Context,
    Lookup,
    PathRef,
    Transform,
    Value,
    absent,
    parse_path,
    walk,
)

VALUE: TypeAdapter[Transform] = TypeAdapter(Value)
CONDITION: TypeAdapter[Condition] = TypeAdapter(Cond)
ZONES = (
    "UTC",
    "America/New_York",
    "America/Los_Angeles",
    "America/St_Johns",
    "America/Sao_Paulo",
    "Europe/Berlin",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Australia/Lord_Howe",
    "Pacific/Kiritimati",
    "Pacific/Pago_Pago",
    "Pacific/Chatham",
)
CURRENCIES = ("USD", "EUR", "JPY", "KWD", "CLF", "BHD", "ISK")


def context(**roots: Any) -> Context:
    base: dict[str, Any] = {"deal": {"id": "8812", "properties": {}}, "company": None, "contacts": [], "line_items": []}
    return Context(roots={**base, **roots}, subject="deal 8812", place="m.toml:3 [client].x", currency="USD")


def deal(**properties: Any) -> Context:
    return context(deal={"id": "8812", "properties": properties})


def value(raw: Any) -> Transform:
    return VALUE.validate_python(raw)


def condition(raw: Any) -> Condition:
    return CONDITION.validate_python(raw)


def problems(adapter: TypeAdapter[Any], raw: Any) -> list[tuple[tuple[Any, ...], str]]:
    with pytest.raises(ValidationError) as caught:
        adapter.validate_python(raw)
    return [(tuple(error["loc"]), error["msg"]) for error in caught.value.errors()]


# ---------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------


def test_paths_split_into_names_indexes_and_all_items() -> None:
    """A path parses into names, list indexes (.0 or [0]) and the every-item step."""
    assert parse_path("deal.properties.amount") == ("deal", "properties", "amount")
    assert parse_path("line_items.0.properties.name") == ("line_items", 0, "properties", "name")
    assert parse_path("line_items[1].properties.name") == ("line_items", 1, "properties", "name")
    assert parse_path("line_items[*].properties.name") == ("line_items", "*", "properties", "name")
    with pytest.raises(ValueError, match="is not a name"):
        parse_path("deal..x")
    with pytest.raises(ValueError, match="must start with a name"):
        parse_path("0.x")


def test_path_reads_nested_values_and_lists() -> None:
    """path reads properties, indexed items and every item's value."""
    ctx = context(
        deal={"id": "8812", "properties": {"dealname": "Rebuild"}},
        line_items=[{"properties": {"hs_sku": "A"}}, {"properties": {}}, {"properties": {"hs_sku": "C"}}],
    )

    assert value({"path": "deal.properties.dealname"}).apply(ctx) == "Rebuild"
    assert value({"path": "deal.id"}).apply(ctx) == "8812"
    assert value({"path": "line_items.2.properties.hs_sku"}).apply(ctx) == "C"
    assert value({"path": "line_items[*].properties.hs_sku"}).apply(ctx) == ["A", "C"]
    assert value({"path": "line_items.9.properties.hs_sku"}).apply(ctx) is None
    assert value({"path": "company.properties.name"}).apply(ctx) is None


def test_missing_paths_are_explained_with_what_is_there() -> None:
    """A missing path names the known properties, an empty parent, or a too-short list."""
    ctx = context(deal={"id": "8812", "properties": {"name": "x", "domain": "d", "blank": None}})

    assert ctx.explain("deal.properties.legal_name") == (
        'path "deal.properties.legal_name" not found on deal 8812; known properties: blank, domain, name'
    )
    assert ctx.explain("deal.properties.blank") == 'path "deal.properties.blank" is empty on deal 8812'
    assert ctx.explain("company.properties.name") == (
        'path "company.properties.name" not found on deal 8812; "company" is empty'
    )
    assert ctx.explain("line_items.3.id") == 'path "line_items.3.id" not found on deal 8812; "line_items" has 0 items'


def test_absent_covers_none_blank_text_and_empty_lists() -> None:
    """None, blank text and empty lists are absent; zero and false are values."""
    empty: list[Any] = [None, "", "  ", [], ()]
    present: list[Any] = [0, False, "0", Decimal(0), ["a"]]
    assert all(absent(item) for item in empty)
    assert not any(absent(item) for item in present)


# ---------------------------------------------------------------------------
# const, default, coalesce
# ---------------------------------------------------------------------------


def test_bare_values_are_constants_and_const_tables_too() -> None:
    """A bare TOML value and { const = ... } are constants."""
    assert value("one_time").apply(context()) == "one_time"
    assert value(30).apply(context()) == 30
    assert value({"const": "deal.properties.x"}).apply(context()) == "deal.properties.x"
    assert isinstance(value(Decimal("1.50")), Const)


def test_default_fills_an_absent_value_only() -> None:
    """default applies when the transform yields nothing, and not otherwise."""
    transform = value({"path": "deal.properties.terms", "default": 30})

    assert transform.apply(deal()) == 30
    assert transform.apply(deal(terms="")) == 30
    assert transform.apply(deal(terms="14")) == "14"
    nested = value({"path": "deal.properties.code", "default": {"path": "defaults.currency"}})
    assert nested.apply(context(defaults={"currency": "EUR"})) == "EUR"


def test_coalesce_takes_the_first_option_with_a_value() -> None:
    """coalesce skips absent options and falls back to a constant."""
    transform = value(
        {"coalesce": [{"path": "company.properties.legal_name"}, {"path": "company.properties.name"}, "Unknown"]}
    )

    assert transform.apply(context(company={"properties": {"legal_name": "", "name": "Acme"}})) == "Acme"
    assert transform.apply(context(company=None)) == "Unknown"


# ---------------------------------------------------------------------------
# lookup
# ---------------------------------------------------------------------------


def test_lookup_maps_through_an_inline_or_named_table() -> None:
    """lookup maps a value through an inline table or a named [tables.NAME] table."""
    inline = value({"lookup": "deal.properties.stage", "table": {"won": "one_time", "retainer": "retainer"}})
    named = value({"lookup": "deal.properties.stage", "table": "kinds"})
    ctx = deal(stage="retainer")

    assert inline.apply(ctx) == "retainer"
    assert named.apply(ctx.derive(tables={"kinds": {"retainer": "hourly"}})) == "hourly"


def test_lookup_without_default_raises_naming_the_key_and_the_table() -> None:
    """A key missing from a lookup table without default is a MappingError at the field."""
    transform = value({"lookup": "deal.properties.stage", "table": {"won": "one_time"}})

    with pytest.raises(MappingError) as caught:
        transform.apply(deal(stage="lost"))

    assert caught.value.place == "m.toml:3 [client].x"
    assert caught.value.message == (
        'lookup: "lost" (from path "deal.properties.stage" on deal 8812) is not in the table; '
        "known keys: won; add it or give the lookup a default"
    )


def test_lookup_can_ignore_case_and_maps_each_item_of_a_list() -> None:
    """ignore_case matches keys in any case, and a list input maps item by item."""
    transform = value(
        {"lookup": "line_items[*].properties.sku", "table": {"sku-a": "200"}, "ignore_case": True, "default": "260"}
    )
    ctx = context(line_items=[{"properties": {"sku": "SKU-A"}}, {"properties": {"sku": "SKU-B"}}])

    assert transform.apply(ctx) == ["200", "260"]


@given(
    key=st.one_of(
        st.text(),
        st.integers(),
        st.decimals(allow_nan=False, allow_infinity=False),
        st.booleans(),
        st.none(),
        st.lists(st.text(), max_size=3),
    )
)
def test_a_lookup_with_a_default_never_raises(key: Any) -> None:
    """Whatever the record holds, a lookup with a default returns a table value or the default."""
    transform = value({"lookup": "deal.properties.k", "table": {"a": "A", "1": "One", "true": "T"}, "default": "D"})

    result = transform.apply(deal(k=key))

    items = result if isinstance(result, list) else [result]
    assert all(item in {"A", "One", "T", "D"} for item in items)


# ---------------------------------------------------------------------------
# template
# ---------------------------------------------------------------------------


def test_template_fills_paths_and_named_values() -> None:
    """template substitutes paths and named values; {{ and }} are literal braces."""
    transform = value(
        {
            "template": "{deal.properties.dealname} for {who} {{ref {record.id}}}",
            "values": {"who": {"path": "company.properties.name"}},
        }
    )
    ctx = context(
        deal={"id": "8812", "properties": {"dealname": "Rebuild"}},
        company={"properties": {"name": "Acme"}},
        record={"id": "8812"},
    )

    assert transform.apply(ctx) == "Rebuild for Acme {ref 8812}"


def test_template_is_absent_when_a_placeholder_has_no_value() -> None:
    """A template with an absent placeholder yields nothing, so a default can apply."""
    transform = value({"template": "{deal.properties.first} {deal.properties.last}", "default": "n/a"})

    assert transform.apply(deal(first="Ann")) == "n/a"


def test_template_format_specs_and_lone_braces_are_refused_at_load() -> None:
    """Format specs, conversions, lone braces and unused values are validation errors."""
    assert problems(VALUE, {"template": "{deal.id:>10}"}) == [
        ((), 'invalid path "deal.id:>10": "id:>10" is not a name, an index or name[*]')
    ]
    assert problems(VALUE, {"template": "{deal.id!r}"})[0][1].startswith('invalid path "deal.id!r"')
    assert problems(VALUE, {"template": "total } here"}) == [
        ((), 'template has a lone "}"; write "}}" for a literal brace')
    ]
    assert problems(VALUE, {"template": "x", "values": {"y": "1"}}) == [((), "values y are not used in the template")]


SAFE_TEXT = st.text(alphabet=st.characters(exclude_characters="{}", exclude_categories=["Cs"]), max_size=20)


@given(
    pieces=st.lists(st.tuples(SAFE_TEXT, st.sampled_from(["a", "b", "c"])), min_size=1, max_size=5),
    values=st.fixed_dictionaries({"a": st.text(min_size=1), "b": st.text(min_size=1), "c": st.text(min_size=1)}),
)
def test_templates_only_substitute_and_never_execute(pieces: list[tuple[str, str]], values: dict[str, str]) -> None:
    """A template's result is its literal text with record values copied in, braces and all."""
    assume(all(text.strip() for text in values.values()))
    template = "".join(f"{literal}{{deal.properties.{name}}}" for literal, name in pieces)
    expected = "".join(literal + values[name].strip() for literal, name in pieces)

    assert value({"template": template}).apply(deal(**values)) == expected


def test_template_placeholders_never_reach_attributes() -> None:
    """Dunder names in placeholders only look up mapping keys, so nothing is reached."""
    transform = value({"template": "{deal.__class__}{deal.properties.__globals__}", "default": "safe"})

    assert transform.apply(deal(x="{deal.id}")) == "safe"
    assert value({"template": "{deal.properties.x}"}).apply(deal(x="{deal.id} {0.__class__}")) == (
        "{deal.id} {0.__class__}"
    )


# ---------------------------------------------------------------------------
# date and datetime
# ---------------------------------------------------------------------------


def test_date_reads_iso_dates_datetimes_and_epoch_milliseconds() -> None:
    """date reads ISO dates, datetimes (in the zone) and millisecond timestamps."""
    berlin = context().derive(timezone="Europe/Berlin")
    transform = value({"date": "deal.properties.d"})

    assert transform.apply(deal(d="2024-03-01")) == date(2024, 3, 1)
    assert transform.apply(berlin.derive(roots={"deal": {"properties": {"d": "2024-03-01T23:30:00Z"}}})) == date(
        2024, 3, 2
    )
    assert transform.apply(berlin.derive(roots={"deal": {"properties": {"d": "2024-03-01T23:30:00"}}})) == date(
        2024, 3, 1
    )
    assert transform.apply(deal(d="1709251200000")) == date(2024, 3, 1)
    assert transform.apply(deal(d=1709294400000)) == date(2024, 3, 1)


def test_date_options_zone_format_and_midnight() -> None:
    """timezone overrides the context's zone, format gives text, midnight UTC may be an instant."""
    ctx = deal(d="2024-03-01T00:00:00Z")

    assert value({"date": "deal.properties.d", "timezone": "America/New_York"}).apply(ctx) == date(2024, 3, 1)
    assert value({"date": "deal.properties.d", "timezone": "America/New_York", "midnight_utc_is_date": False}).apply(
        ctx
    ) == date(2024, 2, 29)
    assert value({"date": "deal.properties.d", "format": "%d %B %Y"}).apply(ctx) == "01 March 2024"


def test_datetime_gives_aware_instants() -> None:
    """datetime keeps instants, reads naive times in the zone, and puts dates at local midnight."""
    zone = ZoneInfo("Asia/Kolkata")
    ctx = context().derive(timezone="Asia/Kolkata")
    transform = value({"datetime": "deal.properties.t"})

    def at(text: str) -> Any:
        return transform.apply(ctx.derive(roots={"deal": {"properties": {"t": text}}}))

    assert at("2024-03-01T10:15:00.500Z") == datetime(2024, 3, 1, 10, 15, 0, 500000, tzinfo=UTC)
    assert at("2024-03-01T10:15:00") == datetime(2024, 3, 1, 10, 15, tzinfo=zone)
    assert at("2024-03-01") == datetime(2024, 3, 1, tzinfo=zone)
    assert at("1709287200123") == datetime(2024, 3, 1, 10, 0, 0, 123000, tzinfo=UTC)


def test_unreadable_dates_are_mapping_errors() -> None:
    """Text that is no date raises a MappingError naming the source path and record."""
    with pytest.raises(MappingError) as caught:
        value({"date": "deal.properties.d"}).apply(deal(d="next tuesday"))

    assert caught.value.message == (
        'date: "next tuesday" is not an ISO date, ISO datetime or millisecond timestamp '
        '(from path "deal.properties.d" on deal 8812)'
    )


DATES = st.dates(min_value=date(1971, 1, 1), max_value=date(2200, 12, 31))
TIMES = st.times()


@given(day=DATES, zone=st.sampled_from(ZONES), moment=TIMES)
def test_dates_keep_the_admins_calendar_date_across_time_zones(day: date, zone: str, moment: time) -> None:
    """The date an admin meant survives any client zone, in every form a CRM sends it."""
    tz = ZoneInfo(zone)
    ctx = context().derive(timezone=zone)
    as_date = value({"date": "deal.properties.d"})
    as_datetime = value({"datetime": "deal.properties.d"})
    midnight_utc = datetime.combine(day, time(), tzinfo=UTC)
    local = datetime.combine(day, moment, tzinfo=tz)
    assume(local.astimezone(UTC).astimezone(tz).replace(tzinfo=None) == local.replace(tzinfo=None))

    def read(transform: Transform, raw: Any) -> Any:
        return transform.apply(ctx.derive(roots={"deal": {"properties": {"d": raw}}}))

    epoch_ms = int((midnight_utc - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(milliseconds=1))
    assert read(as_date, day.isoformat()) == day
    assert read(as_date, str(epoch_ms)) == day
    assert read(as_date, midnight_utc.isoformat().replace("+00:00", "Z")) == day
    assert read(as_date, local.replace(tzinfo=None).isoformat()) == day
    assert read(as_date, local.isoformat()) == day
    assert read(as_datetime, day.isoformat()).astimezone(tz).date() == day
    assert read(as_datetime, str(epoch_ms)).astimezone(tz).date() == day


# ---------------------------------------------------------------------------
# money and numbers
# ---------------------------------------------------------------------------


def test_money_parses_text_exactly_and_rounds_only_when_asked() -> None:
    """money keeps every digit; round rounds half-up to the currency's minor units."""
    assert value({"money": "deal.properties.p"}).apply(deal(p="2500.005")) == Decimal("2500.005")
    assert str(value({"money": "deal.properties.p"}).apply(deal(p="2500.50"))) == "2500.50"
    assert value({"money": "deal.properties.p", "round": True}).apply(deal(p="2500.005")) == Decimal("2500.01")
    assert str(value({"money": "deal.properties.p", "round": True, "currency": "JPY"}).apply(deal(p="1500.5"))) == (
        "1501"
    )
    assert str(value({"money": "deal.properties.p", "round": True, "currency": "KWD"}).apply(deal(p="1.0005"))) == (
        "1.001"
    )


def test_money_of_any_size_rounds_exactly() -> None:
    """An amount with more digits than the default Decimal context holds still rounds half-up exactly."""
    rounded = value({"money": "deal.properties.p", "round": True}).apply(deal(p="9" * 30 + ".995"))
    assert rounded == Decimal("1" + "0" * 30 + ".00")


def test_money_reads_minor_units() -> None:
    """minor_units reads a whole number of cents (or the currency's minor unit)."""
    assert str(value({"money": "deal.properties.p", "minor_units": True}).apply(deal(p="150000"))) == "1500.00"
    assert str(value({"money": "deal.properties.p", "minor_units": True, "currency": "JPY"}).apply(deal(p="1500"))) == (
        "1500"
    )


@pytest.mark.parametrize("raw", [1500.5, "1,500.00", "1e3", "NaN", "abc", True])
def test_money_refuses_floats_and_anything_but_plain_decimals(raw: Any) -> None:
    """money refuses floats, grouping, exponents, NaN, words and booleans."""
    with pytest.raises(MappingError) as caught:
        value({"money": "deal.properties.p"}).apply(deal(p=raw))

    assert caught.value.message.startswith("money: ")
    assert caught.value.message.endswith('(from path "deal.properties.p" on deal 8812)')


def test_money_needs_a_valid_currency() -> None:
    """money checks its currency against ISO 4217 and needs one."""
    with pytest.raises(MappingError, match="not an ISO 4217 currency code"):
        value({"money": "deal.properties.p", "currency": "EURO"}).apply(deal(p="1"))
    with pytest.raises(MappingError, match="no currency"):
        value({"money": "deal.properties.p"}).apply(deal(p="1").derive(currency=None))


@given(amount=st.decimals(allow_nan=False, allow_infinity=False, places=6), currency=st.sampled_from(CURRENCIES))
def test_money_text_round_trips_exactly(amount: Decimal, currency: str) -> None:
    """Any decimal written as text comes back as exactly that Decimal, never a float."""
    text = format(amount, "f")

    result = value({"money": "deal.properties.p", "currency": currency}).apply(deal(p=text))

    assert isinstance(result, Decimal)
    assert format(result, "f") == text


@given(
    amount=st.decimals(min_value=-(10**15), max_value=10**15, allow_nan=False, allow_infinity=False, places=6),
    currency=st.sampled_from(CURRENCIES),
)
def test_rounded_money_has_the_currencys_minor_units(amount: Decimal, currency: str) -> None:
    """round = true gives exactly the currency's minor units, rounded half-up once."""
    result = value({"money": "deal.properties.p", "currency": currency, "round": True}).apply(
        deal(p=format(amount, "f"))
    )

    assert result == round_money(amount, currency)
    assert result.as_tuple().exponent == -minor_units(currency)


@given(cents=st.integers(min_value=-(10**12), max_value=10**12), currency=st.sampled_from(CURRENCIES))
def test_minor_units_keep_their_value(cents: int, currency: str) -> None:
    """An integer of minor units becomes the amount with the currency's places, losing nothing."""
    result = value({"money": "deal.properties.p", "currency": currency, "minor_units": True}).apply(deal(p=str(cents)))

    assert result.as_tuple().exponent == -minor_units(currency)
    assert result.scaleb(minor_units(currency)) == cents


@given(number=st.floats(allow_nan=False))
def test_floats_never_become_money(number: float) -> None:
    """A float from a record is refused by money and number alike."""
    for head in ("money", "number"):
        with pytest.raises(MappingError, match="is a float"):
            value({head: "deal.properties.p"}).apply(deal(p=number))


def test_number_and_integer_parse_text() -> None:
    """number gives Decimals, integer whole numbers; a fraction is not an integer."""
    assert value({"number": "deal.properties.q"}).apply(deal(q="2.50")) == Decimal("2.50")
    assert value({"integer": "deal.properties.q"}).apply(deal(q="30.0")) == 30
    with pytest.raises(MappingError, match=r'"30\.5" is not a whole number'):
        value({"integer": "deal.properties.q"}).apply(deal(q="30.5"))


def test_toml_floats_are_refused_as_constants() -> None:
    """A Python float constant is refused; TOML numbers are read as Decimals instead."""
    assert problems(VALUE, 1.5) == [
        ((), "1.5 is a float; write numbers as TOML numbers (read as exact decimals) or text")
    ]


# ---------------------------------------------------------------------------
# boolean, split, join
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"), [("true", True), ("Yes", True), ("1", True), ("off", False), ("FALSE", False), ("n", False)]
)
def test_boolean_reads_common_spellings(raw: str, expected: bool) -> None:
    """boolean reads true/false, yes/no, 1/0, on/off in any case."""
    assert value({"boolean": "deal.properties.b"}).apply(deal(b=raw)) is expected


def test_boolean_refuses_other_text() -> None:
    """boolean refuses text that is not a boolean."""
    with pytest.raises(MappingError, match='"maybe" is not a boolean'):
        value({"boolean": "deal.properties.b"}).apply(deal(b="maybe"))


def test_split_and_join() -> None:
    """split cuts and trims text, index picks a part; join skips absent parts."""
    ctx = deal(emails="a@x.test; ;b@x.test", first="Ann", last="")

    assert value({"split": "deal.properties.emails", "sep": ";"}).apply(ctx) == ["a@x.test", "b@x.test"]
    assert value({"split": "deal.properties.emails", "sep": ";", "index": -1}).apply(ctx) == "b@x.test"
    assert value({"split": "deal.properties.emails", "sep": ";", "index": 5}).apply(ctx) is None
    joined = value({"join": [{"path": "deal.properties.first"}, {"path": "deal.properties.last"}, "Jr"], "sep": " "})
    assert joined.apply(ctx) == "Ann Jr"
    items = context(line_items=[{"properties": {"name": "A"}}, {"properties": {"name": "B"}}])
    assert value({"join": "line_items[*].properties.name", "sep": " / "}).apply(items) == "A / B"
    assert value({"join": [{"path": "deal.properties.none"}]}).apply(ctx) is None


# ---------------------------------------------------------------------------
# Conditions
# ---------------------------------------------------------------------------


def test_equals_compares_as_the_constants_kind() -> None:
    """equals reads booleans, numbers and dates as the constant's kind; text exactly."""
    ctx = deal(won="true", amount="1500.00", day="2024-03-01", stage="closedwon")

    assert condition({"path": "deal.properties.won", "equals": True}).apply(ctx)
    assert condition({"path": "deal.properties.amount", "equals": 1500}).apply(ctx)
    assert condition({"path": "deal.properties.day", "equals": date(2024, 3, 1)}).apply(ctx)
    assert condition({"path": "deal.properties.stage", "equals": "closedwon"}).apply(ctx)
    assert not condition({"path": "deal.properties.stage", "equals": "ClosedWon"}).apply(ctx)
    assert not condition({"path": "deal.properties.stage", "equals": 1}).apply(ctx)
    assert not condition({"path": "deal.properties.missing", "equals": "x"}).apply(ctx)


def test_in_exists_and_list_subjects() -> None:
    """in matches any option, exists tests presence, and a list matches if any item does."""
    ctx = context(
        deal={"properties": {"stage": "closedwon", "blank": ""}},
        line_items=[{"properties": {"sku": "A"}}, {"properties": {"sku": "B"}}],
    )

    assert condition({"path": "deal.properties.stage", "in": ["won", "closedwon"]}).apply(ctx)
    assert not condition({"path": "deal.properties.stage", "in": ["won"]}).apply(ctx)
    assert condition({"path": "deal.properties.stage", "exists": True}).apply(ctx)
    assert condition({"path": "deal.properties.blank", "exists": False}).apply(ctx)
    assert condition({"path": "line_items[*].properties.sku", "equals": "B"}).apply(ctx)
    assert condition(
        {"value": {"lookup": "deal.properties.stage", "table": {"closedwon": "yes"}}, "equals": True}
    ).apply(ctx)


def test_comparisons_on_numbers_and_dates() -> None:
    """gt/ge/lt/le compare numbers and dates; several bounds make a range."""
    ctx = deal(amount="1500.00", close="2024-03-01T10:00:00Z")

    assert condition({"path": "deal.properties.amount", "gt": 1000, "le": Decimal("1500.00")}).apply(ctx)
    assert not condition({"path": "deal.properties.amount", "lt": 1000}).apply(ctx)
    assert condition({"path": "deal.properties.close", "ge": date(2024, 3, 1)}).apply(ctx)
    assert not condition({"path": "deal.properties.nothing", "gt": 0}).apply(ctx)
    with pytest.raises(MappingError, match=r'"lots" is not a plain decimal number .*, so it cannot be compared with 0'):
        condition({"path": "deal.properties.amount", "gt": 0}).apply(deal(amount="lots"))


def test_all_any_not() -> None:
    """all, any and not combine conditions."""
    ctx = deal(pipeline="default", dealtype="internal")
    in_pipeline = {"path": "deal.properties.pipeline", "equals": "default"}
    internal = {"path": "deal.properties.dealtype", "equals": "internal"}

    assert not condition({"all": [in_pipeline, {"not": internal}]}).apply(ctx)
    assert condition({"any": [{"not": in_pipeline}, internal]}).apply(ctx)
    assert condition({"all": [in_pipeline]}).apply(ctx)


# ---------------------------------------------------------------------------
# Validation of transform tables
# ---------------------------------------------------------------------------


def test_unknown_transforms_and_keys_get_suggestions() -> None:
    """Misspelt transform names and keys are reported at their place with a suggestion."""
    assert problems(VALUE, {"lookpu": "deal.properties.x", "table": {}, "default": "a"}) == [
        ((), 'unknown transform "lookpu" (did you mean "lookup"?)')
    ]
    assert problems(VALUE, {"coalesce": [{"path": "deal.id", "defualt": 1}, {"mony": "deal.id"}]}) == [
        (("coalesce", 0, "defualt"), 'unknown key "defualt" (did you mean "default"?)'),
        (("coalesce", 1), 'unknown transform "mony" (did you mean "money"?)'),
    ]
    assert problems(CONDITION, {"path": "deal.id", "equal": "x"}) == [
        ((), 'unknown condition "equal" (did you mean "equals"?)')
    ]


def test_ambiguous_and_empty_tables_are_refused() -> None:
    """A table naming two transforms, or none, is refused."""
    assert problems(VALUE, {"path": "deal.id", "lookup": "deal.id", "table": {}}) == [
        ((), '"path" and "lookup" name different transforms; use one per table and nest the other inside it')
    ]
    assert problems(VALUE, {"default": 1})[0][1].startswith("no transform named in this table; expected one of: ")
    assert problems(CONDITION, {"path": "deal.id", "equals": 1, "in": [1]})[0][1].startswith('"equals" and "in"')


def test_condition_subjects_and_inputs_are_checked() -> None:
    """A test needs exactly one subject, and inputs must be paths or transforms."""
    assert problems(CONDITION, {"equals": 1}) == [((), 'give exactly one of "path" or "value" to say what is tested')]
    assert problems(VALUE, {"date": 5}) == [(("date",), "expected a path string or a transform table, got 5")]
    assert problems(VALUE, {"date": "deal.id", "timezone": "Mars/Olympus"}) == [
        (("timezone",), '"Mars/Olympus" is not an IANA time zone (like "Europe/Berlin")')
    ]
    assert problems(VALUE, {"coalesce": []})[0][0] == ("coalesce",)


def test_walk_and_paths_find_every_path_read() -> None:
    """walk visits nested transforms, so every path a field reads can be listed."""
    transform = value(
        {
            "coalesce": [
                {"path": "company.properties.legal_name"},
                {"template": "{contact.properties.firstname} {n}", "values": {"n": {"path": "contact.id"}}},
                {"lookup": "deal.properties.kind", "table": {"a": "b"}},
            ]
        }
    )

    paths = [text for node in walk(transform) for text in node.paths()]

    assert paths == [
        "company.properties.legal_name",
        "contact.properties.firstname",
        "contact.id",
        "deal.properties.kind",
    ]
    assert {type(node) for node in walk(transform)} >= {PathRef, Lookup}
