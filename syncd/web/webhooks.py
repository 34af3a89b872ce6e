"""The ASGI app: ``/webhooks/{connection}``, ``/healthz``, ``/readyz``, ``/metrics``.

A webhook is verified (signature, age), turned into change hints, stored in the inbox
(duplicates ignored by their vendor event id) and answered 200 at once; the work
happens later in the engine (``README.md``, "syncd run serves"). No request, however malformed,
is answered 500. Answers:

* 200: stored (or a valid delivery with nothing in it, e.g. Xero's intent-to-receive);
* 400: signed correctly but malformed or out of bounds — recorded as a dead letter;
* 401: signature missing, wrong or stale (or its timestamp is no number) — nothing stored;
* 404: no such connection, or it takes no webhooks;
* 408: the body did not arrive within ``[daemon].webhook_body_timeout_s``;
* 413: body over 1 MiB;
* 503 with ``Retry-After``: the database cannot be reached; nothing was stored and the
  vendor delivers again. HubSpot retries any status but 400/401/403/404/405 with
  exponential back-off (https://developers.hubspot.com/docs/methods/webhooks/webhooks-overview,
  "Retries"); Xero retries "with decreasing frequency for up to 24 hours"
  (https://developer.xero.com/documentation/webhooks/configuring-your-server).

``syncd_webhooks_total`` counts every answer by connection, status and a reason from
:data:`REASONS`; a path naming no configured connection is counted with an empty
connection label, so the label set stays bounded whatever clients send. ``/readyz`` is
503 while the database does not answer; ``/metrics`` renders the runtime's
:class:`~syncd.plumbing.metrics.Metrics` and answers 200 regardless, with ``syncd_database_up`` 0
and the gauges read from the database left as they were.
"""

from __future__ import annotations

import asyncio
from typing import Any, NamedTuple, Protocol

import sqlalchemy as sa
import structlog
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from syncd.core.errors import AuthError, RecordError
from syncd.core.interfaces import WebhookRequest
from syncd.engine import audit
from syncd.engine.drift import DRIFT_PROBLEMS

log = structlog.get_logger("syncd.web.webhooks")

MAX_BODY_BYTES = 1024 * 1024
# Seconds a vendor is asked to wait after a 503. HubSpot honours Retry-After on 429 only
# and backs off on its own otherwise; the header is for clients that read it.
RETRY_AFTER_S = 60
# Seconds /readyz waits for the database before calling it down.
READY_TIMEOUT_S = 5.0
# What a database outage raises through SQLAlchemy (both drivers' errors are wrapped
# as DBAPIError; a pool timeout is sa.exc.TimeoutError), or the OS below it.
STORE_DOWN = (sa.exc.SQLAlchemyError, OSError)
REASONS = frozenset(
    {"stored", "signature", "malformed", "too_large", "timeout", "disconnected", "unavailable", "unknown_connection"}
)


class Answer(NamedTuple):
    """A webhook response and the :data:`REASONS` label it is counted under."""

    response: Response
    reason: str


class _TooLarge(Exception):
    """The body grew past :data:`MAX_BODY_BYTES` while it was read."""


class Host(Protocol):
    """What the app needs from the process that serves it (see :class:`syncd.daemon.Daemon`)."""

    @property
    def runtime(self) -> Any:
        """The :class:`~syncd.engine.runtime.Runtime`, once the lifespan has started it."""
        ...

    @property
    def engine(self) -> Any:
        """The :class:`~syncd.engine.loop.Engine`, woken when events are stored."""
        ...

    def ready(self) -> bool:
        """Whether the workers and the scheduler are running."""
        ...


def create_app(host: Host, *, lifespan: Any = None) -> Starlette:
    """Build the ASGI app.

    Args:
        host: the process serving it; its runtime and engine are read per request.
        lifespan: the lifespan context that owns the runtime (``syncd run``).
    """

    async def webhook(request: Request) -> Response:
        name = request.path_params["connection"]
        metrics = host.runtime.metrics
        verifier = host.runtime.verifiers.get(name)
        if verifier is None:
            metrics.webhooks.labels("", "404", "unknown_connection").inc()
            return JSONResponse({"error": f"no webhook connection named {name!r}"}, status_code=404)
        with metrics.webhook_seconds.labels(name).time():
            answer = await _receive(request, name, verifier)
        metrics.webhooks.labels(name, str(answer.response.status_code), answer.reason).inc()
        return answer.response

    async def _receive(request: Request, name: str, verifier: Any) -> Answer:
        runtime = host.runtime
        declared = request.headers.get("content-length")
        if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return Answer(JSONResponse({"error": "body over 1 MiB"}, status_code=413), "too_large")
        timeout_s = runtime.config.daemon.webhook_body_timeout_s
        try:
            body = await _read_body(request, timeout_s)
        except _TooLarge:
            return Answer(JSONResponse({"error": "body over 1 MiB"}, status_code=413), "too_large")
        except TimeoutError:
            log.warning("webhook_body_timeout", connection=name, timeout_s=timeout_s)
            error = {"error": f"body not received within {timeout_s} s"}
            return Answer(JSONResponse(error, status_code=408, headers={"connection": "close"}), "timeout")
        except ClientDisconnect:
            log.info("webhook_client_disconnected", connection=name)
            return Answer(JSONResponse({"error": "client disconnected"}, status_code=400), "disconnected")
        query = f"?{request.url.query}" if request.url.query else ""
        delivery = WebhookRequest(
            method=request.method,
            url=f"{runtime.config.daemon.base_public_url}{request.url.path}{query}",
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            received_at=runtime.clock(),
        )
        try:
            hints = verifier.verify(delivery)
        except AuthError as exc:
            log.warning("webhook_rejected", connection=name, reason=exc.message)
            return Answer(JSONResponse({"error": "signature rejected"}, status_code=401), "signature")
        except RecordError as exc:
            return await _malformed(name, exc, body)
        # The verifier knows the connector, not the configured connection name.
        hints = [h.model_copy(update={"connection": name}) for h in hints]
        try:
            new = await runtime.store.add_events(hints, now=runtime.clock())
        except STORE_DOWN as exc:
            return _unavailable(name, exc)
        if new:
            host.engine.notify()
        log.info("webhook_received", connection=name, hints=len(hints), new=new)
        return Answer(Response(status_code=200), "stored")

    async def _malformed(name: str, exc: RecordError, body: bytes) -> Answer:
        runtime = host.runtime
        try:
            await runtime.store.dead_letter(
                source="webhook",
                ref=name,
                connection=name,
                reason=exc.message,
                place=exc.place or f"/webhooks/{name}",
                payload={"body": body[:4096].decode("utf-8", "replace")},
                now=runtime.clock(),
            )
        except STORE_DOWN as down:
            return _unavailable(name, down)
        log.warning("webhook_malformed", connection=name, reason=exc.message)
        return Answer(JSONResponse({"error": exc.message}, status_code=400), "malformed")

    async def healthz(_request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_request: Request) -> Response:
        ok = host.ready() and await _ping(host.runtime.store)
        return JSONResponse({"status": "ready" if ok else "not ready"}, status_code=200 if ok else 503)

    async def metrics_endpoint(_request: Request) -> Response:
        runtime = host.runtime
        metrics = runtime.metrics
        try:
            await metrics.read_store(runtime.store)
            metrics.set_audit(audit.gauges(await audit.latest(runtime)))
        except STORE_DOWN as exc:
            metrics.database_up.set(0)
            log.warning("metrics_store_unavailable", error=type(exc).__name__)
        else:
            metrics.database_up.set(1)
        metrics.mapping_drift.set(runtime.extra.get(DRIFT_PROBLEMS, 0))
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    routes = [
        Route("/webhooks/{connection}", webhook, methods=["POST"]),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


async def _read_body(request: Request, timeout_s: float) -> bytes:
    """The whole body, within ``timeout_s`` seconds in total (a trickling client is cut off).

    Raises:
        TimeoutError: the body did not arrive in time.
        _TooLarge: it grew past :data:`MAX_BODY_BYTES`.
        ClientDisconnect: the client went away.
    """
    body = bytearray()
    async with asyncio.timeout(timeout_s):
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise _TooLarge
    return bytes(body)


async def _ping(store: Any) -> bool:
    """Whether the database answers within :data:`READY_TIMEOUT_S` (a hung server is down too)."""
    try:
        return bool(await asyncio.wait_for(store.ping(), READY_TIMEOUT_S))
    except (TimeoutError, *STORE_DOWN):
        return False


def _unavailable(name: str, exc: BaseException) -> Answer:
    """503 with Retry-After: nothing was stored, the vendor delivers again later."""
    # The driver's message may carry the database URL: log the error's type only.
    log.error("webhook_store_unavailable", connection=name, error=type(exc).__name__)
    response = JSONResponse(
        {"error": "the database is unavailable; nothing was stored, deliver again later"},
        status_code=503,
        headers={"retry-after": str(RETRY_AFTER_S)},
    )
    return Answer(response, "unavailable")
