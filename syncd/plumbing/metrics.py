"""The process's Prometheus metrics: one :class:`Metrics` per :class:`~syncd.engine.runtime.Runtime`.

Every instrument lives in the registry of one ``Metrics`` object, never in
``prometheus_client``'s global registry, so two runtimes in one process (tests, a CLI
command beside a daemon) count apart. ``GET /metrics`` (:mod:`syncd.web.webhooks`) refreshes
the gauges read from the database (:meth:`Metrics.read_store`) and renders the registry.

The series (README.md, "syncd run serves"; docs/operations.md, "Metrics"):

====================================================  ==========================================================
series                                                what
====================================================  ==========================================================
``syncd_webhooks_total{connection,outcome,reason}``   webhook answers by HTTP status and a fixed reason
``syncd_webhook_ack_seconds{connection}``             time to acknowledge a webhook (histogram)
``syncd_database_up``                                 1 when the last scrape could read the database
``syncd_backlog{queue,status}``                       inbox/outbox rows pending or dead, open dead letters
``syncd_outcomes{kind,reason}``                       open outcomes without an invoice
``syncd_mapping_drift_problems``                      problems the last drift check found
``syncd_invoices_created_total{pipeline}``            invoices and credit notes recorded as created
``syncd_invoices_failed_total{pipeline}``             invoice effects dead-lettered
``syncd_invoice_latency_seconds{pipeline}``           trigger → invoice committed (histogram)
``syncd_vendor_calls_total{connection,status}``       vendor API answers by HTTP status (429 included), or
                                                      ``timeout`` / ``transport_error`` when none came
``syncd_dead_letters_open{source}``                   open dead letters by source
``syncd_skips{reason}``                               recorded skips by reason (the ``outcomes`` table)
``syncd_mapping_reload_failures_total``               mapping files (or the config's ``[pilot]``) refused
                                                      on a reload
``syncd_token_refresh_failures_total{connection}``    failed OAuth token refreshes or fetches
``syncd_db_transactions_total``                       database transactions begun (reads and claims that
                                                      found nothing included; not the scrapes' own reads)
====================================================  ==========================================================

A pipeline is labelled by its mapping file's stem (``hubspot-xero``; see
:func:`syncd.engine.runtime.pipeline_names`), a bounded set fixed by the config.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

# Trigger → invoice: seconds for a won deal, up to an hour for a period the hourly tick
# bills, days for an invoice held by an outage or a missing PO number (48 h is late).
LATENCY_BUCKETS_S = (1, 5, 15, 60, 300, 900, 3600, 7200, 21600, 86400, 172800, 604800)


class MetricsStore(Protocol):
    """What the scrape-time gauges read (:class:`syncd.store.db.Store`)."""

    async def metric_counts(self) -> StoreCounts:
        """Every count the gauges show, read in one go."""
        ...


class StoreCounts(Protocol):
    """Counts read from the database for one scrape (:class:`syncd.store.db.MetricCounts`)."""

    @property
    def backlog(self) -> dict[tuple[str, str], int]:
        """(queue, status) → rows."""
        ...

    @property
    def outcomes(self) -> dict[tuple[str, str], int]:
        """(kind, reason) → open outcomes."""
        ...

    @property
    def dead_letters(self) -> dict[str, int]:
        """source → open dead letters."""
        ...

    @property
    def skips(self) -> dict[str, int]:
        """reason → recorded skips."""
        ...


class Metrics:
    """The instruments of one runtime, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.webhooks = Counter(
            "syncd_webhooks_total",
            "Webhook deliveries by connection, outcome (HTTP status) and reason",
            ["connection", "outcome", "reason"],
            registry=r,
        )
        self.database_up = Gauge(
            "syncd_database_up", "1 when the last /metrics scrape could read the database", registry=r
        )
        self.webhook_seconds = Histogram(
            "syncd_webhook_ack_seconds", "Time to acknowledge a webhook", ["connection"], registry=r
        )
        self.backlog = Gauge("syncd_backlog", "Rows waiting, by queue and status", ["queue", "status"], registry=r)
        self.outcomes = Gauge(
            "syncd_outcomes",
            "Open outcomes without an invoice, by kind (skip, simulated, attention) and reason",
            ["kind", "reason"],
            registry=r,
        )
        self.mapping_drift = Gauge(
            "syncd_mapping_drift_problems",
            "Problems the last drift check found between the mappings and the vendors' live schemas",
            registry=r,
        )
        self.invoices_created = Counter(
            "syncd_invoices_created", "Invoices and credit notes created, by pipeline", ["pipeline"], registry=r
        )
        self.invoices_failed = Counter(
            "syncd_invoices_failed", "Invoice effects dead-lettered, by pipeline", ["pipeline"], registry=r
        )
        self.invoice_latency = Histogram(
            "syncd_invoice_latency_seconds",
            "From the trigger recorded on the billing event to the invoice's commit, by pipeline",
            ["pipeline"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.vendor_calls = Counter(
            "syncd_vendor_calls",
            "Vendor API answers by connection and HTTP status (timeout / transport_error: no answer)",
            ["connection", "status"],
            registry=r,
        )
        self.batch_size = Histogram(
            "syncd_batch_size",
            "Records one vendor call carried, by connection and kind of call (1: sent alone)",
            ["connection", "kind"],
            buckets=(1, 2, 4, 8, 16, 32, 50, 100),
            registry=r,
        )
        self.dead_letters = Gauge("syncd_dead_letters_open", "Open dead letters by source", ["source"], registry=r)
        self.skips = Gauge("syncd_skips", "Recorded skips by reason (outcomes of kind skip)", ["reason"], registry=r)
        self.mapping_reload_failures = Counter(
            "syncd_mapping_reload_failures", "Mapping files (or the config's [pilot]) refused on a reload", registry=r
        )
        self.token_refresh_failures = Counter(
            "syncd_token_refresh_failures",
            "Failed OAuth token refreshes or fetches, by connection",
            ["connection"],
            registry=r,
        )
        # The audit of the last complete month (syncd/engine/audit.py, docs/operations.md "Audit").
        audit_gauges = {
            "syncd_audit_month_info": ("The month the audit gauges describe (the last complete one)", ["month"]),
            "syncd_audit_invoices": (
                "Invoices issued, late, corrected by hand, due and overdue in the month",
                ["what"],
            ),
            "syncd_audit_share": ("Share of late, hand-corrected and overdue invoices in the month", ["number"]),
            "syncd_audit_overdue_amount_share": (
                "Share of the amount due in the month not paid by its due date",
                ["currency"],
            ),
            "syncd_audit_latency_seconds": ("Trigger to issue of the month's invoices, median and p95", ["quantile"]),
            "syncd_audit_trend_rising": ("1 when the share rose two months running", ["number"]),
            "syncd_audit_history_complete": ("1 when the three months of a trend all have data", ["number"]),
        }
        self.audit = {name: Gauge(name, text, labels, registry=r) for name, (text, labels) in audit_gauges.items()}

    def set_audit(self, values: Mapping[tuple[str, tuple[tuple[str, str], ...]], float]) -> None:
        """Replace the audit gauges with ``values`` (:func:`syncd.engine.audit.gauges`)."""
        for gauge in self.audit.values():
            gauge.clear()
        for (name, labels), value in values.items():
            self.audit[name].labels(**dict(labels)).set(value)

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)

    def count_transactions(self, read: Callable[[], int]) -> None:
        """Show ``read()`` as ``syncd_db_transactions_total`` (the store's count, read at each scrape)."""
        self.registry.register(_Transactions(read))

    # -- events, counted where they happen ----------------------------------------------

    def invoice_created(self, pipeline: str, latency_s: float) -> None:
        """An invoice (or credit note) was committed ``latency_s`` after its trigger."""
        self.invoices_created.labels(pipeline).inc()
        self.invoice_latency.labels(pipeline).observe(max(0.0, latency_s))

    def invoice_failed(self, pipeline: str) -> None:
        """An invoice effect was dead-lettered."""
        self.invoices_failed.labels(pipeline).inc()

    def vendor_answered(self, connection: str, response: httpx.Response) -> None:
        """A vendor answer, with the ones an auth flow consumed before it (a 401 then a resend)."""
        for earlier in response.history:
            self.vendor_calls.labels(connection, str(earlier.status_code)).inc()
        self.vendor_calls.labels(connection, str(response.status_code)).inc()

    def batch_sent(self, connection: str, kind: str, size: int) -> None:
        """A vendor call that the batcher sent for ``size`` records (``syncd/engine/batching.py``)."""
        self.batch_size.labels(connection, kind).observe(size)

    def vendor_unanswered(self, connection: str, why: str) -> None:
        """A vendor call that got no answer (``timeout`` or ``transport_error``)."""
        self.vendor_calls.labels(connection, why).inc()

    def token_refresh_failed(self, connection: str) -> None:
        """A connection could not refresh (or fetch) its OAuth access token."""
        self.token_refresh_failures.labels(connection).inc()

    def mapping_reload_failed(self) -> None:
        """A mapping file (or the config's ``[pilot]``) was refused on a reload."""
        self.mapping_reload_failures.inc()

    # -- gauges, read from the database at each scrape ----------------------------------

    async def read_store(self, store: MetricsStore) -> None:
        """Set the database gauges from one read; a label whose rows are gone drops to 0.

        Raises:
            whatever the store raises when the database is away (the caller reports it).
        """
        counts = await store.metric_counts()
        _reset(self.backlog, counts.backlog)
        _reset(self.outcomes, counts.outcomes)
        _reset(self.dead_letters, {(source,): n for source, n in counts.dead_letters.items()})
        _reset(self.skips, {(reason,): n for reason, n in counts.skips.items()})


class _Transactions(Collector):
    """``syncd_db_transactions_total``: the transactions the store began (``Store.transactions``).

    The end-to-end benchmark divides its growth over a run by the deals invoiced (BENCHMARKS.md).
    """

    def __init__(self, read: Callable[[], int]) -> None:
        self.read = read

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "syncd_db_transactions",
            "Database transactions begun, reads and claims that found nothing included (not the scrapes' own reads)",
            value=self.read(),
        )


def _reset(gauge: Gauge, values: dict[tuple[str, str], int] | dict[tuple[str], int]) -> None:
    """Replace every labelled value of ``gauge`` (no await in between: a scrape sees all or none)."""
    gauge.clear()
    for labels, value in values.items():
        gauge.labels(*labels).set(value)
