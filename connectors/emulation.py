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
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import httpx
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
