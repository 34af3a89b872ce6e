"""Plumbing shared by the vendor emulators: fault injection, rate limits, webhook sending.

Each ``connectors/<vendor>/emulator.py`` is a stateful ASGI app that speaks its
vendor's wire format. What they have in common lives here so no emulator writes it
again:

* :class:`FaultPlan` and :class:`FaultMiddleware`: inject 429 with ``Retry-After``,
  5xx, added latency, hung requests, and *dropped responses* (the vendor commits, then
  the answer is lost: the client sees a transport error), queued one by one or drawn
  per request from a seed (:class:`FaultRates`; off unless a test arms it).
* :class:`ElementFault`: one element of a batch write refused with the vendor's per-element
  error while the others are stored (queued with :meth:`FaultPlan.refuse_element`; each
  emulator says which text of an element it matches, e.g. Xero the ``Reference``).
* :class:`WindowLimiter`: a fixed-window request counter an emulator uses to enforce
  its vendor's published limits (switched off or raised for benchmarks).
* :class:`WebhookSender`: posts signed webhook bodies to a target URL and keeps each
  delivery so a test can re-deliver it, as vendors do; with :class:`WebhookFaults` it
  duplicates and reorders deliveries, drawn from a seed.
* :class:`Contract` and :class:`ContractGate`: an emulator given a contract checks every
  request it serves against the vendor's published contract (an OpenAPI description
  through :class:`OpenApiContract`, or a vendor SDK's request models) and refuses a
  breach with the vendor's own error body, keeping it in ``breaches`` so a test can
  assert that a connector sent none. The contract is built by the caller: the vendor
  files and SDKs are test dependencies, and nothing here reads a file.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol
from urllib.parse import parse_qsl

import httpx
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

FaultKind = Literal["status", "drop_response", "latency", "hang"]

# Methods that change something at the vendor: only these can lose an answer after a commit.
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Path segments that are ids (numbers, UUIDs): a seeded plan counts requests per route, not per id.
_ID_SEGMENT = re.compile(r"/(?:\d+|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})(?=/|$)")


@dataclass(kw_only=True)
class Fault:
    """One injected fault.

    Attributes:
        kind: ``status`` answers ``status`` without running the app; ``drop_response``
            runs the app (the change is committed) and then loses the answer;
            ``latency`` delays the answer by ``latency_s``; ``hang`` answers nothing for
            ``latency_s`` and then gives up without running the app (set it past the
            client's timeout on a real socket; in-process it ends as a read timeout).
        status: the status for ``status`` faults (429, 500, 503 ...).
        retry_after_s: a ``Retry-After`` header value for ``status`` faults.
        method / path_contains: which requests it applies to (``None`` = any).
        times: how many matching requests it hits (``None`` = every one).
        latency_s: seconds of delay for ``latency`` and ``hang`` faults.
    """

    kind: FaultKind
    status: int = 500
    retry_after_s: int | None = None
    method: str | None = None
    path_contains: str | None = None
    times: int | None = 1
    latency_s: float = 0.0

    def matches(self, method: str, path: str) -> bool:
        """Whether this fault applies to a request."""
        if self.method is not None and self.method.upper() != method.upper():
            return False
        return self.path_contains is None or self.path_contains in path


@dataclass(kw_only=True)
class ElementFault:
    """One element of a batch write refused with a validation message (the rest are stored).

    Attributes:
        match: a fragment of the element's identifying text (each emulator names the field
            it matches, e.g. the Xero emulator an invoice's ``Reference``).
        message: the validation message the element is refused with.
        times: how many matching elements it refuses (``None`` = every one).
    """

    match: str
    message: str
    times: int | None = 1


@dataclass(frozen=True, kw_only=True)
class FaultRates:
    """How often a seeded :class:`FaultPlan` injects each fault, per request (0 to 1 each).

    Attributes:
        rate_limited: 429 with ``Retry-After: retry_after_s``.
        server_error: a 500, 502 or 503.
        slow: the answer is delayed by ``slow_s`` (then served).
        timeout: no answer (``hang``) for ``hang_s``; the request is not served.
        lost_answer: a write (POST, PUT, PATCH, DELETE) is served, so the vendor commits,
            and its answer is then lost; other methods get no fault from this share.
        retry_after_s / slow_s / hang_s: the parameters of those faults.
        spare: path fragments no seeded fault touches. The token endpoints by default: a
            refresh answer lost after the vendor rotated a single-use refresh token ends the
            connection for good, a scenario of its own (``tests/faults/test_tokens.py``).
    """

    rate_limited: float = 0.0
    server_error: float = 0.0
    slow: float = 0.0
    timeout: float = 0.0
    lost_answer: float = 0.0
    retry_after_s: int = 1
    slow_s: float = 0.02
    hang_s: float = 0.02
    spare: tuple[str, ...] = ("/connect/token", "/oauth/")

    def __post_init__(self) -> None:
        shares = (self.rate_limited, self.server_error, self.slow, self.timeout, self.lost_answer)
        if any(not 0 <= share <= 1 for share in shares) or sum(shares) > 1:
            raise ValueError(f"fault rates must each be within 0..1 and sum to at most 1, not {shares}")

    @property
    def total(self) -> float:
        """The share of requests that get some fault (writes; reads miss ``lost_answer``)."""
        return self.rate_limited + self.server_error + self.slow + self.timeout + self.lost_answer


class FaultPlan:
    """The faults an emulator injects: queued ones first, then seeded random ones.

    Off by default (no seed, nothing queued): an emulator built by the demo or a plain
    test serves every request. Queued faults (:meth:`add`) are taken in order of
    addition. With a ``seed`` and :class:`FaultRates`, every other request draws its
    fault from a generator seeded by the seed, the method, the route (ids replaced by
    ``{id}``) and how many requests that route had before, so a seed gives the same
    faults to the same sequence of calls, whatever ids the vendor handed out and however
    calls to different routes interleave. Only the fault suite's harness arms one.

    Args:
        seed: the seed; ``None`` leaves only queued faults.
        rates: the seeded faults' shares (none by default).

    Attributes:
        faults: the queued faults.
        rates: the seeded shares (may be replaced while running, e.g. to end a storm).
        injected: how many faults of each kind were injected (``status:429``,
            ``drop_response``, ``latency``, ``hang`` ...).
    """

    def __init__(self, seed: int | None = None, rates: FaultRates | None = None) -> None:
        self.seed = seed
        self.rates = rates or FaultRates()
        self.faults: list[Fault] = []
        self.element_faults: list[ElementFault] = []
        self.injected: Counter[str] = Counter()
        self._seen: Counter[tuple[str, str]] = Counter()

    def add(self, fault: Fault) -> Fault:
        """Queue a fault; returns it so a test can inspect ``times`` afterwards."""
        self.faults.append(fault)
        return fault

    def refuse_element(self, match: str, message: str, *, times: int | None = 1) -> ElementFault:
        """Queue the refusal of a batch element whose identifying text contains ``match``."""
        fault = ElementFault(match=match, message=message, times=times)
        self.element_faults.append(fault)
        return fault

    def element_refusal(self, text: str) -> str | None:
        """The message an element identified by ``text`` is refused with (spending one of its ``times``), or ``None``."""
        for fault in self.element_faults:
            if fault.match in text:
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        self.element_faults.remove(fault)
                self.injected["element_refused"] += 1
                return fault.message
        return None

    def take(self, method: str, path: str) -> Fault | None:
        """The fault for this request (a queued one first, spending one of its ``times``), or ``None``."""
        fault = self._queued(method, path) or self._drawn(method.upper(), path)
        if fault is not None:
            self.injected[fault.kind if fault.kind != "status" else f"status:{fault.status}"] += 1
        return fault

    def _queued(self, method: str, path: str) -> Fault | None:
        for fault in self.faults:
            if fault.matches(method, path):
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        self.faults.remove(fault)
                return fault
        return None

    def _drawn(self, method: str, path: str) -> Fault | None:
        rates = self.rates
        if self.seed is None or rates.total == 0 or any(part in path for part in rates.spare):
            return None
        route = (method, _ID_SEGMENT.sub("/{id}", path))
        draw = random.Random(f"{self.seed}:{route[0]}:{route[1]}:{self._seen[route]}")
        self._seen[route] += 1
        roll = draw.random()
        for share, fault in (
            (rates.rate_limited, Fault(kind="status", status=429, retry_after_s=rates.retry_after_s)),
            (rates.server_error, Fault(kind="status", status=draw.choice((500, 502, 503)))),
            (rates.slow, Fault(kind="latency", latency_s=rates.slow_s)),
            (rates.timeout, Fault(kind="hang", latency_s=rates.hang_s)),
            (rates.lost_answer, Fault(kind="drop_response")),
        ):
            if roll < share:
                return fault if fault.kind != "drop_response" or method in WRITE_METHODS else None
            roll -= share
        return None

    def clear(self) -> None:
        """Remove every queued fault (element refusals too) and stop the seeded ones."""
        self.faults.clear()
        self.element_faults.clear()
        self.rates = FaultRates()


class DroppedResponse(httpx.RemoteProtocolError):
    """The emulator committed the change and then dropped the connection."""


class HungResponse(httpx.ReadTimeout):
    """The emulator never answered (in-process, where no socket times out)."""


class FaultMiddleware:
    """ASGI middleware applying a :class:`FaultPlan` to an emulator's requests.

    Over ``httpx.ASGITransport`` a dropped or hung answer reaches the client as the
    exception a socket would give (a protocol error, a read timeout); over a real server
    the connection is cut (uvicorn answers 500 when nothing was sent yet).
    """

    def __init__(self, app: ASGIApp, plan: FaultPlan) -> None:
        self.app = app
        self.plan = plan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        fault = self.plan.take(scope["method"], scope["path"])
        if fault is None:
            await self.app(scope, receive, send)
        elif fault.kind == "latency":
            await asyncio.sleep(fault.latency_s)
            await self.app(scope, receive, send)
        elif fault.kind == "hang":
            await asyncio.sleep(fault.latency_s)
            raise HungResponse("emulator fault: no answer")
        elif fault.kind == "status":
            await _send_status(send, fault)
        else:
            await self.app(scope, receive, _discard)
            raise DroppedResponse("emulator fault: response dropped after the change was committed")


async def _discard(message: Message) -> None:
    """Swallow the app's answer (a dropped response)."""


async def _send_status(send: Send, fault: Fault) -> None:
    headers = [(b"content-type", b"application/json")]
    if fault.retry_after_s is not None:
        headers.append((b"retry-after", str(fault.retry_after_s).encode()))
    body = b'{"message": "injected fault"}'
    await send({"type": "http.response.start", "status": fault.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class WindowLimiter:
    """Fixed-window request counting, as vendors describe their limits.

    Args:
        limit: requests allowed per window; ``None`` switches the limit off.
        window_s: window length in seconds.
        clock: monotonic seconds (injected in tests).
    """

    def __init__(self, limit: int | None, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window_s = window_s
        self.clock = clock
        self._windows: dict[str, tuple[float, int]] = {}

    def hit(self, key: str = "") -> float | None:
        """Count one request; ``None`` if allowed, else seconds until the window resets."""
        if self.limit is None:
            return None
        now = self.clock()
        start, count = self._windows.get(key, (now, 0))
        if now - start >= self.window_s:
            start, count = now, 0
        if count >= self.limit:
            return max(0.0, self.window_s - (now - start))
        self._windows[key] = (start, count + 1)
        return None

    def remaining(self, key: str = "") -> int | None:
        """Requests left in the current window (``None`` when unlimited)."""
        if self.limit is None:
            return None
        start, count = self._windows.get(key, (self.clock(), 0))
        if self.clock() - start >= self.window_s:
            return self.limit
        return self.limit - count


@dataclass(frozen=True, kw_only=True)
class Delivery:
    """One webhook delivery as sent, kept for re-delivery."""

    url: str
    headers: Mapping[str, str]
    body: bytes
    status: int | None


@dataclass(frozen=True, kw_only=True)
class WebhookFaults:
    """Seeded delivery faults: vendors deliver a webhook more than once and out of order.

    HubSpot and Xero both say a subscriber must expect duplicates and must not rely on
    the order of deliveries (HubSpot retries a delivery up to 10 times over 24 hours;
    Xero "with decreasing frequency for up to 24 hours", ``syncd/web/webhooks.py``).

    Attributes:
        seed: the seed; each delivery's fate is drawn from the seed and its sequence number.
        duplicate: share of deliveries sent more than once (2 to ``max_copies`` times).
        reorder: share of deliveries held back and sent after the next one (or at
            :meth:`WebhookSender.flush`).
        max_copies: the most times one delivery is sent.
    """

    seed: int
    duplicate: float = 0.0
    reorder: float = 0.0
    max_copies: int = 3

    def fate(self, sequence: int) -> tuple[int, bool]:
        """(copies, held back) for the ``sequence``-th delivery."""
        draw = random.Random(f"{self.seed}:webhook:{sequence}")
        copies = draw.randint(2, max(2, self.max_copies)) if draw.random() < self.duplicate else 1
        return copies, draw.random() < self.reorder


class WebhookSender:
    """Posts webhook bodies to a subscriber and remembers each delivery.

    Args:
        client: the httpx client used to reach the subscriber (an ``ASGITransport``
            to syncd's app in tests, a real one for the demo).
        url: the subscriber's URL; ``None`` means webhooks are not subscribed.

    Attributes:
        faults: duplicate and reordered deliveries (:class:`WebhookFaults`); ``None``
            (the default) sends each delivery once, in order.
        deliveries: every delivery sent, oldest first (the last 1000).
        failed: deliveries the subscriber did not accept (no answer, 429 or 5xx), not yet
            retried; :meth:`retry_failed` sends them again, as vendors retry (HubSpot
            "retries any status but 400/401/403/404/405", ``syncd/web/webhooks.py``).
    """

    def __init__(self, client: httpx.AsyncClient | None = None, url: str | None = None) -> None:
        self.client = client
        self.url = url
        self.faults: WebhookFaults | None = None
        self.deliveries: deque[Delivery] = deque(maxlen=1000)
        self.failed: list[Delivery] = []
        self._held: list[tuple[bytes, Mapping[str, str], int]] = []
        self._sequence = 0

    def subscribe(self, url: str, client: httpx.AsyncClient) -> None:
        """Deliver future webhooks to ``url`` with ``client``."""
        self.url = url
        self.client = client

    async def send(self, body: bytes, headers: Mapping[str, str]) -> Delivery | None:
        """Post one delivery; ``None`` when nobody is subscribed or it was held back.

        Errors are recorded, not raised. With :attr:`faults`, the delivery may be sent
        several times, or held back until after the next one.
        """
        if self.url is None or self.client is None:
            return None
        self._sequence += 1
        copies, hold = self.faults.fate(self._sequence) if self.faults is not None else (1, False)
        held, self._held = self._held, []
        if hold:
            self._held.append((body, headers, copies))
            first = None
        else:
            first = await self._post(body, headers, copies)
        for earlier in held:
            await self._post(*earlier)
        return first

    async def flush(self) -> int:
        """Send every delivery still held back; how many were sent."""
        held, self._held = self._held, []
        for body, headers, copies in held:
            await self._post(body, headers, copies)
        return len(held)

    async def _post(self, body: bytes, headers: Mapping[str, str], copies: int) -> Delivery | None:
        first = None
        for _ in range(copies):
            delivery = await self._post_once(body, headers)
            first = first or delivery
        return first

    async def _post_once(self, body: bytes, headers: Mapping[str, str]) -> Delivery | None:
        if self.url is None or self.client is None:
            return None
        try:
            response = await self.client.post(self.url, content=body, headers=dict(headers))
            status: int | None = response.status_code
        except httpx.HTTPError:
            status = None
        delivery = Delivery(url=self.url, headers=dict(headers), body=body, status=status)
        self.deliveries.append(delivery)
        if status is None or status == 429 or status >= 500:
            self.failed.append(delivery)
        return delivery

    async def retry_failed(self) -> int:
        """Send every failed delivery again, byte for byte; how many were accepted this time."""
        failed, self.failed = self.failed, []
        accepted = 0
        for delivery in failed:
            again = await self._post_once(delivery.body, delivery.headers)
            accepted += again is not None and again.status is not None and again.status < 300
        return accepted

    async def redeliver(self, delivery: Delivery) -> int | None:
        """Send an earlier delivery again, byte for byte, as vendors retry."""
        if self.client is None:
            return None
        response = await self.client.post(delivery.url, content=delivery.body, headers=dict(delivery.headers))
        return response.status_code


# ---------------------------------------------------------------------- contracts


@dataclass(frozen=True, kw_only=True)
class Call:
    """One request as a contract sees it.

    Attributes:
        method: the HTTP method, upper case.
        path: the full path (``/api.xro/2.0/Invoices``, ``/v2/time_entries``).
        query: the raw query string, without ``?``.
        headers: the headers, names in lower case.
        body: the raw body (``b""`` when there is none).
    """

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: bytes

    @classmethod
    async def of(cls, request: Request) -> Call:
        """The call a Starlette request makes (its body is read and kept for the handler)."""
        return cls(
            method=request.method.upper(),
            path=request.url.path,
            query=request.url.query,
            headers={name.lower(): value for name, value in request.headers.items()},
            body=await request.body(),
        )


@dataclass(frozen=True, kw_only=True)
class Breach:
    """A request an emulator refused because it breaks the vendor's contract."""

    call: Call
    problems: tuple[str, ...]


class Contract(Protocol):
    """A vendor's published contract for the requests an emulator serves."""

    def problems(self, call: Call) -> list[str]:
        """What ``call`` breaks, one sentence each naming the place; empty when it keeps the contract.

        A bad call is reported, never raised: the emulator answers it with the vendor's
        error body.
        """
        ...


class ContractGate:
    """The contract an emulator checks its requests against, and the breaches it refused.

    Args:
        contract: the contract; ``None`` checks nothing (the default of every emulator,
            as the demo runs without the test dependencies contracts are built from).

    Attributes:
        breaches: every refused request with its problems, oldest first.
        checked: how many requests were checked.
    """

    def __init__(self, contract: Contract | None) -> None:
        self.contract = contract
        self.breaches: list[Breach] = []
        self.checked = 0

    async def problems(self, request: Request, *, headers: Mapping[str, str] | None = None) -> tuple[str, ...]:
        """The problems of ``request`` (kept as a :class:`Breach` when there are any).

        ``headers`` are laid over the request's own before the check: what the vendor
        documents as implied where its description says required (Xero's tenant header
        on a custom connection).
        """
        if self.contract is None:
            return ()
        call = await Call.of(request)
        if headers:
            call = replace(call, headers={**call.headers, **{name.lower(): value for name, value in headers.items()}})
        self.checked += 1
        found = tuple(self.contract.problems(call))
        if found:
            self.breaches.append(Breach(call=call, problems=found))
        return found


class OpenApiContract:
    """A contract read from an OpenAPI description, checked with openapi-core.

    Parameters, headers and the JSON body of each request are validated against the
    operation its method and path select; a path or method the description lacks is a
    problem too.

    Args:
        spec: an ``openapi_core.OpenAPI`` the caller has loaded (and patched, where the
            file and the vendor's pages disagree).
        host_url: the scheme and host of the description's server (``https://api.xero.com``);
            requests are checked as if sent there, whatever host the emulator is reached by.
    """

    def __init__(self, spec: Any, *, host_url: str) -> None:
        self.spec = spec
        self.host_url = host_url.rstrip("/")

    def problems(self, call: Call) -> list[str]:
        """Every validation error openapi-core finds in ``call``, as sentences."""
        return [
            _openapi_problem(error) for error in self.spec.iter_request_errors(_OpenApiRequest(call, self.host_url))
        ]


class _OpenApiRequest:
    """A :class:`Call` as openapi-core's request protocol (``openapi_core.protocols.Request``)."""

    def __init__(self, call: Call, host_url: str) -> None:
        from openapi_core.datatypes import RequestParameters
        from werkzeug.datastructures import Headers, ImmutableMultiDict

        self.call = call
        self.host_url = host_url
        self.parameters = RequestParameters(
            query=ImmutableMultiDict(parse_qsl(call.query, keep_blank_values=True)),
            header=Headers(list(call.headers.items())),
            cookie=ImmutableMultiDict(),
        )

    @property
    def path(self) -> str:
        return self.call.path

    @property
    def method(self) -> str:
        return self.call.method.lower()

    @property
    def body(self) -> bytes | None:
        return self.call.body or None

    @property
    def content_type(self) -> str:
        return self.call.headers.get("content-type", "")


def _openapi_problem(error: Exception) -> str:
    """One openapi-core error as a sentence: its kind, its text and each schema error under it."""
    cause = error.__cause__
    details = [
        f"{getattr(item, 'json_path', '$')}: {getattr(item, 'message', item)}"
        for item in getattr(cause, "schema_errors", ())
    ]
    text = f"{type(error).__name__}: {error}"
    if cause is not None and not details:
        details = [str(cause)]
    return f"{text} ({'; '.join(details)})" if details else text
