"""Dead letters: list them, requeue them once the mapping or the data is fixed, or dismiss them.

Replaying puts the original inbox event or outbox effect back in its queue as if new:
in one transaction the row is pending again with no attempts, no first attempt time
(so ``[daemon].give_up_after_s`` counts afresh) and no last error, and the dead letter
is marked replayed; a letter whose record is not dead any more (requeued or settled
since) is left open, with that reason. A dead ``create_invoice`` effect is marked to be
drafted again from the current mapping when it runs
(:meth:`syncd.engine.loop.Engine._redraft`), under the same key, so a fixed mapping is
what the ledger gets.

Because processing re-reads the source and every effect is keyed, a replay never
creates a second invoice: a billing event already recorded queues nothing, and a
replayed invoice is looked up by its key before anything is created.

Dismissing closes a dead letter a person has dealt with another way (the credit was
issued by hand, the deal was cancelled): who, when and why are kept on the row, and
``syncd dead-letters list`` hides it unless ``--all`` (docs/operations.md, "Dead letters").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from syncd.core.errors import RecordError
from syncd.engine.loop import CREATE_INVOICE
from syncd.plumbing.settings import Config
from syncd.store.db import DeadLetterRow, EffectRow, EventRow, Store, table_of

OPEN = "open"
DISMISSED = "dismissed"


@dataclass(frozen=True, kw_only=True)
class Replayed:
    """What a replay did.

    Attributes:
        requeued: the ids of the dead letters whose event or effect was put back.
        left: each named id left as it was, with the reason (not open, nothing to requeue).
    """

    requeued: tuple[int, ...] = ()
    left: tuple[tuple[int, str], ...] = ()

    @property
    def count(self) -> int:
        """How many records were requeued."""
        return len(self.requeued)


async def list_dead_letters(config: Config, *, include_replayed: bool = False) -> list[DeadLetterRow]:
    """Dead letters, oldest first: the open ones, or with ``include_replayed`` every one (dismissed too)."""
    store = Store.open(config.daemon.database_url)
    try:
        return await _letters(store, every=include_replayed)
    finally:
        await store.close()


async def _letters(store: Store, *, every: bool) -> list[DeadLetterRow]:
    table = table_of(DeadLetterRow)
    where = [] if every else [table.c.status == OPEN]
    return list(await store.select(DeadLetterRow, *where, order_by=table.c.id))


async def replay_dead_letters(config: Config, ids: Sequence[int], *, all_: bool = False) -> Replayed:
    """Requeue the named dead letters (or every open one).

    A dead letter from a malformed webhook has nothing to requeue (its body was never
    a valid event): it is left open and the vendor must send it again. A named dead
    letter that is not open (replayed or dismissed already) is left as it is, and so is
    one whose record is not dead any more (requeued or settled since): it stays open.

    Raises:
        RecordError: an id names no dead letter; nothing is requeued then.
    """
    store = Store.open(config.daemon.database_url)
    try:
        letters = {letter.id: letter for letter in await _letters(store, every=True)}
        unknown = [str(i) for i in dict.fromkeys(ids) if i not in letters]
        if unknown:
            listed = ", ".join(unknown)
            raise RecordError(f"no dead letter with id {listed}; `syncd dead-letters list --all` lists them")
        chosen = [d for d in letters.values() if d.status == OPEN] if all_ else [letters[i] for i in dict.fromkeys(ids)]
        requeued: list[int] = []
        left: list[tuple[int, str]] = []
        for letter in chosen:
            why_not = await _requeue(store, letter)
            if why_not is None:
                requeued.append(int(letter.id or 0))
            elif not all_ or letter.status == OPEN:
                left.append((int(letter.id or 0), why_not))
        return Replayed(requeued=tuple(requeued), left=tuple(left))
    finally:
        await store.close()


async def _requeue(store: Store, letter: DeadLetterRow) -> str | None:
    """Put the letter's event or effect back in its queue as new; else why not.

    One transaction: the record is reset (pending, due now, no lease, no attempts, no
    first attempt time, no last error; a ``create_invoice`` effect marked to be drafted
    again) only while it is dead, and the letter is marked replayed only then.
    """
    if letter.status != OPEN:
        return f"it is {letter.status}, not open"
    model: type[EventRow] | type[EffectRow]
    if letter.source == "event":
        model = EventRow
    elif letter.source == "effect":
        model = EffectRow
    elif letter.source == "webhook":
        return "a malformed webhook has nothing to requeue; the vendor must send it again"
    else:
        return f"a {letter.source} dead letter is for a person to act on; dismiss it once done"
    now = _now()
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
    letters = table_of(DeadLetterRow)
    async with store.begin() as conn:
        if model is EffectRow:
            found = (await conn.execute(sa.select(table.c.kind, table.c.payload).where(dead))).first()
            if found is not None and found.kind == CREATE_INVOICE:
                values["payload"] = {**found.payload, "redraft": True}
        if not (await conn.execute(sa.update(table).where(dead).values(**values))).rowcount:
            return f"its {letter.source} {letter.ref} is not dead any more (requeued or settled since)"
        await conn.execute(
            sa.update(letters).where(letters.c.id == letter.id).values(status="replayed", replayed_at=now)
        )
    return None


async def dismiss_dead_letter(store: Store, letter_id: int, *, why: str, by: str, now: datetime) -> DeadLetterRow:
    """Close an open dead letter without replaying it, keeping who dismissed it, when and why.

    Raises:
        RecordError: no dead letter has that id, or it is not open.
    """
    table = table_of(DeadLetterRow)
    values = {"status": DISMISSED, "dismissed_at": now, "dismissed_by": by, "dismissed_why": why}
    if await store.update(DeadLetterRow, [table.c.id == letter_id, table.c.status == OPEN], values):
        row: DeadLetterRow = await store.get(DeadLetterRow, letter_id)
        return row
    found: DeadLetterRow | None = await store.get(DeadLetterRow, letter_id)
    if found is None:
        raise RecordError(f"no dead letter with id {letter_id}; `syncd dead-letters list --all` lists them")
    if found.status == DISMISSED:
        when = found.dismissed_at.isoformat(timespec="minutes") if found.dismissed_at else "?"
        raise RecordError(
            f"dead letter {letter_id} was dismissed already, on {when} by {found.dismissed_by}: {found.dismissed_why}"
        )
    raise RecordError(f"dead letter {letter_id} is {found.status}, not open; only an open one can be dismissed")


def _now() -> datetime:
    return datetime.now(UTC)
