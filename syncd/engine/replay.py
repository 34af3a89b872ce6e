"""Dead letters: list them, and requeue them once the mapping or the data is fixed.

Replaying puts the original inbox event or outbox effect back in its queue as if new:
in one transaction the row is pending again with no attempts, no first attempt time
(so ``[daemon].give_up_after_s`` counts afresh) and no last error, and the dead letter
is marked replayed; a letter whose record is not dead any more is left as it is and
not counted. A dead ``create_invoice`` effect is marked to be drafted again from the
current mapping when it runs (:meth:`syncd.engine.loop.Engine._redraft`), under the same key,
so a fixed mapping is what the ledger gets.

Because processing re-reads the source and every effect is keyed, a replay never
creates a second invoice: a billing event already recorded queues nothing, and a
replayed invoice is looked up by its key before anything is created.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from syncd.engine.loop import CREATE_INVOICE
from syncd.plumbing.settings import Config
from syncd.store.db import DeadLetterRow, EffectRow, EventRow, Store, table_of

REQUEUED_MODELS: dict[str, type[EventRow] | type[EffectRow]] = {"event": EventRow, "effect": EffectRow}


async def list_dead_letters(config: Config, *, include_replayed: bool = False) -> list[DeadLetterRow]:
    """Dead letters, newest last (open ones only unless ``include_replayed``)."""
    store = Store.open(config.daemon.database_url)
    try:
        where = [] if include_replayed else [table_of(DeadLetterRow).c.status == "open"]
        return list(await store.select(DeadLetterRow, *where, order_by=table_of(DeadLetterRow).c.id))
    finally:
        await store.close()


async def replay_dead_letters(config: Config, ids: Sequence[int], *, all_: bool = False) -> int:
    """Requeue the named dead letters (or every open one); how many were requeued.

    A dead letter from a malformed webhook has nothing to requeue (its body was never
    a valid event), nor has one whose record was requeued or settled since: either is
    left open and not counted.
    """
    letters = await list_dead_letters(config)
    wanted = set(ids)
    chosen = [d for d in letters if all_ or d.id in wanted]
    store = Store.open(config.daemon.database_url)
    try:
        count = 0
        for letter in chosen:
            model = REQUEUED_MODELS.get(letter.source)
            if model is None:
                continue
            async with store.begin() as conn:
                if await _requeue(conn, model, letter, _now()):
                    count += 1
        return count
    finally:
        await store.close()


async def _requeue(
    conn: AsyncConnection, model: type[EventRow] | type[EffectRow], letter: DeadLetterRow, now: datetime
) -> bool:
    """In the caller's transaction: the letter's record pending again as new, and the letter replayed."""
    table = table_of(model)
    values: dict[str, Any] = {
        "status": "pending",
        "next_at": now,
        "lease_owner": None,
        "lease_until": None,
        "attempts": 0,
        "first_attempt_at": None,
        "last_error": None,
    }
    dead = sa.and_(table.c.id == int(letter.ref), table.c.status == "dead")
    if model is EffectRow:
        found = (await conn.execute(sa.select(table.c.kind, table.c.payload).where(dead))).first()
        if found is not None and found.kind == CREATE_INVOICE:
            values["payload"] = {**found.payload, "redraft": True}
    if not (await conn.execute(sa.update(table).where(dead).values(**values))).rowcount:
        return False
    letters = table_of(DeadLetterRow)
    await conn.execute(sa.update(letters).where(letters.c.id == letter.id).values(status="replayed", replayed_at=now))
    return True


def _now() -> datetime:
    return datetime.now(UTC)
