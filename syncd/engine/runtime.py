"""The objects one syncd process owns for its lifetime, built from the config.

One :class:`Runtime` holds the store, the one shared ``httpx.AsyncClient``, every
connection's connector and webhook verifier, and each pipeline with its loaded
mapping. ``syncd run``, ``syncd demo`` and the tests build it the same way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import socket
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import structlog

from syncd.core.errors import ConfigError, MappingError
from syncd.core.interfaces import (
    CreatesInvoicesInBatches,
    Crm,
    Invoicing,
    ReadsCustomersInBatches,
    ReadsDealsInBatches,
    TimeTracker,
    WebhookVerifier,
    WritesStatusInBatches,
)
from syncd.core.mapping import MappingDefaults, PipelineMapping, load_mapping
from syncd.engine.alerts import VendorHealth
from syncd.plumbing.http import SharedBudget, Sleep, VendorHttp, make_client
from syncd.plumbing.metrics import Metrics
from syncd.plumbing.registry import ConnectorContext, secret_value
from syncd.plumbing.settings import Config, PipelineSettings, load_config
from syncd.store.db import DbTokenStore, Store

BATCHING = (ReadsDealsInBatches, WritesStatusInBatches, CreatesInvoicesInBatches, ReadsCustomersInBatches)
"""A connector with any of these makes batch calls (:mod:`syncd.engine.batching`)."""

log = structlog.get_logger("syncd.engine.runtime")


def utcnow() -> datetime:
    """The current time, aware, in UTC (the default clock)."""
    return datetime.now(UTC)


@dataclass(frozen=True, kw_only=True)
class Pipeline:
    """One deal-to-cash pipeline, wired: its connectors and its mapping.

    ``name`` labels it in ``/metrics`` and logs (:func:`pipeline_names`).
    """

    settings: PipelineSettings
    crm_name: str
    invoicing_name: str
    crm: Crm
    invoicing: Invoicing
    mapping: PipelineMapping
    time_tracking_name: str | None = None
    time_tracker: TimeTracker | None = None
    name: str = ""


@dataclass(kw_only=True)
class Runtime:
    """Everything a running syncd holds.

    Attributes:
        config: the validated configuration.
        store: the database.
        client: the shared HTTP client.
        connectors: connection name → connector object.
        verifiers: connection name → webhook verifier (connections with webhooks).
        pipelines: the wired pipelines.
        clock: returns the current aware time.
        owner: this process's id in leases (host:pid:random).
        billing_start: never invoice a deal won before this.
        defaults: mapping defaults from ``[daemon]``.
        metrics: this runtime's Prometheus instruments (``/metrics``; :mod:`syncd.plumbing.metrics`).
        http: each connection's HTTP plumbing (its rate limits size the engine's claims).
        health: each connection's failing streak, for ``vendor_errors`` alerts (:mod:`syncd.engine.alerts`).
    """

    config: Config
    store: Store
    client: httpx.AsyncClient
    connectors: dict[str, Any]
    verifiers: dict[str, WebhookVerifier]
    pipelines: list[Pipeline]
    clock: Callable[[], datetime]
    owner: str
    billing_start: datetime
    defaults: MappingDefaults
    metrics: Metrics = field(default_factory=Metrics)
    extra: dict[str, Any] = field(default_factory=dict)
    http: dict[str, VendorHttp] = field(default_factory=dict)
    health: VendorHealth = field(default_factory=VendorHealth)

    @classmethod
    async def start(
        cls,
        config: Config,
        *,
        clock: Callable[[], datetime] = utcnow,
        mounts: Mapping[str, httpx.AsyncBaseTransport] | None = None,
        migrate: bool = True,
        sleep: Sleep = asyncio.sleep,
    ) -> Runtime:
        """Open the store (migrating it), build every connection and pipeline.

        Args:
            config: the loaded configuration.
            clock: the clock (injected in tests).
            mounts: URL prefix → transport, to route vendor hosts to in-process emulators.
            migrate: run the migrations first (``syncd run`` does).
            sleep: how vendor calls wait between retries (``Retry-After``, back-off);
                injected in tests so that a retry takes no wall time.

        Raises:
            ConfigError: a mapping file is invalid, or a connection cannot be built.
        """
        store = Store.open(config.daemon.database_url)
        store.alerting = config.settings.alerts.webhook_url is not None
        if migrate:
            await store.migrate()
        client = make_client(mounts=mounts)
        try:
            return await cls._wire(config, store, client, clock, sleep)
        except BaseException:
            await client.aclose()
            await store.close()
            raise

    @classmethod
    async def _wire(
        cls, config: Config, store: Store, client: httpx.AsyncClient, clock: Callable[[], datetime], sleep: Sleep
    ) -> Runtime:
        key = secret_value(config.daemon.encryption_key) or None
        connectors: dict[str, Any] = {}
        verifiers: dict[str, WebhookVerifier] = {}
        https: dict[str, VendorHttp] = {}
        shared = store.is_postgres and config.daemon.shared_rate_budget
        metrics = Metrics()
        metrics.count_transactions(lambda: store.transactions)

        def make_http(name: str, budget: SharedBudget | None, **kwargs: Any) -> VendorHttp:
            http = VendorHttp(client, connection=name, budget=budget, sleep=sleep, metrics=metrics, **kwargs)
            https.setdefault(name, http)  # the connector's own plumbing is the first one it makes
            return http

        for name, conn in config.connections.items():
            # Vendor windows run on real time, not on the injected business clock.
            budget = SharedBudget(store, connection=name, clock=utcnow) if shared else None
            ctx = ConnectorContext(
                connection=name,
                client=client,
                tokens=DbTokenStore(store, name, key),
                clock=clock,
                make_http=functools.partial(make_http, name, budget),
                token_refresh_failed=functools.partial(metrics.token_refresh_failed, name),
            )
            connectors[name] = conn.spec.factory(conn.settings, ctx)
            if conn.spec.verifier is not None:
                verifiers[name] = conn.spec.verifier(conn.settings, clock)
        names = pipeline_names(config.settings.pipelines)
        pipelines = [_pipeline(config, p, connectors, n) for p, n in zip(config.settings.pipelines, names, strict=True)]
        # Before the first migration (``syncd check`` on a new machine) nothing is billed,
        # so "now" is as good a start as any; `syncd run` migrates first and reads the real one.
        billing_start = config.daemon.billing_start or await store.created_at() or clock()
        defaults = MappingDefaults(
            timezone=config.daemon.timezone,
            currency=config.daemon.default_currency,
            payment_terms_days=config.daemon.payment_terms_days,
        )
        return cls(
            config=config,
            store=store,
            client=client,
            connectors=connectors,
            verifiers=verifiers,
            pipelines=pipelines,
            clock=clock,
            owner=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}",
            billing_start=billing_start,
            defaults=defaults,
            metrics=metrics,
            http=https,
            health=VendorHealth(clock),
        )

    async def aclose(self) -> None:
        """Close the HTTP client and the database pool."""
        await self.client.aclose()
        await self.store.close()

    def reload_mappings(self) -> list[str]:
        """Load every pipeline's mapping file again, and swap in the ones that are valid.

        A pipeline whose file has problems keeps the mapping it runs with, and each
        problem is logged (``mapping_reload_failed``). The new pipeline list replaces the
        old one in a single assignment; the engine reads :attr:`pipelines` once per event,
        so every event is processed wholly with the old mappings or wholly with the new.

        Returns:
            every problem found, each ``file:line [table].key: message`` (empty when
            every file loaded).
        """
        problems: list[str] = []
        fresh: list[Pipeline] = []
        for pipeline in self.pipelines:
            path = self.config.mapping_path(pipeline.settings)
            try:
                mapping = load_mapping(path)
            except MappingError as exc:
                for problem in exc.problems:
                    log.error("mapping_reload_failed", mapping=str(path), problem=problem)
                self.metrics.mapping_reload_failed()
                problems += exc.problems
                fresh.append(pipeline)
                continue
            fresh.append(dataclasses.replace(pipeline, mapping=mapping))
            log.info("mapping_reloaded", mapping=str(path))
        self.pipelines = fresh
        return problems + self.reload_pilot()

    def reload_pilot(self) -> list[str]:
        """Read ``[pilot] clients`` from the config file again (with the mappings, on SIGHUP or a change).

        A config file with problems keeps the pilot list in force; each problem is
        logged (``pilot_reload_failed``) and returned.
        """
        try:
            fresh = load_config(self.config.path)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("pilot_reload_failed", config=str(self.config.path), problem=problem)
            self.metrics.mapping_reload_failed()
            return list(exc.problems)
        pilot = fresh.settings.pilot
        if pilot != self.config.settings.pilot:
            settings = self.config.settings.model_copy(update={"pilot": pilot})
            self.config = dataclasses.replace(self.config, settings=settings)
            log.info("pilot_reloaded", clients=list(pilot.clients))
        return []

    def call_interval_s(self, *, batch: int = 1) -> float:
        """Seconds between calls at the slowest connection's sustained rate limit (0: none limited).

        With ``batch`` > 1 (rows worked together, their calls batched), a connection
        whose connector makes batch calls spends a ``batch``-th of a call per row.
        """

        def per_row(name: str, http: VendorHttp) -> float:
            shared = batch if isinstance(self.connectors.get(name), BATCHING) else 1
            return http.call_interval_s() / shared

        return max((per_row(name, http) for name, http in self.http.items()), default=0.0)

    def pilot_allows(self, client_key: str) -> bool:
        """Whether effects for ``client_key`` are real (pilot mode limits them)."""
        pilot = self.config.settings.pilot.clients
        return not pilot or client_key in pilot


def pipeline_names(pipelines: Sequence[PipelineSettings]) -> list[str]:
    """Each pipeline's name: its mapping file's stem (``hubspot-xero``), ``-2``, ``-3`` … on a repeat.

    Fixed by the config, so the ``pipeline`` label of ``/metrics`` stays a small set.
    """
    names: list[str] = []
    for settings in pipelines:
        stem, n = settings.mapping.stem, 1
        name = stem
        while name in names:
            n += 1
            name = f"{stem}-{n}"
        names.append(name)
    return names


def _pipeline(config: Config, settings: PipelineSettings, connectors: Mapping[str, Any], name: str) -> Pipeline:
    crm = connectors[settings.crm]
    invoicing = connectors[settings.invoicing]
    if not isinstance(crm, Crm):
        raise ConfigError(f"connection {settings.crm!r} is not a CRM", place=str(config.path))
    if not isinstance(invoicing, Invoicing):
        raise ConfigError(f"connection {settings.invoicing!r} is not an invoicing tool", place=str(config.path))
    tracker = connectors.get(settings.time_tracking) if settings.time_tracking else None
    return Pipeline(
        settings=settings,
        crm_name=settings.crm,
        invoicing_name=settings.invoicing,
        crm=crm,
        invoicing=invoicing,
        mapping=load_mapping(config.mapping_path(settings)),
        time_tracking_name=settings.time_tracking,
        time_tracker=tracker if isinstance(tracker, TimeTracker) else None,
        name=name,
    )
