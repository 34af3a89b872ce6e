"""The lease on a claimed row, held while a worker works on it.

A worker claims rows with a lease (:meth:`syncd.store.db.Store.claim`). While it works on
one, a :class:`Lease` makes sure no other worker can take the row over mid-call, and
that this worker stops as soon as one has (docs/architecture.md, Leases and fencing):

* **renewal**: a background task extends the lease every third of ``lease_s`` while
  the row's work runs, fenced (only while the row is still this claim's);
* **write guard**: right before each vendor write, :meth:`Lease.guard` renews the
  lease in the database and raises :class:`~syncd.core.errors.LeaseLost` if the claim was
  taken over, so a fenced worker writes nothing;
* **stop boundary**: once the process is stopping, :meth:`Lease.before_call` refuses
  every vendor call after the one in flight (:class:`~syncd.core.errors.Stopping`), so
  a stopping worker finishes only that call;
* **retry budget**: :meth:`Lease.retry_budget_s` bounds the HTTP plumbing's retries
  within one request (``syncd/plumbing/http.py``) below the lease left, and to nothing once
  the claim is lost or the process is stopping: the row goes back to the queue with
  its back-off instead of a worker sleeping on it.

The lease of the row being worked on is found through a context variable
(:func:`current`), so ``VendorHttp`` needs no argument threaded through every
connector call; the engine makes each lease with the store's fenced renewal
(:meth:`syncd.store.db.Store.renew`), so this module knows no table.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextvars import ContextVar
from datetime import datetime

import structlog

from syncd.core.errors import LeaseLost, Stopping

log = structlog.get_logger("syncd.plumbing.leases")

RENEW_FRACTION = 1 / 3  # renew every third of the lease: two renewals may fail or lag before it runs out
RETRY_SHARE = 0.8  # in-request retries end before the lease left does; the last fifth is for the request itself

Renew = Callable[[], Awaitable[datetime | None]]
"""Extends the lease in the database if the claim is still this worker's: its new end, else ``None``."""
RenewAll = Callable[[list["Lease"]], Awaitable[list[datetime | None]]]
"""Renews several leases in one transaction: each one's new end, else ``None`` (by :attr:`Lease.ref`)."""

_current: ContextVar[Lease | None] = ContextVar("syncd_lease", default=None)


def current() -> Lease | None:
    """The lease of the row this task works on, if any (none outside the workers)."""
    return _current.get()


class Lease:
    """A worker's hold on one claimed row.

    Args:
        where: the row, for messages (``effects.id=12 attempt 3``).
        until: when the lease ends as claimed.
        lease_s: the lease length (``[daemon].lease_s``).
        renew: the fenced renewal (:meth:`syncd.store.db.Store.renew` bound to the row).
        clock: the current aware time (the clock claims are made with).
        stopping: whether the process is shutting down (no new call and no retry then).
    """

    def __init__(
        self,
        *,
        where: str,
        until: datetime,
        lease_s: int,
        renew: Renew,
        clock: Callable[[], datetime],
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.where = where
        self.until = until
        self.lease_s = lease_s
        self._renew = renew
        self.clock = clock
        self.stopping = stopping
        self.lost = False
        self.ref: object = None  # the row, for a renewal of many at once (set by the engine)

    def remaining_s(self) -> float:
        """Seconds until the lease runs out, as last renewed (0 once lost)."""
        return 0.0 if self.lost else max(0.0, (self.until - self.clock()).total_seconds())

    def retry_budget_s(self) -> float:
        """Seconds a request's retries may take in all: none once lost or stopping."""
        if self.lost or self.stopping():
            return 0.0
        return self.remaining_s() * RETRY_SHARE

    def before_call(self, what: str) -> None:
        """Before a vendor call is started: refuse it once the process is stopping.

        Raises:
            Stopping: the process is stopping; ``what`` is not sent.
        """
        if self.stopping():
            raise Stopping(f"syncd is stopping; {what} was not sent", place=self.where)

    async def renew(self) -> bool:
        """Extend the lease if the row is still this claim's; ``False`` (and lost) if not."""
        if self.lost:
            return False
        until = await self._renew()
        if until is None:
            self.lost = True
            return False
        self.until = until
        return True

    async def guard(self, what: str) -> None:
        """Right before a vendor write: renew, or raise if the claim was taken over.

        Raises:
            LeaseLost: another worker claimed the row; ``what`` must not be sent.
        """
        if not await self.renew():
            raise LeaseLost(f"the lease was taken over; {what} was not sent", place=self.where)

    async def _keep(self, done: asyncio.Event) -> None:
        """Renew every third of the lease until ``done`` is set or the lease is lost."""
        interval = self.lease_s * RENEW_FRACTION
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout=interval)
            if done.is_set():
                return
            try:
                if not await self.renew():
                    log.warning("lease_renewal_refused", row=self.where)
                    return
            except Exception:  # the database is away: try again at the next interval
                log.exception("lease_renewal_failed", row=self.where)

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[Lease]:
        """Work on the row under this lease: renewed in the background, found by :func:`current`.

        The renewal task is told to stop, not cancelled: a renewal under way finishes
        its transaction (a cancelled one could leave its connection checked out).
        """
        token = _current.set(self)
        done = asyncio.Event()
        keeper = asyncio.create_task(self._keep(done))
        try:
            yield self
        finally:
            done.set()
            _current.reset(token)
            await asyncio.wait([keeper])  # not cancelled if this task is: it ends by itself


class Batch(Lease):
    """The leases of every record one batched vendor call carries, held as one.

    A batched call (:mod:`syncd.engine.batching`) runs in a task of its own, with this as
    its :func:`current` lease: the HTTP plumbing checks it as it would one row's.

    * **stop boundary**: refused once any member's process is stopping;
    * **retry budget**: the smallest of the members' (each must still hold its lease
      when the retries end);
    * **write guard**: every member is renewed right before the write; if any was taken
      over the whole call is not sent (:class:`~syncd.core.errors.LeaseLost`) and the
      batcher tells each member which it was: the lost one logs ``lease_lost``, the others
      retry (their next attempt looks up before creating).
    """

    def __init__(self, members: list[Lease], *, renew_all: RenewAll | None = None) -> None:
        self.members = members
        self._renew_many = renew_all
        first = members[0]
        super().__init__(
            where=f"batch of {len(members)}: "
            + ", ".join(m.where for m in members[:3])
            + (" …" if len(members) > 3 else ""),
            until=min(m.until for m in members),
            lease_s=min(m.lease_s for m in members),
            renew=self._renew_all,
            clock=first.clock,
            stopping=lambda: any(m.stopping() for m in members),
        )

    def retry_budget_s(self) -> float:
        return min(m.retry_budget_s() for m in self.members)

    def before_call(self, what: str) -> None:
        for member in self.members:
            member.before_call(what)

    async def _renew_all(self) -> datetime | None:
        if self._renew_many is None:
            for member in self.members:
                await member.renew()
        else:  # one transaction for them all
            held = [m for m in self.members if not m.lost]
            for member, until in zip(held, await self._renew_many(held), strict=True):
                if until is None:
                    member.lost = True
                else:
                    member.until = until
        if any(m.lost for m in self.members):
            return None
        return min(m.until for m in self.members)


@contextlib.contextmanager
def using(lease: Lease | None) -> Iterator[None]:
    """Make ``lease`` the one :func:`current` finds in the calling task (none: leave it as it is)."""
    if lease is None:
        yield
        return
    token = _current.set(lease)
    try:
        yield
    finally:
        _current.reset(token)
