"""Vendor calls of many records in one request (docs/architecture.md, Batching).

A sync daemon sees many records at once; a per-record script cannot. Each record is
still worked on by its own task, in its own transactions, fenced on its own claim
(:mod:`syncd.engine.loop`). Where that task would call a vendor for one record (read a
deal, look up a customer, create an invoice, write a deal's standing back), it hands the
call to the :class:`Batcher` and waits; the batcher sends the calls waiting for one
connection together through the connector's batch method
(:class:`~syncd.core.interfaces.ReadsDealsInBatches`,
:class:`~syncd.core.interfaces.CreatesInvoicesInBatches`,
:class:`~syncd.core.interfaces.WritesStatusInBatches`) and gives each task its own
element's answer: an element the vendor refused fails alone.

When a batch goes:

* when it holds ``[daemon].batch_max`` calls;
* a lone record's call (no cohort): at once when no record is being worked on any more
  (every task of this process is waiting for a batched call or done) and either records
  have stopped arriving (fewer than two began within the last ``batch_wait_ms``) or calls
  of its kind are not streaming (fewer than three came within it: deals one after
  another, each after the last one is done): nothing else is coming, so nothing waits;
* else, while records keep arriving (a stream of webhooks), the ones that arrive
  meanwhile join it: ``[daemon].batch_wait_ms`` after its first call while other records
  are being worked on (they may reach it), a quarter of that (:data:`IDLE_WAIT`) while
  none is (only new arrivals could);
* records claimed together (a :class:`Cohort`: the rows of one claim, worked at once)
  wait for each other: a batch holding one goes once none of its cohort is still being
  worked on (each member waits in a batch or is done), however long after its first
  call, but at most :data:`COHORT_WAITS` × ``batch_wait_ms``. Between two vendor calls
  each row commits its own transaction, one after another, so a claim of 50 reaches
  its next call over a few hundred milliseconds; without this the batch would go at
  ``batch_wait_ms`` with the first few (BENCHMARKS.md, "Month start");
* and never while another batch of the same connection and kind is in flight (waiting
  for a rate-limit slot or for its answer): the calls gather behind it and go together
  as soon as it ends, so under load (a month start at Xero's 60 calls a minute) batches
  grow to ``batch_max`` by themselves.

A batch of one is sent through the connector's one-record method, exactly as with
batching off (``batch_max = 1``): a lone deal at low load makes the same calls as a
script would, and is not slowed.

Leases: the batched call runs in a task of its own under a
:class:`~syncd.plumbing.leases.Batch` of its members' leases: refused once the process
stops, retried only within the smallest member's budget, and every member is renewed
(in one transaction) right before a write. If one was taken over meanwhile the call is
not sent: that member logs ``lease_lost``, the others are retried (their next attempt
looks up before creating).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from syncd.core.errors import LeaseLost, RetriableError
from syncd.plumbing import leases
from syncd.plumbing.leases import Batch, Lease, RenewAll

log = structlog.get_logger("syncd.engine.batching")

One = Callable[[Any], Awaitable[Any]]
"""The connector's call for one record: its answer, or it raises."""
Many = Callable[[list[Any]], Awaitable[Mapping[str, Any]]]
"""The connector's batch call: each element's answer or error (an exception instance), by key."""

IN_FLIGHT = 1
"""Batched calls of one connection and kind in flight at once. Calls arriving meanwhile gather
behind it and go together when it ends, so batches grow with the load (and with a vendor's
pacing: a call waiting for a rate-limit slot is in flight) instead of queueing up small."""

IDLE_WAIT = 0.25
"""The share of ``batch_wait_ms`` a lone record's call waits while no record is being worked on
(only records arriving from outside could join it; measured: BENCHMARKS.md part 3), and how
often a waiting batch looks again."""

COHORT_WAITS = 20
"""The longest a batch waits for the rest of its members' cohorts, in ``batch_wait_ms``: 1 s at the default."""

_inside: contextvars.ContextVar[bool] = contextvars.ContextVar("syncd_batch_member", default=False)


class Cohort:
    """Records claimed together and worked at once (one claim's rows): their calls wait for each other.

    Args:
        admitted: members given a slot of the process's bound (:class:`Slots`), about to start.
        queued: members still waiting for a slot.
        blocked: whether a queued member cannot get a slot now: then nobody waits for it.

    Attributes:
        unstarted: admitted members not started yet.
        queued: members waiting for a slot.
        running: members being worked on, neither waiting in a batch nor done.
    """

    def __init__(self, admitted: int, *, queued: int = 0, blocked: Callable[[], bool] = lambda: False) -> None:
        self.unstarted = admitted
        self.queued = queued
        self.running = 0
        self._blocked = blocked

    @property
    def idle(self) -> bool:
        """No member is on its way to a call: each waits in a batch, is done, or cannot start yet."""
        return self.running == 0 and self.unstarted == 0 and (self.queued == 0 or self._blocked())


class Slots:
    """The rows a process works at once (a bound), taken a claim at a time and in order.

    An :class:`asyncio.Semaphore` hands its permits out one by one to whoever asks first:
    a claim's rows would start one at a time as another claim's rows finish, and the first
    of each cohort would reach every batch ahead of the rest of it (measured: batches of
    49 and 1 instead of 50). Here a claim takes the slots it needs at once, first come
    first served.

    Args:
        size: the bound.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.free = size
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def full(self) -> bool:
        """Whether a row asking for a slot now would wait."""
        return self.free == 0 or bool(self._waiting)

    async def take(self, count: int) -> None:
        """Wait for ``count`` slots (at most :attr:`size`), after those who asked before."""
        count = min(count, self.size)
        if not self._waiting and self.free >= count:
            self.free -= count
            return
        entry = (count, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        try:
            await entry[1]
        except asyncio.CancelledError:
            if entry[1].done() and not entry[1].cancelled():
                self.give(count)  # granted, then cancelled before it could use them
            elif entry in self._waiting:
                self._waiting.remove(entry)
                self.give(0)  # those behind it may fit now
            raise

    def give(self, count: int = 1) -> None:
        """Give ``count`` slots back; whoever waits first and fits gets them."""
        self.free += count
        while self._waiting and self.free >= self._waiting[0][0]:
            wanted, granted = self._waiting.popleft()
            if granted.done():
                continue
            self.free -= wanted
            granted.set_result(None)


_cohort: contextvars.ContextVar[Cohort | None] = contextvars.ContextVar("syncd_batch_cohort", default=None)


@dataclass
class _Waiting:
    key: str
    value: Any
    lease: Lease | None
    future: asyncio.Future[Any]
    cohort: Cohort | None
    since: float
    answered: bool = False  # counted running again from its answer on (before its task resumes)


@dataclass
class _Queue:
    name: str
    connection: str
    one: One
    many: Many
    waiting: list[_Waiting] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None
    in_flight: int = 0


class Batcher:
    """Gathers the vendor calls this process's records make at once, per connection and kind.

    Args:
        max_size: the most calls one batch carries (``[daemon].batch_max``; 1 = off).
        wait_s: how long a call may wait for others while records are still being
            worked on (``[daemon].batch_wait_ms``).
        renew_all: renews several leases in one transaction (the write guard of a batch).
        on_sent: told ``(connection, kind, records)`` for each call sent (``/metrics``).
    """

    def __init__(
        self,
        *,
        max_size: int,
        wait_s: float,
        renew_all: RenewAll | None = None,
        on_sent: Callable[[str, str, int], None] | None = None,
    ) -> None:
        self.max_size = max_size
        self.on_sent = on_sent
        self.wait_s = wait_s
        self.renew_all = renew_all
        self.running = 0  # records being worked on, not waiting in a batch
        self._starts: deque[float] = deque()  # when the records of the last wait_s began
        self._arrivals: dict[Hashable, deque[float]] = {}  # per queue: when its calls of the last wait_s came
        self._queues: dict[Hashable, _Queue] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.sent: Counter[str] = Counter()  # batched calls sent, by kind
        self.carried: Counter[str] = Counter()  # records those calls carried, by kind

    @property
    def enabled(self) -> bool:
        return self.max_size > 1

    @property
    def busy(self) -> bool:
        """Whether a batched call is in flight (its answer will set records running again)."""
        return bool(self._tasks)

    @contextlib.contextmanager
    def working(self) -> Iterator[None]:
        """One record being worked on by the calling task: batches wait for it while it runs.

        Nested (the effects a row queued, worked by the same task): counted once.
        """
        if _inside.get():
            yield
            return
        self.running += 1
        self._starts.append(asyncio.get_running_loop().time())
        token = _inside.set(True)
        try:
            yield
        finally:
            _inside.reset(token)
            self.running -= 1
            if self.running == 0:
                self._consider_all()

    @contextlib.contextmanager
    def member(self, cohort: Cohort, *, admitted: bool = True) -> Iterator[None]:
        """The calling task works one record of ``cohort``, from its start to its end.

        ``admitted``: it had its slot when the cohort began (else it waited for one, queued).
        """
        if admitted:
            cohort.unstarted -= 1
        else:
            cohort.queued -= 1
        cohort.running += 1
        token = _cohort.set(cohort)
        try:
            yield
        finally:
            _cohort.reset(token)
            cohort.running -= 1
            if cohort.idle:
                self._consider_all()

    def _busy(self, queue: Hashable) -> bool:
        """Whether calls keep coming to ``queue``: three or more within the last ``wait_s``.

        Two is what deals one after another make (the next deal's call comes a deal's
        time after this one's, within ``wait_s`` on a fast machine), and waiting for a
        third that is not coming doubled their p99 (BENCHMARKS.md).
        """
        arrivals = self._arrivals.get(queue)
        if arrivals is None:
            return False
        recent = self._recent(arrivals)
        if not recent:
            del self._arrivals[queue]
        return recent >= 3

    def _quiet(self) -> bool:
        """Whether records have stopped arriving: fewer than two began within the last ``wait_s``."""
        return self._recent(self._starts) < 2

    def _recent(self, times: deque[float]) -> int:
        """How many of ``times`` (loop times, oldest first) fall within the last ``wait_s``; older ones are dropped."""
        since = asyncio.get_running_loop().time() - self.wait_s
        while times and times[0] < since:
            times.popleft()
        return len(times)

    async def call(self, queue: Hashable, key: str, value: Any, *, one: One, many: Many) -> Any:
        """``one(value)``, or ``value`` sent in a batch with others of the same ``queue``; its own answer.

        ``queue`` names the connection and the kind of call (calls that can share a
        request); ``key`` names the element in the batch's answer (two records asking for
        the same element share it).

        Raises:
            whatever the vendor call raised for this element, or for the whole request.
        """
        if not self.enabled or not _inside.get():
            return await one(value)
        waiting = self._queues.get(queue)
        if waiting is None:
            waiting = self._queues[queue] = _Queue(
                name=str(queue[0] if isinstance(queue, tuple) else queue),
                connection=str(queue[1]) if isinstance(queue, tuple) and len(queue) > 1 else "",
                one=one,
                many=many,
            )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        cohort = _cohort.get()
        mine = _Waiting(key, value, leases.current(), future, cohort, loop.time())
        waiting.waiting.append(mine)
        self._arrivals.setdefault(queue, deque()).append(mine.since)
        self.running -= 1
        if cohort is not None:
            cohort.running -= 1
        try:
            if self.running == 0 or (cohort is not None and cohort.idle):
                self._consider_all()  # others may have waited for this one
            else:
                self._consider(queue)
            return await future
        finally:
            if not mine.answered:  # cancelled: not counted back by _deliver
                self.running += 1
                if cohort is not None:
                    cohort.running += 1

    async def settle(self, timeout_s: float) -> None:
        """At shutdown, before the store closes: wait up to ``timeout_s`` for the batched calls in flight, then cancel them.

        A batched call whose every record stopped waiting (its worker was cancelled at
        the end of the grace: the rows went back with their attempts counted) was
        cancelled already, as a one-record call in flight would have been.
        """
        if not self._tasks:
            return
        _done, busy = await asyncio.wait(list(self._tasks), timeout=timeout_s)
        for task in busy:
            task.cancel()
        if busy:
            await asyncio.wait(busy)

    def _consider_all(self) -> None:
        for queue in list(self._queues):
            self._consider(queue)

    def _consider(self, queue: Hashable, *, waited: bool = False) -> None:
        """Send ``queue``'s batch if it may go (:meth:`_ready`), else make sure a timer will look again.

        With a call of its kind in flight it goes with the others gathering behind it, once that ends.
        """
        waiting = self._queues.get(queue)
        if waiting is None or not waiting.waiting or waiting.in_flight >= IN_FLIGHT:
            return
        if len(waiting.waiting) >= self.max_size or self._ready(queue, waiting, waited=waited):
            self._flush(queue)
        elif waiting.timer is None:
            waiting.timer = asyncio.get_running_loop().call_later(self.wait_s * IDLE_WAIT, self._due, queue)

    def _ready(self, queue: Hashable, waiting: _Queue, *, waited: bool) -> bool:
        """Whether ``waiting``'s calls may go now.

        A call of a cohort waits until the cohort is idle (at most :data:`COHORT_WAITS` ×
        ``batch_wait_ms``). A lone record's call goes after ``batch_wait_ms``, or once the
        call in flight before it ended (``waited``); while no record is being worked on, at
        once if records stopped arriving or no other call of its kind came within the last
        ``batch_wait_ms`` (deals one after another, each with a write-back of its own: the
        next deal comes after this one is done), else after :data:`IDLE_WAIT` of it.
        """
        members = [w.cohort for w in waiting.waiting]
        age = asyncio.get_running_loop().time() - min(w.since for w in waiting.waiting)
        if not all(cohort is None or cohort.idle for cohort in members):
            return age >= COHORT_WAITS * self.wait_s
        if all(cohort is not None for cohort in members):
            return True
        if waited or age >= self.wait_s:
            return True
        idle = self.running == 0  # only records arriving from outside could still join
        return idle and (self._quiet() or not self._busy(queue) or age >= self.wait_s * IDLE_WAIT)

    def _due(self, queue: Hashable) -> None:
        """A batch's timer: it goes if it may now (:meth:`_ready`), else the timer looks again later."""
        waiting = self._queues.get(queue)
        if waiting is not None:
            waiting.timer = None
            self._consider(queue)

    def _flush(self, queue: Hashable) -> None:
        waiting = self._queues.get(queue)
        if waiting is None:
            return
        if waiting.timer is not None:
            waiting.timer.cancel()
            waiting.timer = None
        while waiting.waiting and waiting.in_flight < IN_FLIGHT:
            taken = [w for w in waiting.waiting[: self.max_size] if not w.future.done()]
            del waiting.waiting[: self.max_size]
            if taken:
                # a clean context: the batch is no record's own work (its lease is the Batch's)
                task = asyncio.get_running_loop().create_task(self._send(waiting, taken), context=contextvars.Context())
                waiting.in_flight += 1
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                task.add_done_callback(functools.partial(self._sent, queue, waiting))
                for member in taken:
                    member.future.add_done_callback(functools.partial(_abandoned, task, taken))
        if not waiting.waiting and waiting.in_flight == 0:
            del self._queues[queue]

    def _sent(self, queue: Hashable, waiting: _Queue, _task: asyncio.Task[None]) -> None:
        """A batched call ended: the calls that gathered meanwhile go at once (they waited for it).

        Its members run again, and rows that waited for a slot may start: the others look again.
        """
        waiting.in_flight -= 1
        if waiting.waiting:
            self._consider(queue, waited=True)
        elif waiting.in_flight == 0 and self._queues.get(queue) is waiting:
            del self._queues[queue]
        self._consider_all()

    async def _send(self, queue: _Queue, taken: list[_Waiting]) -> None:
        values: dict[str, Any] = {}
        for waiting in taken:  # the same element twice: the later value (a write-back computed later)
            values[waiting.key] = waiting.value
        held = [w.lease for w in taken if w.lease is not None]
        lease = Batch(held, renew_all=self.renew_all) if held else None
        if self.on_sent is not None:
            self.on_sent(queue.connection, queue.name, len(values))
        try:
            with leases.using(lease):
                if len(values) == 1:
                    only = next(iter(values))
                    answers: Mapping[str, Any] = {only: await _answer(queue.one, values[only])}
                else:
                    self.sent[queue.name] += 1
                    self.carried[queue.name] += len(values)
                    log.debug("batch_sent", kind=queue.name, size=len(values))
                    answers = await queue.many(list(values.values()))
        except LeaseLost as exc:
            for waiting in taken:
                lost = waiting.lease is not None and waiting.lease.lost
                self._deliver(
                    waiting,
                    exc
                    if lost
                    else RetriableError(
                        f"not sent: another record of its batch was claimed again meanwhile ({exc})",
                        place=waiting.lease.where if waiting.lease else None,
                    ),
                )
            return
        except Exception as exc:  # the whole request failed: every element alike
            for waiting in taken:
                self._deliver(waiting, exc)
            return
        except BaseException as exc:
            for waiting in taken:
                self._deliver(waiting, exc)
            raise
        for waiting in taken:
            if waiting.key in answers:
                self._deliver(waiting, answers[waiting.key])
            else:
                self._deliver(waiting, RetriableError(f"{queue.name}: the batch answered nothing for {waiting.key}"))

    def _deliver(self, waiting: _Waiting, answer: Any) -> None:
        """Hand a record its answer; from now on it counts as being worked on (its task resumes soon)."""
        if waiting.future.done():  # its record stopped waiting (cancelled at shutdown)
            return
        waiting.answered = True
        self.running += 1
        if waiting.cohort is not None:
            waiting.cohort.running += 1
        if isinstance(answer, BaseException):
            waiting.future.set_exception(answer)
        else:
            waiting.future.set_result(answer)


async def _answer(one: One, value: Any) -> Any:
    try:
        return await one(value)
    except Exception as exc:
        return exc


def _abandoned(task: asyncio.Task[None], taken: list[_Waiting], _future: asyncio.Future[Any]) -> None:
    """Cancel a batched call once every record it carries was cancelled (nobody waits for its answer)."""
    if not task.done() and all(member.future.cancelled() for member in taken):
        task.cancel()
