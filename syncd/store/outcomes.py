"""Outcomes without an invoice: recorded skips, simulated events, and what needs a person.

Every trigger ends as an invoice, a dead letter (:mod:`syncd.engine.replay`) or a row here
(:class:`~syncd.store.db.OutcomeRow`), so an admin can always answer "what happened to
deal 8812?". ``syncd outcomes list`` and ``syncd skipped`` read them; ``syncd status``
and ``/metrics`` count them; ``syncd outcomes resolve`` closes one that needed attention.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlmodel import col

from syncd.core.errors import RecordError
from syncd.store.db import OutcomeRow, Store

KINDS = ("skip", "simulated", "attention")


async def list_outcomes(
    store: Store, *, kind: str | None = None, include_resolved: bool = False, object_id: str | None = None
) -> list[OutcomeRow]:
    """Outcomes, oldest first: open ones unless ``include_resolved``, of one ``kind`` if given."""
    where: list[Any] = []
    if kind is not None:
        where.append(col(OutcomeRow.kind) == kind)
    if not include_resolved:
        where.append(col(OutcomeRow.status) == "open")
    if object_id is not None:
        where.append(col(OutcomeRow.object_id) == object_id)
    return list(await store.select(OutcomeRow, *where, order_by=col(OutcomeRow.id)))


async def resolve_outcome(store: Store, outcome_id: int, why: str, *, now: datetime | None = None) -> None:
    """Close an outcome that needed attention, keeping why in its detail.

    Raises:
        RecordError: no open outcome with that id.
    """
    rows = await store.select(OutcomeRow, col(OutcomeRow.id) == outcome_id, col(OutcomeRow.status) == "open")
    if not rows:
        raise RecordError(f"no open outcome with id {outcome_id}", place="syncd outcomes list")
    if rows[0].reason == "client_conflict":
        raise RecordError(
            f"outcome {outcome_id} is a client record conflict: settle it with "
            "`syncd client resolve KEY FIELD --take owner|other` (`syncd client show KEY` shows it)",
            place="syncd client resolve",
        )
    detail = f"{rows[0].detail} — resolved: {why}"
    await store.update(
        OutcomeRow,
        [col(OutcomeRow.id) == outcome_id],
        {"status": "resolved", "resolved_at": now or datetime.now(UTC), "detail": detail},
    )


def as_json(row: OutcomeRow) -> dict[str, Any]:
    """One outcome as a JSON object (stable keys)."""
    return row.model_dump(mode="json")
