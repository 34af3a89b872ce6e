"""Plumbing shared by the vendor emulators: fault injection, rate limits, webhook sending.

Each ``connectors/<vendor>/emulator.py`` is a stateful ASGI app that speaks its
vendor's wire format. What they have in common lives here so no emulator writes it
again:

* :class:`FaultPlan` and :class:`FaultMiddleware`: inject 429 with ``Retry-After``,
  5xx, added latency, and *dropped responses* (the vendor commits, then the answer is
  lost: the client sees a transport error).
* :class:`WindowLimiter`: a fixed-window request counter an emulator uses to enforce
  its vendor's published limits (switched off or raised for benchmarks).
* :class:`WebhookSender`: posts signed webhook bodies to a target URL and keeps each
  delivery so a test can re-deliver it, as vendors do.
* :class:`Contract` and :class:`ContractGate`: an emulator given a contract checks every
  request it serves against the vendor's published contract (an OpenAPI description
  through :class:`OpenApiContract`, or a vendor SDK's request models) and refuses a
  breach with the vendor's own error body, keeping it in ``breaches`` so a test can
  assert that a connector sent none. The contract is built by the caller: the vendor
  files and SDKs are test dependencies, and nothing here reads a file.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol
from urllib.parse import parse_qsl

import httpx
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

FaultKind = Literal["status", "drop_response", "latency"]


@dataclass(kw_only=True)
class Fault:
    """One injected fault.

    Attributes:
        kind: ``status`` answers ``status`` without running the app; ``drop_response``
            runs the app (the change is committed) and then loses the answer;
            ``latency`` delays the answer by ``latency_s``.
        status: the status for ``status`` faults (429, 500, 503 ...).
        retry_after_s: a ``Retry-After`` header value for ``status`` faults.
        method / path_contains: which requests it applies to (``None`` = any).
        times: how many matching requests it hits (``None`` = every one).
        latency_s: seconds of delay for ``latency`` faults.
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


@dataclass
class FaultPlan:
    """The faults an emulator injects, taken in order of addition."""

    faults: list[Fault] = field(default_factory=list)

    def add(self, fault: Fault) -> Fault:
        """Queue a fault; returns it so a test can inspect ``times`` afterwards."""
        self.faults.append(fault)
        return fault

    def take(self, method: str, path: str) -> Fault | None:
        """The first fault that matches this request, spending one of its ``times``."""
        for fault in self.faults:
            if fault.matches(method, path):
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        self.faults.remove(fault)
                return fault
        return None

    def clear(self) -> None:
        """Remove every queued fault."""
        self.faults.clear()


class DroppedResponse(httpx.RemoteProtocolError):
    """The emulator committed the change and then dropped the connection."""


class FaultMiddleware:
    """ASGI middleware applying a :class:`FaultPlan` to an emulator's requests."""

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


class WebhookSender:
    """Posts webhook bodies to a subscriber and remembers each delivery.

    Args:
        client: the httpx client used to reach the subscriber (an ``ASGITransport``
            to syncd's app in tests, a real one for the demo).
        url: the subscriber's URL; ``None`` means webhooks are not subscribed.
    """

    def __init__(self, client: httpx.AsyncClient | None = None, url: str | None = None) -> None:
        self.client = client
        self.url = url
        self.deliveries: deque[Delivery] = deque(maxlen=1000)

    def subscribe(self, url: str, client: httpx.AsyncClient) -> None:
        """Deliver future webhooks to ``url`` with ``client``."""
        self.url = url
        self.client = client

    async def send(self, body: bytes, headers: Mapping[str, str]) -> Delivery | None:
        """Post one delivery; ``None`` when nobody is subscribed. Errors are recorded, not raised."""
        if self.url is None or self.client is None:
            return None
        try:
            response = await self.client.post(self.url, content=body, headers=dict(headers))
            status: int | None = response.status_code
        except httpx.HTTPError:
            status = None
        delivery = Delivery(url=self.url, headers=dict(headers), body=body, status=status)
        self.deliveries.append(delivery)
        return delivery

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
