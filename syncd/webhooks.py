"""The ASGI app: ``/webhooks/{connection}``, ``/healthz``, ``/readyz``, ``/metrics``.

A webhook is verified (signature, age), turned into change hints, stored in the inbox
(duplicates ignored by their vendor event id) and answered 200 at once; the work
happens later in the engine (DESIGN §3.2). Answers:

* 200: stored (or a valid delivery with nothing in it, e.g. Xero's intent-to-receive);
* 401: signature missing, wrong or stale — nothing stored;
* 404: no such connection, or it takes no webhooks;
* 413: body over 1 MiB;
* 400: signed correctly but malformed — recorded as a dead letter (nothing lost).
"""

from __future__ import annotations

from typing import Any, Protocol

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from syncd.drift import DRIFT_PROBLEMS
from syncd.errors import AuthError, RecordError
from syncd.interfaces import WebhookRequest
from syncd.store import DeadLetterRow, EffectRow, EventRow, table_of

log = structlog.get_logger("syncd.webhooks")

MAX_BODY_BYTES = 1024 * 1024


class Metrics:
    """The process's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.webhooks = Counter(
            "syncd_webhooks_total",
            "Webhook deliveries by connection and outcome",
            ["connection", "outcome"],
            registry=self.registry,
        )
        self.webhook_seconds = Histogram(
            "syncd_webhook_ack_seconds", "Time to acknowledge a webhook", ["connection"], registry=self.registry
        )
        self.backlog = Gauge(
            "syncd_backlog", "Rows waiting, by queue and status", ["queue", "status"], registry=self.registry
        )
        self.outcomes = Gauge(
            "syncd_outcomes",
            "Open outcomes without an invoice, by kind (skip, simulated, attention) and reason",
            ["kind", "reason"],
            registry=self.registry,
        )
        self.mapping_drift = Gauge(
            "syncd_mapping_drift_problems",
            "Problems the last drift check found between the mappings and the vendors' live schemas",
            registry=self.registry,
        )


class Host(Protocol):
    """What the app needs from the process that serves it (see :class:`syncd.daemon.Daemon`)."""

    @property
    def runtime(self) -> Any:
        """The :class:`~syncd.runtime.Runtime`, once the lifespan has started it."""
        ...

    @property
    def engine(self) -> Any:
        """The :class:`~syncd.engine.Engine`, woken when events are stored."""
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
    metrics = Metrics()

    async def webhook(request: Request) -> Response:
        name = request.path_params["connection"]
        verifier = host.runtime.verifiers.get(name)
        if verifier is None:
            return JSONResponse({"error": f"no webhook connection named {name!r}"}, status_code=404)
        with metrics.webhook_seconds.labels(name).time():
            response = await _receive(request, name, verifier)
        metrics.webhooks.labels(name, str(response.status_code)).inc()
        return response

    async def _receive(request: Request, name: str, verifier: Any) -> Response:
        runtime = host.runtime
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return JSONResponse({"error": "body over 1 MiB"}, status_code=413)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return JSONResponse({"error": "body over 1 MiB"}, status_code=413)
        query = f"?{request.url.query}" if request.url.query else ""
        delivery = WebhookRequest(
            method=request.method,
            url=f"{runtime.config.daemon.base_public_url}{request.url.path}{query}",
            headers={k.lower(): v for k, v in request.headers.items()},
            body=bytes(body),
            received_at=runtime.clock(),
        )
        try:
            hints = verifier.verify(delivery)
        except AuthError as exc:
            log.warning("webhook_rejected", connection=name, reason=exc.message)
            return JSONResponse({"error": "signature rejected"}, status_code=401)
        except RecordError as exc:
            await runtime.store.dead_letter(
                source="webhook",
                ref=name,
                connection=name,
                reason=exc.message,
                place=exc.place or f"/webhooks/{name}",
                payload={"body": bytes(body[:4096]).decode("utf-8", "replace")},
                now=runtime.clock(),
            )
            log.warning("webhook_malformed", connection=name, reason=exc.message)
            return JSONResponse({"error": exc.message}, status_code=400)
        # The verifier knows the connector, not the configured connection name.
        hints = [h.model_copy(update={"connection": name}) for h in hints]
        new = await runtime.store.add_events(hints, now=runtime.clock())
        if new:
            host.engine.notify()
        log.info("webhook_received", connection=name, hints=len(hints), new=new)
        return Response(status_code=200)

    async def healthz(_request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_request: Request) -> Response:
        ok = host.ready() and await host.runtime.store.ping()
        return JSONResponse({"status": "ready" if ok else "not ready"}, status_code=200 if ok else 503)

    async def metrics_endpoint(_request: Request) -> Response:
        runtime = host.runtime
        for model, queue in ((EventRow, "events"), (EffectRow, "effects")):
            for status in ("pending", "dead"):
                count = await runtime.store.count(model, table_of(model).c.status == status)
                metrics.backlog.labels(queue, status).set(count)
        dead = await runtime.store.count(DeadLetterRow, table_of(DeadLetterRow).c.status == "open")
        metrics.backlog.labels("dead_letters", "open").set(dead)
        for (kind, reason), count in (await runtime.store.outcome_counts()).items():
            metrics.outcomes.labels(kind, reason).set(count)
        metrics.mapping_drift.set(runtime.extra.get(DRIFT_PROBLEMS, 0))
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    routes = [
        Route("/webhooks/{connection}", webhook, methods=["POST"]),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
