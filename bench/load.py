"""The load generator: signed HubSpot deal-won webhooks, sent in closed or paced loops.

A webhook is built as the HubSpot emulator builds one (``HubSpotEmulator._change_event``
and ``_deliver``: a JSON array with one ``deal.propertyChange`` event for ``dealstage``)
and signed with :func:`connectors.hubspot.webhooks.sign_v3` over the exact URL syncd
checks, so syncd verifies it as it would a real delivery.

* :func:`closed_loop`: ``clients`` concurrent clients; each starts its next unit of work
  when its previous one is done. Only work started after the warm-up and finished
  before the end counts.
* :func:`paced`: work started on a fixed schedule (``rate`` per second) by a bounded
  pool; latency is counted from the *scheduled* start, so falling behind shows up as
  latency instead of being hidden (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from connectors.hubspot.emulator import APP_ID, PORTAL_ID
from connectors.hubspot.webhooks import sign_v3

# A unit of work: returns when it finished (``time.perf_counter()``), or ``None`` if it failed.
Work = Callable[[int], Awaitable[float | None]]


class Connection:
    """One keep-alive HTTP/1.1 connection that POSTs and reads the status (a lean load generator).

    httpx costs the load generator ~2 ms of CPU per request at high concurrency on
    this machine, as much as the server under test; a bare connection per client keeps
    the generator's share small. Responses must carry ``Content-Length`` (uvicorn's do).

    Args:
        url: ``http://host:port/path`` to post to.
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.path = parts.path
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, body: bytes, headers: Mapping[str, str]) -> int:
        """POST ``body``; the response status (the body is read and dropped).

        A kept-alive connection the server has closed meanwhile (uvicorn closes idle
        ones after 5 s) is reopened and the request sent once more; webhooks are
        idempotent, so a repeat is harmless.
        """
        if self._streams is not None and self._streams[0].at_eof():
            await self.aclose()
        reused = self._streams is not None
        try:
            return await self._exchange(body, headers)
        except (asyncio.IncompleteReadError, ConnectionError):
            await self.aclose()
            if not reused:
                raise
        return await self._exchange(body, headers)

    async def _exchange(self, body: bytes, headers: Mapping[str, str]) -> int:
        if self._streams is None:
            self._streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._streams
        head = [f"POST {self.path} HTTP/1.1", f"host: {self.host}:{self.port}", f"content-length: {len(body)}"]
        head += [f"{name}: {value}" for name, value in headers.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        status_line, *lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        length = 0
        for line in lines:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if length:
            await reader.readexactly(length)
        return int(status_line.split(" ", 2)[1])

    async def aclose(self) -> None:
        """Close the connection."""
        if self._streams is not None:
            self._streams[1].close()
            with contextlib.suppress(OSError):
                await self._streams[1].wait_closed()
            self._streams = None


class DealWonWebhooks:
    """Builds and sends signed ``deal.propertyChange`` (``dealstage`` → ``closedwon``) deliveries.

    Each concurrent sender gets its own keep-alive connection (:meth:`send` takes a
    slot number); connections are opened on first use and closed by :meth:`aclose`.

    Args:
        url: the full webhook URL (what is signed), e.g. ``http://127.0.0.1:8080/webhooks/hubspot``.
        secret: the HubSpot app's client secret.
    """

    def __init__(self, url: str, secret: str) -> None:
        self.url = url
        self.secret = secret
        self._event_ids = itertools.count(10_000)
        self._idle: list[Connection] = []
        self._all: list[Connection] = []

    def delivery(self, deal_id: int) -> tuple[bytes, dict[str, str]]:
        """The body and headers of one delivery announcing that ``deal_id`` was won."""
        now_ms = int(time.time() * 1000)
        event = {
            "eventId": next(self._event_ids),
            "subscriptionId": 1000,
            "portalId": PORTAL_ID,
            "appId": APP_ID,
            "occurredAt": now_ms,
            "subscriptionType": "deal.propertyChange",
            "attemptNumber": 0,
            "objectId": deal_id,
            "propertyName": "dealstage",
            "propertyValue": "closedwon",
            "changeSource": "CRM_UI",
            "sourceId": "userId:1",
        }
        body = json.dumps([event], separators=(",", ":")).encode()
        timestamp = str(now_ms)
        headers = {
            "content-type": "application/json",
            "x-hubspot-request-timestamp": timestamp,
            "x-hubspot-signature-v3": sign_v3(self.secret, method="POST", uri=self.url, body=body, timestamp=timestamp),
        }
        return body, headers

    async def send(self, deal_id: int) -> int:
        """Deliver one on an idle connection (a new one if none is idle); the HTTP status answered."""
        body, headers = self.delivery(deal_id)
        connection = self._idle.pop() if self._idle else self._open()
        try:
            status = await connection.post(body, headers)
        except BaseException:
            await connection.aclose()
            raise
        self._idle.append(connection)
        return status

    def _open(self) -> Connection:
        connection = Connection(self.url)
        self._all.append(connection)
        return connection

    async def aclose(self) -> None:
        """Close every connection."""
        for connection in self._all:
            await connection.aclose()
        self._all.clear()
        self._idle.clear()


class Exhausted(Exception):
    """Raised by a unit of work when there is nothing left to do: its client stops."""


@dataclass(frozen=True, kw_only=True)
class LoopResult:
    """What a load loop measured.

    Attributes:
        latencies_s: latency of each unit of work that counts.
        completed: units that count (started after the warm-up, done before the end).
        failed: units whose work reported failure or raised (any time).
        window_s: the measured window (after the warm-up).
        errors: the distinct exceptions raised by units of work (first few).
    """

    latencies_s: tuple[float, ...]
    completed: int
    failed: int
    window_s: float
    errors: tuple[str, ...] = ()

    @property
    def failures(self) -> str:
        """``failed N`` and the errors seen, for a note."""
        return f"failed {self.failed}" + (f" ({'; '.join(self.errors)})" if self.errors else "")

    @property
    def per_s(self) -> float:
        """Completed units per second of the window."""
        return self.completed / self.window_s if self.window_s > 0 else 0.0


async def closed_loop(
    *, clients: int, duration_s: float, warmup_s: float, work: Work, grace_s: float = 30.0
) -> LoopResult:
    """Run ``clients`` closed-loop clients for ``duration_s``; ``work(n)`` does unit ``n``.

    A unit still running at the end is awaited for at most ``grace_s`` and not counted;
    a client whose work raises :class:`Exhausted` stops early.
    """
    counter = itertools.count()
    start = time.perf_counter()
    measure_from, end = start + warmup_s, start + duration_s
    samples: list[float] = []
    errors: list[str] = []
    failed = 0

    async def client() -> None:
        nonlocal failed
        while time.perf_counter() < end:
            began = time.perf_counter()
            try:
                done = await work(next(counter))
            except Exhausted:
                return
            except Exception as exc:  # counted and shown: a load generator must not die silently
                _remember(errors, exc)
                done = None
            if done is None:
                failed += 1
            elif began >= measure_from and done <= end:
                samples.append(done - began)

    tasks = [asyncio.create_task(client()) for _ in range(clients)]
    await asyncio.wait(tasks, timeout=duration_s + grace_s)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return LoopResult(
        latencies_s=tuple(samples),
        completed=len(samples),
        failed=failed,
        window_s=duration_s - warmup_s,
        errors=tuple(errors),
    )


def _remember(errors: list[str], exc: Exception, keep: int = 3) -> None:
    text = f"{type(exc).__name__}: {exc}"[:200]
    if text not in errors and len(errors) < keep:
        errors.append(text)


async def paced(*, rate: float, duration_s: float, warmup_s: float, work: Work, pool: int = 64) -> LoopResult:
    """Start unit ``n`` at ``start + n / rate`` for ``duration_s``, with at most ``pool`` in flight.

    Latency is measured from each unit's scheduled start.
    """
    total = int(rate * duration_s)
    start = time.perf_counter() + 0.05
    measure_from = start + warmup_s
    samples: list[float] = []
    errors: list[str] = []
    failed = 0
    gate = asyncio.Semaphore(pool)

    async def one(index: int, due: float) -> None:
        nonlocal failed
        async with gate:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            try:
                done = await work(index)
            except Exception as exc:  # counted and shown, as in closed_loop
                _remember(errors, exc)
                done = None
        if done is None:
            failed += 1
        elif due >= measure_from:
            samples.append(done - due)

    tasks = [asyncio.create_task(one(i, start + i / rate)) for i in range(total)]
    await asyncio.wait(tasks, timeout=duration_s + 30.0)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return LoopResult(
        latencies_s=tuple(samples),
        completed=len(samples),
        failed=failed,
        window_s=duration_s - warmup_s,
        errors=tuple(errors),
    )
