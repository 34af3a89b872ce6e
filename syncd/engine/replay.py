"""Dead letters: list them, requeue them once the mapping or the data is fixed, or dismiss them.

Replaying puts the original inbox event or outbox effect back in its queue. Because
processing re-reads the source and every effect is keyed, a replay never creates a
second invoice: a billing event already recorded queues nothing, and an invoice
already created is found by its key before anything is created.

Dismissing closes a dead letter a person has dealt with another way (the credit was
issued by hand, the deal was cancelled): who, when and why are kept on the row, and
``syncd dead-letters list`` hides it unless ``--all`` (docs/operations.md, "Dead letters").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from syncd.core.errors import RecordError
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
    letter that is not open (replayed or dismissed already) is left as it is.

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
    """Put the letter's event or effect back in its queue; else why not."""
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
    await store.update(
        model,
        [table.c.id == int(letter.ref), table.c.status == "dead"],
        {"status": "pending", "next_at": now, "lease_owner": None, "lease_until": None},
    )
    await store.update(
        DeadLetterRow, [table_of(DeadLetterRow).c.id == letter.id], {"status": "replayed", "replayed_at": now}
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
