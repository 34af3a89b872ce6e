"""Which pipeline takes a deal: static disjointness and run-time choice (syncd/engine/selectors.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from syncd.core.errors import MappingError
from syncd.core.interfaces import SourceRecord
from syncd.core.mapping import PipelineMapping, load_mapping
from syncd.engine.selectors import choose, disjoint, possible_overlaps, stored_overlaps, taking
from tests.harness import stack

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "mappings").glob("*.toml"))
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "hubspot_deal_with_company.json"
FIXED = REPO / "mappings" / "hubspot-xero.toml"
RETAINER = REPO / "mappings" / "hubspot-xero-retainer.toml"

BASE = """\
[pipeline]
{when}
won = {{ path = "deal.properties.dealstage", equals = "closedwon" }}
won_at = {{ datetime = "deal.properties.closedate" }}

[client]
legal_name = {{ path = "company.properties.legal_name" }}

[engagement]
type = "one_time"
name = {{ path = "deal.properties.dealname" }}
"""


def pipeline(tmp_path: Path, name: str, when: str) -> PipelineMapping:
    path = tmp_path / f"{name}.toml"
    path.write_text(BASE.format(when=f"when = {when}" if when else ""), encoding="utf-8")
    return load_mapping(path)


def deal(**properties: Any) -> SourceRecord:
    record = SourceRecord.model_validate(json.loads(FIXTURE.read_text(encoding="utf-8")))
    data = dict(record.data)
    data["deal"] = {**data["deal"], "properties": {**data["deal"]["properties"], **properties}}
    return record.model_copy(update={"data": data})


def test_the_shipped_mappings_are_proven_disjoint() -> None:
    """The three worked examples test billing_type with exclusive equals/in values, so none overlap."""
    mappings = [load_mapping(path) for path in SHIPPED]
    assert len(mappings) == 3
    assert possible_overlaps(mappings) == []
    for billing_type in ("fixed_fee", "retainer", "subscription", "time_and_materials", None):
        assert len(taking(mappings, deal(billing_type=billing_type))) == 1


@pytest.mark.parametrize(
    ("first", "second", "apart"),
    [
        ('{ path = "deal.properties.kind", equals = "a" }', '{ path = "deal.properties.kind", in = ["b", "c"] }', True),
        ('{ path = "deal.properties.kind", in = ["a", "b"] }', '{ path = "deal.properties.kind", in = ["b"] }', False),
        (
            '{ not = { path = "deal.properties.kind", in = ["a", "b"] } }',
            '{ all = [ { path = "deal.properties.x", equals = "y" }, { path = "deal.properties.kind", equals = "a" } ] }',
            True,
        ),
        (
            '{ not = { path = "deal.properties.kind", in = ["a"] } }',
            '{ path = "deal.properties.kind", in = ["a", "b"] }',
            False,
        ),
        ('{ path = "deal.properties.kind", equals = "a" }', '{ path = "deal.properties.other", equals = "b" }', False),
        (
            '{ any = [ { path = "deal.properties.kind", equals = "a" } ] }',
            '{ path = "deal.properties.kind", equals = "b" }',
            False,
        ),
        (
            '{ path = "line_items[*].properties.sku", equals = "a" }',
            '{ path = "line_items[*].properties.sku", equals = "b" }',
            False,
        ),
        ("", '{ path = "deal.properties.kind", equals = "b" }', False),
    ],
)
def test_disjointness_is_proven_only_from_exclusive_equals_and_in(
    tmp_path: Path, first: str, second: str, apart: bool
) -> None:
    """Exclusive sets on one single-valued path prove it; anything else (any, lists, other paths) does not."""
    one, two = pipeline(tmp_path, "one", first), pipeline(tmp_path, "two", second)
    assert disjoint(one, two) is apart
    assert disjoint(two, one) is apart
    assert (possible_overlaps([one, two]) == []) is apart


def test_a_deal_taken_by_two_pipelines_is_refused_naming_both_places(tmp_path: Path) -> None:
    """choose() returns the one pipeline taking a deal, and raises naming every file:line when two do."""
    one = pipeline(tmp_path, "one", '{ path = "deal.properties.pipeline", equals = "default" }')
    two = pipeline(tmp_path, "two", '{ path = "deal.properties.billing_type", equals = "retainer" }')
    assert choose([one, two], deal(billing_type="fixed_fee")) is one
    assert choose([one, two], deal(pipeline="other", billing_type="x")) is None
    with pytest.raises(MappingError) as caught:
        choose([one, two], deal(billing_type="retainer"))
    assert caught.value.place == f"{tmp_path / 'one.toml'}:2 [pipeline].when"
    assert f"{tmp_path / 'two.toml'}:2 [pipeline].when" in caught.value.message
    assert "taken by 2 pipelines" in caught.value.message
    (overlap,) = possible_overlaps([one, two])
    assert "possibly overlapping" in str(overlap)


async def test_check_names_stored_deals_two_pipelines_both_take(tmp_path: Path, db_url: str) -> None:
    """stored_overlaps evaluates both selectors of a possible overlap against the stored deals and names them."""
    open_ended = tmp_path / "everything.toml"
    text = FIXED.read_text(encoding="utf-8")
    start = text.index("when = { all = [")
    end = text.index("] }\n", start) + len("] }\n")
    open_ended.write_text(
        text[:start] + 'when = { path = "deal.properties.dealname", exists = true }\n' + text[end:], encoding="utf-8"
    )
    extra = f'\n[[pipelines]]\ncrm = "hubspot"\ninvoicing = "xero"\nmapping = "{RETAINER}"\n'
    extra += f'\n[[pipelines]]\ncrm = "hubspot"\ninvoicing = "xero"\nmapping = "{open_ended}"\n'
    async with stack(tmp_path, db_url, extra=extra) as s:
        retainer = s.hub.add_deal({"dealname": "Care plan", "billing_type": "retainer", "pipeline": "default"})
        await s.daemon.engine.process_deal(s.daemon.runtime.pipelines[0], retainer)
        overlaps = await stored_overlaps(s.daemon.runtime)
    assert [(overlap.first.path, overlap.second.path, overlap.records) for overlap in overlaps] == [
        (FIXED, open_ended, ()),
        (RETAINER, open_ended, (retainer,)),
    ]
    assert f"both take 1 stored record(s) ({retainer})" in str(overlaps[1])
