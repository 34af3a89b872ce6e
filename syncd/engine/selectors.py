"""Which pipeline takes a record: its ``[pipeline].when`` selectors, compared. Pure, but for one query.

Several pipelines may read the same CRM (the three worked examples in ``mappings/`` do).
Each deal must be taken by exactly one of them, or it would be billed twice (or, as the
engine does it, dead-lettered). This module proves that statically where it can and says
where it cannot:

* :func:`disjoint` proves two pipelines never take the same record when both test one
  path (without ``[*]``) with ``equals`` or ``in`` whose values cannot both hold: two
  disjoint sets of text, or a set inside another that the other pipeline excludes with
  ``{ not = { ..., in = [...] } }``. Only conditions that must all hold are used (the
  top-level condition or an ``all``); anything else proves nothing.
* :func:`possible_overlaps` lists the pairs it cannot prove disjoint, and
  :func:`stored_overlaps` evaluates both pipelines of each such pair against the deals
  syncd has stored, so ``syncd check`` names real deals taken twice.
* :func:`taking` returns the pipelines that take one record, and :func:`choose` the one
  pipeline, raising :class:`~syncd.core.errors.MappingError` naming every ``file:line`` place
  when several do (the engine's routing dead-letters the record with it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from syncd.core.errors import MappingError
from syncd.core.interfaces import SourceRecord
from syncd.core.transforms import ALL, All, Condition, Equals, In, Not, parse_path

if TYPE_CHECKING:
    from syncd.core.mapping import PipelineMapping
    from syncd.engine.runtime import Runtime

log = structlog.get_logger("syncd.engine.selectors")

STORED_DEALS_CHECKED = 10_000
"""How many stored deals ``syncd check`` evaluates per pair it cannot prove disjoint."""


@dataclass(frozen=True, kw_only=True)
class Constraint:
    """What a selector requires of one path: its text is one of ``values`` (or, negated, none of them)."""

    values: frozenset[str]
    negated: bool = False


def constraints(condition: Condition | None) -> dict[str, list[Constraint]]:
    """The path constraints that must all hold for ``condition`` to hold, by path."""
    found: dict[str, list[Constraint]] = {}
    for path, constraint in _required(condition):
        found.setdefault(path, []).append(constraint)
    return found


def _required(condition: Condition | None) -> Iterable[tuple[str, Constraint]]:
    if isinstance(condition, All):
        for inner in condition.conditions:
            yield from _required(inner)
        return
    negated = isinstance(condition, Not)
    tested = condition.inner if isinstance(condition, Not) else condition
    found = _tested(tested)
    if found is not None:
        yield found[0], Constraint(values=found[1], negated=negated)


def _tested(condition: Condition | None) -> tuple[str, frozenset[str]] | None:
    """``(path, texts)`` of an ``equals``/``in`` on a single-valued path comparing text only."""
    if isinstance(condition, Equals):
        options: Sequence[Any] = [condition.expected]
    elif isinstance(condition, In):
        options = condition.options
    else:
        return None
    path = condition.path
    if path is None or ALL in parse_path(path) or not all(isinstance(option, str) for option in options):
        return None
    return path, frozenset(options)


def _exclusive(first: Constraint, second: Constraint) -> bool:
    """Whether no value satisfies both constraints."""
    if first.negated and second.negated:
        return False
    if not first.negated and not second.negated:
        return not first.values & second.values
    wanted, excluded = (second, first) if first.negated else (first, second)
    return wanted.values <= excluded.values


def disjoint(first: PipelineMapping, second: PipelineMapping) -> bool:
    """Whether no record can be taken by both pipelines, as far as their ``when`` proves."""
    if first.rules.source != second.rules.source:
        return True
    mine, theirs = constraints(first.rules.when), constraints(second.rules.when)
    return any(
        _exclusive(one, other) for path in mine.keys() & theirs.keys() for one in mine[path] for other in theirs[path]
    )


@dataclass(frozen=True, kw_only=True)
class Overlap:
    """Two pipelines that may take the same record.

    Attributes:
        first / second: the two mappings.
        records: ids of stored records both take (empty when only possible).
    """

    first: PipelineMapping
    second: PipelineMapping
    records: tuple[str, ...] = ()

    def __str__(self) -> str:
        places = f"{self.first.rules.when_place} and {self.second.rules.when_place}"
        if self.records:
            shown = ", ".join(self.records[:10]) + (" …" if len(self.records) > 10 else "")
            return (
                f"{places}: both take {len(self.records)} stored record(s) ({shown}); such a deal is dead-lettered. "
                "Make the two `when` conditions exclusive (test the same property with equals/in on one side and "
                "{ not = { ..., in = [...] } } on the other)"
            )
        return (
            f"{places}: possibly overlapping: their `when` conditions do not test one property with exclusive "
            "equals/in values, so a deal could be taken by both"
        )


def possible_overlaps(mappings: Sequence[PipelineMapping]) -> list[Overlap]:
    """Every pair of ``mappings`` that :func:`disjoint` cannot prove disjoint, in order."""
    return [
        Overlap(first=first, second=second)
        for index, first in enumerate(mappings)
        for second in mappings[index + 1 :]
        if not disjoint(first, second)
    ]


def taking(mappings: Iterable[PipelineMapping], record: SourceRecord) -> list[PipelineMapping]:
    """The mappings whose ``[pipeline]`` takes ``record``.

    Raises:
        MappingError: a ``when`` cannot be evaluated on the record.
    """
    return [mapping for mapping in mappings if mapping.selects(record)]


def choose(mappings: Iterable[PipelineMapping], record: SourceRecord) -> PipelineMapping | None:
    """The one mapping that takes ``record`` (``None`` when none does).

    Raises:
        MappingError: several take it; the message names each ``[pipeline].when`` place,
            and ``place`` is the first of them.
    """
    found = taking(mappings, record)
    if len(found) <= 1:
        return found[0] if found else None
    places = [mapping.rules.when_place for mapping in found]
    raise MappingError(
        f"{record.object_type} {record.object_id} is taken by {len(found)} pipelines: {'; '.join(places)}. "
        "A deal must be taken by exactly one: make their `when` conditions exclusive, then replay",
        place=places[0],
    )


async def stored_overlaps(runtime: Runtime, *, limit: int = STORED_DEALS_CHECKED) -> list[Overlap]:
    """Pairs of pipelines on one CRM that may overlap, with the stored deals both take.

    Pairs that :func:`disjoint` proves apart are skipped; a possible overlap with no
    stored deal taken by both is returned with no records.
    """
    from syncd.store.db import SourceRecordRow, table_of  # the store pulls in SQL; pure callers need not

    by_crm: dict[str, list[PipelineMapping]] = {}
    for pipeline in runtime.pipelines:
        by_crm.setdefault(pipeline.crm_name, []).append(pipeline.mapping)
    found: list[Overlap] = []
    for crm, mappings in by_crm.items():
        pairs = possible_overlaps(mappings)
        if not pairs:
            continue
        table = table_of(SourceRecordRow)
        rows = await runtime.store.select(
            SourceRecordRow, table.c.connection == crm, table.c.object_type == "deal", limit=limit
        )
        records = [row.as_record() for row in rows]
        for pair in pairs:
            checked = _both(pair, records)
            if not checked.records:
                log.warning("pipelines_possibly_overlapping", detail=str(checked), stored_deals=len(records))
            found.append(checked)
    return found


def _both(pair: Overlap, records: Sequence[SourceRecord]) -> Overlap:
    both = []
    for record in records:
        try:
            if pair.first.selects(record) and pair.second.selects(record):
                both.append(record.object_id)
        except MappingError:
            continue  # a record the filter cannot read is dead-lettered by its own processing
    return Overlap(first=pair.first, second=pair.second, records=tuple(both))
