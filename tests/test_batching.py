"""The batcher (syncd/engine/batching.py): when a batch goes, and each element's own answer.

These drive the real Batcher with real asyncio tasks; ``one`` and ``many`` are the
test's own coroutines standing in for a connector's calls (recording what was sent).
The connectors' batch methods and the whole engine are tested over the emulators below.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from syncd.core.errors import LeaseLost, NotFound, RetriableError
from syncd.engine.batching import COHORT_WAITS, Batcher, Cohort, Slots
from syncd.plumbing import leases
from syncd.plumbing.leases import Lease


class Vendor:
    """Records each call: ``("one", value)`` or ``("many", [values])``."""

    def __init__(self, *, refuse: frozenset[str] = frozenset(), delay_s: float = 0.0) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.refuse = refuse
        self.delay_s = delay_s
        self.leases: list[Lease | None] = []

    async def one(self, value: str) -> str:
        self.calls.append(("one", value))
        self.leases.append(leases.current())
        await asyncio.sleep(self.delay_s)
        if value in self.refuse:
            raise NotFound(f"no {value}")
        return value.upper()

    async def many(self, values: list[str]) -> Mapping[str, Any]:
        self.calls.append(("many", sorted(values)))
        self.leases.append(leases.current())
        await asyncio.sleep(self.delay_s)
        return {v: NotFound(f"no {v}") if v in self.refuse else v.upper() for v in values}


async def _record(batcher: Batcher, vendor: Vendor, value: str, *, work_s: float = 0.0) -> Any:
    """One record's task: some work of its own, then one batched call."""
    with batcher.working():
        await asyncio.sleep(work_s)
        try:
            return await batcher.call(("read", "crm"), value, value, one=vendor.one, many=vendor.many)
        except NotFound as exc:
            return exc


async def test_records_ready_together_share_one_call_and_each_gets_its_own_answer() -> None:
    batcher, vendor = Batcher(max_size=50, wait_s=0.2), Vendor(refuse=frozenset({"c"}))
    answers = await asyncio.gather(*(_record(batcher, vendor, v) for v in "abcd"))
    assert vendor.calls == [("many", ["a", "b", "c", "d"])]
    assert answers[:2] == ["A", "B"]
    assert answers[3] == "D"
    assert isinstance(answers[2], NotFound)  # the refused element fails alone
    assert batcher.sent["read"] == 1
    assert batcher.carried["read"] == 4


async def test_records_arriving_one_after_another_are_gathered_and_a_lone_one_after_a_lull_is_not_held() -> None:
    """Webhooks 10 ms apart, each parking at once: a stream is known from its third call, and the rest wait for each other.

    The first two go alone (two calls within batch_wait are also what deals one after
    another make, each after the previous one is done: nothing more is coming for them).
    With nothing else being worked on, the third waits a quarter of batch_wait (50 ms),
    long enough here for the three after it.
    """
    batcher, vendor = Batcher(max_size=50, wait_s=0.2), Vendor()
    loop = asyncio.get_running_loop()

    async def arriving(value: str, after_s: float) -> Any:
        await asyncio.sleep(after_s)
        return await _record(batcher, vendor, value)

    values = "abcdef"
    assert await asyncio.gather(*(arriving(v, 0.01 * i) for i, v in enumerate(values))) == [v.upper() for v in values]
    assert vendor.calls == [("one", "a"), ("one", "b"), ("many", ["c", "d", "e", "f"])]
    await asyncio.sleep(0.3)  # a lull: nothing began within wait_s
    started = loop.time()
    assert await _record(batcher, vendor, "e") == "E"
    assert vendor.calls[-1] == ("one", "e")
    assert loop.time() - started < 0.05  # not held for wait_s


async def test_with_nothing_else_being_worked_on_a_stream_waits_a_quarter_of_batch_wait() -> None:
    """A stream of five calls 5 ms apart, nothing else running: the last three go together after 250 ms, not 1 s.

    Only records arriving from outside could join them; while other records are still
    being worked on (they may reach the call) the whole batch_wait applies
    (test_a_record_still_working_is_waited_for_only_up_to_wait_s).
    """
    batcher, vendor = Batcher(max_size=50, wait_s=1.0), Vendor()
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def arriving(value: str, after_s: float) -> float:
        await asyncio.sleep(after_s)
        await _record(batcher, vendor, value)
        return loop.time() - started

    done = await asyncio.gather(*(arriving(v, 0.005 * i) for i, v in enumerate("abcde")))
    assert vendor.calls == [("one", "a"), ("one", "b"), ("many", ["c", "d", "e"])]
    assert 0.25 <= done[2] < 0.6  # a quarter of batch_wait, not all of it


async def test_deals_one_after_another_are_not_held_even_when_each_comes_within_batch_wait_of_the_last() -> None:
    """One deal at a time (c=1), each starting 60 ms after the last one's call with batch_wait 100 ms: none is held."""
    batcher, vendor = Batcher(max_size=50, wait_s=0.1), Vendor()
    loop = asyncio.get_running_loop()
    for value in "abcde":
        started = loop.time()
        assert await _record(batcher, vendor, value) == value.upper()
        assert loop.time() - started < 0.05  # not held for batch_wait
        await asyncio.sleep(0.06)
    assert vendor.calls == [("one", v) for v in "abcde"]


async def test_a_lone_record_is_sent_at_once_through_the_one_record_call() -> None:
    batcher, vendor = Batcher(max_size=50, wait_s=5.0), Vendor()
    started = asyncio.get_running_loop().time()
    assert await _record(batcher, vendor, "a") == "A"
    assert vendor.calls == [("one", "a")]
    assert asyncio.get_running_loop().time() - started < 1.0  # not held for wait_s (5 s)


async def test_batching_off_sends_one_call_per_record() -> None:
    batcher, vendor = Batcher(max_size=1, wait_s=5.0), Vendor()
    await asyncio.gather(*(_record(batcher, vendor, v) for v in "abc"))
    assert sorted(vendor.calls) == [("one", "a"), ("one", "b"), ("one", "c")]


async def test_a_full_batch_goes_at_once_and_the_rest_form_the_next() -> None:
    batcher, vendor = Batcher(max_size=3, wait_s=0.2), Vendor()
    answers = await asyncio.gather(*(_record(batcher, vendor, v) for v in "abcde"))
    assert answers == ["A", "B", "C", "D", "E"]
    assert vendor.calls == [("many", ["a", "b", "c"]), ("many", ["d", "e"])]


async def test_a_record_still_working_is_waited_for_only_up_to_wait_s() -> None:
    """Two records ready, one still busy for 2 s: the two go after wait_s (0.1 s), not after 2 s."""
    batcher, vendor = Batcher(max_size=50, wait_s=0.1), Vendor()
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def timed(value: str, work_s: float) -> float:
        await _record(batcher, vendor, value, work_s=work_s)
        return loop.time() - started

    fast_a, fast_b, slow = await asyncio.gather(timed("a", 0), timed("b", 0), timed("c", 2.0))
    assert vendor.calls == [("many", ["a", "b"]), ("one", "c")]
    assert fast_a < 1.0
    assert fast_b < 1.0
    assert slow >= 2.0


async def test_a_whole_request_failing_fails_every_element_alike() -> None:
    batcher = Batcher(max_size=50, wait_s=0.2)

    async def down(values: list[str]) -> Mapping[str, Any]:
        raise RetriableError("crm: 503")

    async def record(value: str) -> BaseException | None:
        with batcher.working():
            await asyncio.sleep(0)  # both records are being worked on before either calls
            try:
                await batcher.call("q", value, value, one=Vendor().one, many=down)
            except RetriableError as exc:
                return exc
        return None

    errors = await asyncio.gather(*(record(v) for v in "ab"))
    assert all(isinstance(e, RetriableError) and "503" in str(e) for e in errors)


async def test_calls_outside_a_record_are_never_held() -> None:
    """A scheduler job or the CLI (no record being worked on) calls the vendor itself."""
    batcher, vendor = Batcher(max_size=50, wait_s=5.0), Vendor()
    assert await batcher.call("q", "x", "x", one=vendor.one, many=vendor.many) == "X"
    assert vendor.calls == [("one", "x")]


def _lease(where: str, renewed: list[str], *, lost: bool = False) -> Lease:
    now = datetime.now(UTC)

    async def renew() -> datetime | None:
        renewed.append(where)
        return None if lost else now + timedelta(seconds=60)

    return Lease(where=where, until=now + timedelta(seconds=60), lease_s=60, renew=renew, clock=lambda: now)


async def test_the_batched_call_runs_under_every_member_lease_and_is_not_sent_if_one_was_lost() -> None:
    renewed: list[str] = []
    batcher = Batcher(max_size=50, wait_s=0.2)
    members = {"a": _lease("a", renewed), "b": _lease("b", renewed, lost=True), "c": _lease("c", renewed)}
    sent: list[list[str]] = []

    async def write(values: list[str]) -> Mapping[str, Any]:
        batch = leases.current()
        assert isinstance(batch, leases.Batch)
        assert {m.where for m in batch.members} == {"a", "b", "c"}
        await batch.guard("PATCH batch")  # what VendorHttp does right before a write
        sent.append(values)
        return {v: None for v in values}

    async def record(value: str) -> BaseException | None:
        with leases.using(members[value]), batcher.working():
            await asyncio.sleep(0)
            try:
                await batcher.call("w", value, value, one=Vendor().one, many=write)
            except (LeaseLost, RetriableError) as exc:
                return exc
        return None

    a, b, c = await asyncio.gather(*(record(v) for v in "abc"))
    assert sent == []  # nothing written: b's claim was taken over
    assert isinstance(b, LeaseLost)  # the lost one knows it
    assert isinstance(a, RetriableError)
    assert not isinstance(a, LeaseLost)
    assert isinstance(c, RetriableError)
    assert not isinstance(c, LeaseLost)
    assert sorted(renewed) == ["a", "b", "c"]


async def test_a_record_cancelled_while_waiting_does_not_hold_the_batch() -> None:
    batcher, vendor = Batcher(max_size=50, wait_s=0.05), Vendor(delay_s=0.01)
    waiting = asyncio.create_task(_record(batcher, vendor, "a"))
    other = asyncio.create_task(_record(batcher, vendor, "b", work_s=0.5))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert await other == "B"
    assert ("one", "b") in vendor.calls
    await batcher.settle(1.0)


async def test_a_batched_call_nobody_waits_for_any_more_is_cancelled() -> None:
    """Every record of a batch cancelled (the shutdown grace ran out): the call in flight is cancelled too."""
    batcher, vendor = Batcher(max_size=50, wait_s=0.05), Vendor(delay_s=30.0)
    records = [asyncio.create_task(_record(batcher, vendor, v)) for v in "ab"]
    await asyncio.sleep(0.3)  # both wait in one call of 30 s
    assert vendor.calls == [("many", ["a", "b"])]
    for record in records:
        record.cancel()
    await asyncio.gather(*records, return_exceptions=True)
    started = asyncio.get_running_loop().time()
    await batcher.settle(60.0)
    assert asyncio.get_running_loop().time() - started < 5.0


async def test_calls_arriving_while_a_batch_is_in_flight_gather_behind_it() -> None:
    """A slow vendor (or one pacing calls): what arrives during a call goes in one call right after it."""
    batcher, vendor = Batcher(max_size=50, wait_s=0.01), Vendor(delay_s=0.3)

    async def arriving(value: str, after_s: float) -> Any:
        await asyncio.sleep(after_s)
        return await _record(batcher, vendor, value)

    answers = await asyncio.gather(arriving("a", 0), *(arriving(v, 0.05 + 0.02 * i) for i, v in enumerate("bcdef")))
    assert answers == ["A", "B", "C", "D", "E", "F"]
    assert vendor.calls == [("one", "a"), ("many", ["b", "c", "d", "e", "f"])]


# ---------------------------------------------------------------------------
# Cohorts: the rows of one claim wait for each other; Slots: a claim starts whole
# ---------------------------------------------------------------------------


async def _member(batcher: Batcher, cohort: Cohort, vendor: Vendor, value: str, *, work_s: float) -> Any:
    """A row of a claim: its own work (one after another, as rows' transactions are), then a batched call."""
    with batcher.member(cohort):
        return await _record(batcher, vendor, value, work_s=work_s)


async def test_the_rows_of_one_claim_reach_a_call_in_one_batch_however_long_they_take_to_arrive() -> None:
    """Ten rows arriving 30 ms apart (300 ms in all) with batch_wait 50 ms: one call, not one per window."""
    batcher, vendor = Batcher(max_size=50, wait_s=0.05), Vendor()
    cohort = Cohort(10)
    values = "abcdefghij"
    answers = await asyncio.gather(
        *(_member(batcher, cohort, vendor, v, work_s=0.03 * i) for i, v in enumerate(values))
    )
    assert answers == [v.upper() for v in values]
    assert vendor.calls == [("many", sorted(values))]


async def test_without_a_cohort_the_same_arrivals_go_in_several_batches() -> None:
    """The same arrivals as lone records (webhooks): each batch goes batch_wait after its first call."""
    batcher, vendor = Batcher(max_size=50, wait_s=0.05), Vendor()
    await asyncio.gather(*(_record(batcher, vendor, v, work_s=0.03 * i) for i, v in enumerate("abcdefghij")))
    assert len(vendor.calls) > 2


async def test_a_claim_mate_still_working_is_waited_for_only_up_to_the_cohort_bound() -> None:
    """One row of the claim busy for 5 s: the others go after COHORT_WAITS × batch_wait (0.4 s), not 5 s."""
    batcher, vendor = Batcher(max_size=50, wait_s=0.02), Vendor()
    cohort = Cohort(3)
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def timed(value: str, work_s: float) -> float:
        await _member(batcher, cohort, vendor, value, work_s=work_s)
        return loop.time() - started

    fast_a, fast_b, slow = await asyncio.gather(timed("a", 0), timed("b", 0), timed("c", 5.0))
    assert vendor.calls == [("many", ["a", "b"]), ("one", "c")]
    assert COHORT_WAITS * 0.02 <= fast_a < 2.0
    assert fast_b < 2.0
    assert slow >= 5.0


async def test_rows_that_cannot_get_a_slot_are_not_waited_for() -> None:
    """A cohort of 5 of which 3 are queued for a slot that nothing will free: the 2 admitted go without them."""
    batcher, vendor = Batcher(max_size=50, wait_s=0.05), Vendor()
    cohort = Cohort(2, queued=3, blocked=lambda: batcher.running == 0 and not batcher.busy)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.gather(*(_member(batcher, cohort, vendor, v, work_s=0) for v in "ab"))
    assert vendor.calls == [("many", ["a", "b"])]
    assert loop.time() - started < COHORT_WAITS * 0.05  # not held to the bound


async def test_a_claim_takes_its_slots_at_once_and_in_turn() -> None:
    """Slots: a claim of 3 waits for 3 free slots even when 1 frees first; one asking later waits its turn."""
    slots = Slots(4)
    await slots.take(3)  # the first claim works 3 rows
    second = asyncio.create_task(slots.take(3))
    third = asyncio.create_task(slots.take(1))
    await asyncio.sleep(0.01)
    assert not second.done()  # 1 free: not enough for 3
    assert not third.done()  # 1 would fit, but the claim before it asked first
    slots.give(1)
    await asyncio.sleep(0.01)
    assert not second.done()
    slots.give(1)
    await asyncio.sleep(0.01)
    assert second.done()
    assert not third.done()
    assert slots.full
    slots.give(1)
    await asyncio.sleep(0.01)
    assert third.done()
    assert slots.free == 0


async def test_a_claim_cancelled_while_waiting_for_slots_leaves_them_to_the_next() -> None:
    slots = Slots(2)
    await slots.take(2)
    waiting = asyncio.create_task(slots.take(2))
    after = asyncio.create_task(slots.take(1))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    slots.give(1)
    await asyncio.sleep(0.01)
    assert after.done()
    slots.give(1)
    assert slots.free == 1
