"""Shared HTTP plumbing: one client, one status→action table, retries, rate limits.

Every connector composes a :class:`VendorHttp` bound to its connection; none builds its
own client or retry loop. The rules:

* HTTP status → action is the single table :data:`STATUS_ACTIONS` (plus: any other 2xx
  is fine, any other 4xx fails the record, any other 5xx is retriable). A failed
  record raises :class:`Rejected` carrying every message the vendor sent (a connector
  says how its error bodies read with :class:`VendorErrors`); a 401/403 raises
  :class:`~syncd.core.errors.AuthError` saying what an admin does (reconnect, grant a scope).
* Only :class:`~syncd.core.errors.RetriableError` is retried (tenacity), with exponential
  back-off and jitter, or exactly the vendor's ``Retry-After`` when it sent one.
* A request that is not safe to repeat (a create without a vendor idempotency key)
  is sent with ``retry=False``: the engine then resolves a lost answer by looking the
  object up, never by creating it again (docs/architecture.md).
* Each connection has its own limiters, set to the vendor's published limits
  (:class:`RateLimit`); they can be raised or switched off in the connection settings.
* Every answer is counted by connection and status, 429 included, and every call that
  got none (``syncd_vendor_calls_total``; :class:`CallMetrics`), here and nowhere else.
* Replicas sharing a PostgreSQL database also share each vendor budget
  (:class:`SharedBudget`): every request reserves a slot of the vendor's "``L`` per
  ``W``" in one row, so together they stay under the limit.
* Inside a worker's claimed row (:func:`syncd.plumbing.leases.current`), every vendor write is
  preceded by the lease's write guard (a fenced renewal: a worker whose claim was taken
  over sends nothing), and the retries of one request stop before they would spend the
  lease's retry budget (four fifths of the lease left; nothing once the claim is lost or the
  process is stopping): the row then goes back to the queue with its back-off. Once the
  process is stopping, no request is started (the one in flight finishes).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import httpx
import structlog
from aiolimiter import AsyncLimiter
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.stop import stop_base

from syncd.core.errors import AuthError, FatalError, LeaseLost, NotFound, RateLimited, RecordError, RetriableError
from syncd.plumbing import leases

log = structlog.get_logger("syncd.plumbing.http")


class Action(enum.Enum):
    """What the caller does with a response of a given status."""

    OK = "ok"
    RETRY = "retry"
    RATE_LIMITED = "rate_limited"
    AUTH = "auth"
    NOT_FOUND = "not_found"
    FAIL_RECORD = "fail_record"


STATUS_ACTIONS: Mapping[int, Action] = {
    401: Action.AUTH,
    403: Action.AUTH,
    404: Action.NOT_FOUND,
    408: Action.RETRY,
    409: Action.RETRY,
    425: Action.RETRY,
    429: Action.RATE_LIMITED,
    500: Action.RETRY,
    502: Action.RETRY,
    503: Action.RETRY,
    504: Action.RETRY,
}


def action_for(status: int) -> Action:
    """The action for an HTTP status: the table, then the class of the status."""
    if status in STATUS_ACTIONS:
        return STATUS_ACTIONS[status]
    if status < 400:
        return Action.OK
    if status >= 500:
        return Action.RETRY
    return Action.FAIL_RECORD


def retry_after_s(headers: httpx.Headers, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date), if present."""
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


@dataclass(frozen=True, kw_only=True)
class RateLimit:
    """A vendor's published limit: ``max_requests`` per ``period_s`` seconds.

    Attributes:
        max_requests: requests allowed per period.
        period_s: the period in seconds.
        concurrency: requests in flight at once (Xero: 5), if the vendor limits that.
        name: which bucket (``default``, ``search``); a request names its bucket.
        window_limit / window_s: the vendor's own "``window_limit`` per ``window_s``"
            this bucket was derived from (:func:`within`); a shared budget counts these.
    """

    max_requests: int
    period_s: float
    concurrency: int | None = None
    name: str = "default"
    window_limit: int | None = None
    window_s: float | None = None


def within(
    limit: int | None, window_s: float, *, name: str = "default", concurrency: int | None = None
) -> list[RateLimit]:
    """The bucket that keeps a client under a vendor's "``limit`` per ``window_s``".

    aiolimiter is a leaky bucket: it lets its capacity through at once, then drips. A
    bucket of the full limit would pass up to twice the limit in one window (burst +
    drip), and the vendor would answer 429. So the capacity is a small burst
    ``c = max(1, limit // 4)`` and the drip fills the rest of the window:
    ``c + (window_s / period) * c = limit``, i.e. ``period = c * window_s / (limit - c)``.

    Args:
        limit: the vendor's published number; ``None`` or 0 switches limiting off.
        window_s: the vendor's window in seconds.
        name: the bucket's name.
        concurrency: requests in flight at once, if the vendor limits that too.

    Returns:
        the bucket (or a concurrency-only bucket, or nothing when both are off).
    """
    if not limit:
        return [RateLimit(max_requests=10**9, period_s=1, concurrency=concurrency, name=name)] if concurrency else []
    burst = max(1, limit // 4)
    vendor: dict[str, Any] = {"concurrency": concurrency, "name": name, "window_limit": limit, "window_s": window_s}
    if limit <= burst:
        return [RateLimit(max_requests=1, period_s=window_s / limit, **vendor)]
    return [RateLimit(max_requests=burst, period_s=burst * window_s / (limit - burst), **vendor)]


class _Bucket:
    def __init__(self, limit: RateLimit) -> None:
        self.limiter = AsyncLimiter(limit.max_requests, limit.period_s)
        self.slots = asyncio.Semaphore(limit.concurrency) if limit.concurrency else None
        self.limit = limit

    @contextlib.asynccontextmanager
    async def hold(self, budget: SharedBudget | None = None) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            if self.slots is not None:
                await stack.enter_async_context(self.slots)
            await self.limiter.acquire()
            # Last, right before the call: a slot reserved earlier could be missed while queueing here.
            if budget is not None and self.limit.window_limit and self.limit.window_s:
                await budget.acquire(self.limit.name, limit=self.limit.window_limit, window_s=self.limit.window_s)
            yield


def _error_text(response: httpx.Response, limit: int = 300) -> str:
    """A short excerpt of a vendor's error body (vendors don't echo our credentials)."""
    text = response.text.strip().replace("\n", " ")
    return text[:limit] + ("…" if len(text) > limit else "")


class Rejected(RecordError, FatalError):
    """The vendor refused this record as sent (400, 422 …): dead-letter it, never resend it as is.

    A :class:`~syncd.core.errors.RecordError` (the engine dead-letters the record on the first
    attempt and the rest keep flowing) and a :class:`~syncd.core.errors.FatalError` (the call
    will not succeed by repeating it).

    Attributes:
        status: the HTTP status.
        messages: every message the vendor sent, in its words.
    """

    def __init__(self, message: str, *, status: int, messages: Sequence[str], place: str | None = None) -> None:
        super().__init__(message, place=place)
        self.status = status
        self.messages = tuple(messages)


class VendorErrors(Protocol):
    """How one vendor's error answers read; a connector hands one to :class:`VendorHttp`."""

    def messages(self, response: httpx.Response) -> list[str]:
        """Every message in an error body, in the vendor's words (empty when there is none)."""
        ...

    def auth_advice(self, response: httpx.Response) -> str:
        """What an admin does about this 401 or 403 (reconnect, grant a scope); never a secret."""
        ...


def raise_for_action(response: httpx.Response, *, connection: str, errors: VendorErrors | None = None) -> None:
    """Raise the :mod:`syncd.core.errors` class the status table names; return on success.

    The body must have been read (``VendorHttp`` sends without streaming).
    """
    action = action_for(response.status_code)
    if action is Action.OK:
        return
    where = f"{connection}: {response.request.method} {response.request.url.path}"
    status = response.status_code
    if action is Action.RATE_LIMITED:
        raise RateLimited(f"{where} answered 429", retry_after_s=retry_after_s(response.headers))
    if action is Action.RETRY:
        raise RetriableError(
            f"{where} answered {status}: {_error_text(response)}",
            retry_after_s=retry_after_s(response.headers),
        )
    if action is Action.AUTH:
        advice = errors.auth_advice(response) if errors else "check the connection's credentials with `syncd check`"
        raise AuthError(f"{where} answered {status}: {advice}")
    if action is Action.NOT_FOUND:
        raise NotFound(f"{where} answered 404")
    messages = (errors.messages(response) if errors else []) or [_error_text(response)]
    raise Rejected(f"{where} answered {status}: " + "; ".join(messages), status=status, messages=messages)


Sleep = Callable[[float], Awaitable[None]]


class CallMetrics(Protocol):
    """Where :class:`VendorHttp` counts its calls (:class:`syncd.plumbing.metrics.Metrics`)."""

    def vendor_answered(self, connection: str, response: httpx.Response) -> None:
        """An answer (and those an auth flow consumed before it, in ``response.history``)."""
        ...

    def vendor_unanswered(self, connection: str, why: str) -> None:
        """A call that got no answer: ``timeout`` or ``transport_error``."""
        ...


class BudgetStore(Protocol):
    """Where a shared budget is counted (:meth:`syncd.store.db.Store.take_budget`)."""

    async def take_budget(self, key: str, window_s: float, limit: int, now: datetime) -> float | None:
        """Reserve the next slot of ``key``; ``None`` if it is now, else the seconds until it starts."""
        ...


class SharedBudget:
    """A connection's vendor budget, shared by every replica through the database.

    Each request reserves the next free slot of the vendor's "``L`` per ``W``" (slots
    ``W * (1 + slack) / L`` apart) in one row of the store, and sleeps until its slot.
    Evenly spaced slots keep any ``W`` seconds under ``L`` whichever way the vendor
    aligns its windows; fixed windows of our own would not: a vendor window opened
    at another moment than ours can take the end of one of our windows and the start
    of the next (measured: 429s with two replicas, BENCHMARKS.md). ``slack`` absorbs
    the jitter between the moment a slot starts and the moment the vendor counts the
    call, and the replicas' clock differences (they must agree to well within
    ``slack * W``: NTP), at a cost of ``slack`` of the budget (1 s a minute: 1.6 %).
    Bursts are the in-process limiter's business; across replicas, calls are paced.

    Args:
        store: where the budget is counted.
        connection: the connection name; with the bucket name it keys the budget.
        clock: the current time (aware; injected in tests).
        sleep: how to wait for a slot (injected in tests).
        slack: the fraction of every vendor window added to it.
    """

    def __init__(
        self,
        store: BudgetStore,
        *,
        connection: str,
        clock: Callable[[], datetime],
        sleep: Sleep = asyncio.sleep,
        slack: float = 1 / 60,
    ) -> None:
        self.store = store
        self.connection = connection
        self.clock = clock
        self.sleep = sleep
        self.slack = slack

    async def acquire(self, bucket: str, *, limit: int, window_s: float) -> None:
        """Reserve ``bucket``'s next slot of ``limit`` per ``window_s`` and wait for it."""
        key = f"{self.connection}:{bucket}"
        wait_s = await self.store.take_budget(key, window_s * (1 + self.slack), limit, self.clock())
        if wait_s is not None:
            await self.sleep(wait_s)


class _WaitPolicy:
    """Exponential back-off with jitter, or exactly the vendor's Retry-After."""

    def __init__(self, base_s: float, cap_s: float) -> None:
        self.base_s = base_s
        self.cap_s = cap_s

    def __call__(self, state: Any) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RetriableError) and exc.retry_after_s is not None:
            return min(exc.retry_after_s, self.cap_s)
        backoff = self.base_s * (2 ** (state.attempt_number - 1))
        return float(min(self.cap_s, backoff) * (0.5 + random.random() / 2))


READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class _WithinLease(stop_base):
    """Stop retrying once the next wait would end past the lease's retry budget, or the lease is lost.

    Time spent is the larger of the wall time since the first attempt and the waits
    taken (an injected sleep takes no wall time, as in tests).
    """

    def __init__(self, lease: leases.Lease) -> None:
        self.lease = lease
        self.budget_s = lease.retry_budget_s()

    def __call__(self, retry_state: RetryCallState) -> bool:
        if self.lease.retry_budget_s() <= 0:  # lost, or the process is stopping
            return True
        spent = max(retry_state.seconds_since_start or 0.0, retry_state.idle_for)
        return spent + (retry_state.upcoming_sleep or 0.0) > self.budget_s


class VendorHttp:
    """HTTP for one connection: base URL, auth, limits, retries and the status table.

    Args:
        client: the shared ``httpx.AsyncClient``.
        connection: connection name, for messages and logs.
        base_url: the vendor API root (configurable: vendor, emulator or proxy).
        auth: an ``httpx.Auth`` (bearer token, OAuth2 refresh flow), or ``None``.
        headers: headers sent on every request (``Accept``, tenant ids ...).
        limits: the vendor's rate limits; an empty sequence switches limiting off.
        max_attempts: attempts for a retriable failure, including the first.
        backoff_base_s / backoff_cap_s: back-off bounds in seconds.
        sleep: the sleep used between attempts (injected in tests).
        budget: a budget shared with other replicas, spent by every bucket that
            knows its vendor window (:func:`within`); ``None``: this process only.
        errors: how the vendor's error bodies read (messages, auth advice).
        metrics: counts every answer by status (and every call that got none) in
            ``syncd_vendor_calls_total``; ``None`` counts nothing.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        connection: str,
        base_url: str,
        auth: httpx.Auth | None = None,
        headers: Mapping[str, str] | None = None,
        limits: Sequence[RateLimit] = (),
        max_attempts: int = 5,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 60.0,
        sleep: Sleep = asyncio.sleep,
        budget: SharedBudget | None = None,
        errors: VendorErrors | None = None,
        metrics: CallMetrics | None = None,
    ) -> None:
        self.client = client
        self.metrics = metrics
        self.errors = errors
        self.connection = connection
        self.base_url = base_url.rstrip("/")
        self.auth = auth
        self.headers = dict(headers or {})
        self.buckets = {limit.name: _Bucket(limit) for limit in limits}
        self.max_attempts = max_attempts
        self.wait = _WaitPolicy(backoff_base_s, backoff_cap_s)
        self.sleep = sleep
        self.budget = budget
        self.calls = 0

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        bucket: str = "default",
        retry: bool = True,
        write: bool | None = None,
    ) -> httpx.Response:
        """Send a request and return the 2xx response, or raise per the status table.

        Args:
            method / path: the call; ``path`` is joined to the base URL.
            params / json / content / headers: as for httpx.
            bucket: which rate-limit bucket the call spends.
            retry: ``False`` for a call that is unsafe to repeat.
            write: whether the call changes something at the vendor (then the lease's
                write guard runs before it); default: any method but GET, HEAD and
                OPTIONS. A read sent as POST (a search) passes ``False``.

        Raises:
            RetriableError: still failing after ``max_attempts`` (or ``retry=False``),
                or the next retry would not fit in the lease's retry budget.
            LeaseLost: the worker's claim was taken over; nothing more was sent.
            Stopping: the process is stopping (in a worker's row); nothing was sent.
            AuthError, NotFound, Rejected: per :data:`STATUS_ACTIONS`.
        """
        attempts = self.max_attempts if retry else 1
        lease = leases.current()
        if lease is not None:
            lease.before_call(f"{self.connection}: {method} {path}")
        stop: stop_base = stop_after_attempt(attempts)
        if lease is not None:
            stop = stop | _WithinLease(lease)
        retrying = AsyncRetrying(
            stop=stop,
            wait=self.wait,
            retry=retry_if_exception_type(RetriableError),
            sleep=self.sleep,
            reraise=True,
        )
        writes = method.upper() not in READ_METHODS if write is None else write
        guard = lease if writes else None
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._send(method, path, params, json, content, headers, bucket, guard)
        except RetriableError as exc:
            if lease is not None and lease.lost:
                raise LeaseLost(
                    f"{self.connection}: {method} {path} failed and the lease was taken over meanwhile: not retried",
                    place=lease.where,
                ) from exc
            raise
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    def call_interval_s(self) -> float:
        """Seconds between calls at the default bucket's sustained rate (0 without a limit).

        The engine sizes a claim by it: a batch of rows must be finishable within the
        lease at this pace (docs/architecture.md, Leases and fencing).
        """
        bucket = self.buckets.get("default")
        if bucket is None:
            return 0.0
        limit = bucket.limit
        interval = limit.period_s / limit.max_requests if limit.max_requests < 10**9 else 0.0
        if self.budget is not None and limit.window_limit and limit.window_s:
            interval = max(interval, limit.window_s * (1 + self.budget.slack) / limit.window_limit)
        return interval

    async def _send(
        self,
        method: str,
        path: str,
        params: Mapping[str, Any] | None,
        json: Any,
        content: bytes | None,
        headers: Mapping[str, str] | None,
        bucket: str,
        guard: leases.Lease | None,
    ) -> httpx.Response:
        url = path if path.startswith("http") else f"{self.base_url}{path}"
        merged = {**self.headers, **(headers or {})}
        limiter = self.buckets.get(bucket) or self.buckets.get("default")
        async with limiter.hold(self.budget) if limiter else contextlib.nullcontext():
            if guard is not None:  # last, after any wait for a rate-limit slot
                await guard.guard(f"{self.connection}: {method} {path}")
            self.calls += 1
            try:
                response = await self.client.request(
                    method, url, params=params, json=json, content=content, headers=merged, auth=self._auth()
                )
            except httpx.TimeoutException as exc:
                self._unanswered("timeout")
                raise RetriableError(f"{self.connection}: {method} {path} timed out") from exc
            except httpx.TransportError as exc:
                self._unanswered("transport_error")
                raise RetriableError(f"{self.connection}: {method} {path} failed: {type(exc).__name__}") from exc
        if self.metrics is not None:
            self.metrics.vendor_answered(self.connection, response)
        log.debug("http_request", connection=self.connection, method=method, path=path, status=response.status_code)
        raise_for_action(response, connection=self.connection, errors=self.errors)
        return response

    def _unanswered(self, why: str) -> None:
        if self.metrics is not None:
            self.metrics.vendor_unanswered(self.connection, why)

    def _auth(self) -> httpx.Auth | httpx._client.UseClientDefault:
        return self.auth if self.auth is not None else httpx.USE_CLIENT_DEFAULT


def make_client(
    *,
    timeout_s: float = 30.0,
    transport: httpx.AsyncBaseTransport | None = None,
    mounts: Mapping[str, httpx.AsyncBaseTransport] | None = None,
    user_agent: str = "syncd",
) -> httpx.AsyncClient:
    """The one shared ``httpx.AsyncClient`` of the process.

    Args:
        timeout_s: per-request timeout in seconds.
        transport: an alternative transport (``ASGITransport`` to an emulator in tests).
        mounts: URL prefix → transport (``{"http://xero.test": ASGITransport(app)}``).
        user_agent: the ``User-Agent`` header (Harvest asks for a contact in it).
    """
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s, connect=10.0),
        limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
        transport=transport,
        mounts=dict(mounts) if mounts else None,
        headers={"User-Agent": user_agent},
        follow_redirects=False,
    )
