"""Dead letters: list them, and requeue them once the mapping or the data is fixed.

Replaying puts the original inbox event or outbox effect back in its queue. Because
processing re-reads the source and every effect is keyed, a replay never creates a
second invoice: a billing event already recorded queues nothing, and an invoice
already created is found by its key before anything is created.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from syncd.plumbing.settings import Config
from syncd.store.db import DeadLetterRow, EffectRow, EventRow, Store, table_of


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
    a valid event): it is left open and the vendor must send it again.
    """
    store = Store.open(config.daemon.database_url)
    try:
        letters = await list_dead_letters(config)
        chosen = [d for d in letters if all_ or d.id in set(ids)]
        now = _now()
        count = 0
        for letter in chosen:
            model: type[EventRow] | type[EffectRow]
            if letter.source == "event":
                model = EventRow
            elif letter.source == "effect":
                model = EffectRow
            else:
                continue
            table = table_of(model)
            await store.update(
                model,
                [table.c.id == int(letter.ref), table.c.status == "dead"],
                {"status": "pending", "next_at": now, "lease_owner": None, "lease_until": None},
            )
            await store.update(
                DeadLetterRow, [table_of(DeadLetterRow).c.id == letter.id], {"status": "replayed", "replayed_at": now}
            )
            count += 1
        return count
    finally:
        await store.close()


def _now() -> datetime:

    return datetime.now(UTC)
