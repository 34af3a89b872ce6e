"""Configuration: one TOML file plus ``SYNCD_*`` environment overrides.

``config.example.toml`` is the reference for every key. Loading happens in two steps:

1. The file's tables, with the environment laid over them (``SYNCD_DAEMON__LISTEN``,
   ``SYNCD_CONNECTIONS__HUBSPOT__TOKEN`` ...; nested keys joined with ``__``), are
   validated as :class:`Settings`.
2. Each ``[connections.NAME]`` table is validated by its connector's own settings
   model.

Before either, secrets are resolved in ``[daemon]``, ``[alerts]`` and every ``[connections.NAME]``:
a value ``"env:NAME"`` is read from the environment variable ``NAME``, and a key
``X_file = "/path"`` is read from that file into ``X`` (a relative path is relative to
the config file's folder, as are mapping files and a SQLite ``database_url``).

Every problem of both steps is collected and reported at once, each naming the file,
the line and the key, e.g. ``config.toml:42 [connections.xero].token_url: not an
http(s) URL: 'htp:/x'``; an unknown key says which known key it is closest to, and an
unset environment variable is reported once with every key naming it. No secret value
ever appears in a message: URLs are shown with their user info and query redacted.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal
from urllib.parse import SplitResult, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cryptography.fernet import Fernet
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from syncd.core.errors import ConfigError
from syncd.core.money import check_currency
from syncd.core.transforms import did_you_mean
from syncd.plumbing import registry
from syncd.plumbing.registry import ConnectionSettings, ConnectorSpec


class DaemonSettings(BaseModel):
    """``[daemon]``: the process itself.

    Attributes:
        database_url: ``sqlite:///./syncd.db`` (default) or ``postgresql+psycopg://...``
            for several replicas. A relative SQLite file is relative to the config
            file's folder, not to the working directory.
        listen: ``host:port`` uvicorn binds to.
        public_url: the URL vendors call (behind a proxy); signatures are checked
            against it. Defaults to ``http://{listen}``.
        timezone: the company's IANA zone; a client may override it.
        billing_start: never invoice a deal won before this moment; default: when
            the database was created.
        poll_interval_s: seconds between change-feed polls of each connection.
        workers: concurrent event/effect workers in this process.
        lease_s: seconds a claimed row stays claimed before another worker may take it;
            renewed while its work runs, and a claim takes only as many rows as fit in
            it (docs/architecture.md, Leases and fencing).
        give_up_after_s: seconds after a record's first attempt at which a retriable
            failure dead-letters it instead of retrying (default 48 h).
        retry_max_delay_s: the cap of the exponential back-off between attempts (a
            vendor's ``Retry-After`` is honoured as given).
        shutdown_grace_s: seconds from SIGTERM until the process has exited: workers
            stop claiming, finish the vendor call in flight and hand back the rest of
            their claimed rows.
        encryption_key: Fernet key that encrypts OAuth tokens at rest (``syncd keygen``);
            checked at load.
        log_level: ``debug``, ``info``, ``warning`` or ``error``.
        default_currency / payment_terms_days: defaults when a mapping yields none.
        drift_check_interval_s: seconds between checks of the mappings against the
            vendors' live schemas (properties, account codes, tax types; 0 = off).
        mapping_watch_interval_s: seconds between looks at the mapping files'
            modification times; a changed file is validated and swapped in (0 = off;
            SIGHUP reloads at once either way).
        batch_max: the most records one vendor call carries when several are ready for
            one connection at once (HubSpot batch reads and updates, Xero invoices many per
            request); 1 switches batching off (one call per record, as a script would).
        batch_wait_ms: how long a record ready for a batched call may wait for others
            still being worked on (only while some are): a lone record is sent at once.
        shared_rate_budget: on PostgreSQL, replicas share each vendor's rate budget
            (one row per connection and bucket reserves evenly spaced request slots)
            so together they stay under the vendor's limit; ignored on SQLite.
        webhook_body_timeout_s: seconds a client has to send a whole webhook body; a
            slower one is answered 408 and disconnected.
        max_connections: concurrent connections and requests uvicorn serves before it
            answers 503 (its ``limit_concurrency``).
        keep_alive_timeout_s: seconds an idle keep-alive connection stays open.
        request_head_timeout_s: seconds a client has to send a request line and its
            headers; a slower connection is closed.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    database_url: str = "sqlite:///./syncd.db"
    listen: str = "127.0.0.1:8080"
    public_url: str | None = None
    timezone: str = "UTC"
    billing_start: AwareDatetime | None = None
    poll_interval_s: int = Field(default=60, ge=1)
    workers: int = Field(default=4, ge=1, le=64)
    lease_s: int = Field(default=60, ge=5)
    give_up_after_s: int = Field(default=172_800, ge=1)
    retry_max_delay_s: int = Field(default=900, ge=1)
    shutdown_grace_s: int = Field(default=25, ge=5, le=3600)
    encryption_key: SecretStr | None = None
    log_level: str = "info"
    default_currency: str = "USD"
    payment_terms_days: int = Field(default=30, ge=0)
    drift_check_interval_s: int = Field(default=3600, ge=0)
    mapping_watch_interval_s: int = Field(default=5, ge=0)
    shared_rate_budget: bool = True
    batch_max: int = Field(default=50, ge=1, le=100)
    batch_wait_ms: int = Field(default=50, ge=0, le=1000)
    webhook_body_timeout_s: float = Field(default=10, gt=0, le=300)
    max_connections: int = Field(default=100, ge=2)
    keep_alive_timeout_s: int = Field(default=5, ge=1)
    request_head_timeout_s: float = Field(default=10, gt=0, le=300)

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        return check_database_url(value)

    @field_validator("encryption_key")
    @classmethod
    def _encryption_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            try:
                Fernet(value.get_secret_value().encode())
            except ValueError:
                raise ValueError("not a valid key; run syncd keygen") from None
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown IANA time zone {value!r}") from exc
        return value

    @field_validator("default_currency")
    @classmethod
    def _currency(cls, value: str) -> str:
        return check_currency(value)

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected host:port, got {value!r}")
        return value

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        return None if value is None else check_url(value)

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.lower() not in {"debug", "info", "warning", "error"}:
            raise ValueError("expected one of debug, info, warning, error")
        return value.lower()

    @property
    def base_public_url(self) -> str:
        """The URL vendors reach syncd at, without a trailing slash."""
        return (self.public_url or f"http://{self.listen}").rstrip("/")


class PipelineSettings(BaseModel):
    """``[[pipelines]]``: one deal-to-cash pipeline.

    Attributes:
        crm / invoicing / time_tracking: connection names.
        mapping: path of the mapping file, relative to the config file.
        invoice_delay_s: seconds a won deal's invoice waits before it is created; a
            deal that leaves the won stage meanwhile is recorded as skipped (0 = at once).
        on_unwon: what happens when a deal leaves the won stage after its invoice was
            created: ``attention`` records an outcome that needs a person (default);
            ``void`` voids the invoice at the ledger when it has no payments (else
            ``attention``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    crm: str
    invoicing: str
    time_tracking: str | None = None
    mapping: Path
    invoice_delay_s: int = Field(default=0, ge=0)
    on_unwon: Literal["attention", "void"] = "attention"


class PilotSettings(BaseModel):
    """``[pilot]``: limit effects to some clients while the rest are only simulated.

    Attributes:
        clients: client keys that get real effects; empty means every client.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    clients: tuple[str, ...] = ()


MIN_RECORD_MONTHS = 13
"""Billing records (outcomes, the payloads syncd sent) are kept at least this long: a year
of audits and the same month a year before (docs/operations.md, "Retention")."""


class RetentionSettings(BaseModel):
    """``[retention]``: what the daily retention job deletes, and after how long (:mod:`syncd.store.retention`).

    Ages count back from the job's run; ``0`` keeps the rows forever. Billing events,
    invoices, time entries, clients, engagements, open dead letters, outcomes that still
    need attention and each record's newest source snapshot are never deleted.

    Attributes:
        events_days: processed inbox events (status ``done``), by when they arrived.
        effects_days: finished outbox effects (status ``done``) other than invoice
            creations: CRM write-backs, credit allocations, voids; by their last change.
        ticks_days: the scheduler's tick rows (one per job and window), by their start.
        outcomes_months: skips, simulated events and resolved outcomes, by when they were
            recorded; 0 or at least 13.
        sent_payloads_months: finished invoice creations, which hold the payload syncd
            sent; 0 or at least 13.
        batch_size: rows deleted per transaction (no giant transaction holds the database).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    events_days: int = Field(default=30, ge=0)
    effects_days: int = Field(default=30, ge=0)
    ticks_days: int = Field(default=7, ge=0)
    outcomes_months: int = Field(default=24, ge=0)
    sent_payloads_months: int = Field(default=24, ge=0)
    batch_size: int = Field(default=1000, ge=1, le=100_000)

    @field_validator("outcomes_months", "sent_payloads_months")
    @classmethod
    def _billing_records(cls, value: int) -> int:
        if 0 < value < MIN_RECORD_MONTHS:
            raise ValueError(
                f"{value} months is too short: billing records are kept at least {MIN_RECORD_MONTHS} months "
                "(0 keeps them forever)"
            )
        return value


class AuditSettings(BaseModel):
    """``[audit]``: the monthly audit (``syncd audit``, ``/metrics``, the monthly tick).

    Attributes:
        late_after_h: hours from an invoice's trigger to its issue beyond which it is
            late (a pipeline's ``invoice_delay_s`` counts toward them).
        worst: how many of the latest invoices the report lists.
        months: months shown, the month asked and those before it (at least 3: the
            trend compares three months).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    late_after_h: float = Field(default=48, gt=0)
    worst: int = Field(default=5, ge=0, le=100)
    months: int = Field(default=3, ge=3, le=24)


Owner = Literal["crm", "ledger"]

# The client record's fields (docs/operations.md, "The client record"), and the systems
# that can own each: a field only the CRM holds (currency, PO number, rates) is owned by it.
CLIENT_FIELDS: Mapping[str, tuple[Owner, ...]] = {
    "legal_name": ("crm", "ledger"),
    "billing_contact": ("crm",),
    "address": ("crm",),
    "tax_id": ("crm", "ledger"),
    "currency": ("crm",),
    "payment_terms_days": ("crm", "ledger"),
    "po_number": ("crm",),
    "rates": ("crm",),
}
DEFAULT_OWNERS: Mapping[str, Owner] = {
    "legal_name": "crm",
    "billing_contact": "crm",
    "address": "crm",
    "tax_id": "crm",
    "currency": "crm",
    "payment_terms_days": "ledger",
    "po_number": "crm",
    "rates": "crm",
}


class ClientsSettings(BaseModel):
    """``[clients]``: the one client billing record.

    Attributes:
        owners: per field of the client record, the system that owns it (``crm`` or
            ``ledger``): its changes flow to the other system, a change anywhere else is
            a conflict. Unnamed fields keep their default (:data:`DEFAULT_OWNERS`: the
            CRM owns all but the payment terms, which the ledger owns). The billing
            contact, the address, the currency, the PO number and the rates can only be
            owned by the CRM (syncd writes them to no CRM).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    owners: dict[str, Owner] = Field(default_factory=dict)

    @field_validator("owners")
    @classmethod
    def _owners(cls, value: dict[str, Owner]) -> dict[str, Owner]:
        for name, owner in value.items():
            if name not in CLIENT_FIELDS:
                raise ValueError(f"unknown field {name!r}; the client record has {', '.join(CLIENT_FIELDS)}")
            if owner not in CLIENT_FIELDS[name]:
                raise ValueError(f"{name} can only be owned by {' or '.join(CLIENT_FIELDS[name])}, not {owner!r}")
        return value

    def owner(self, field: str) -> Owner:
        """The system owning ``field`` (a field of :data:`CLIENT_FIELDS`)."""
        return self.owners.get(field, DEFAULT_OWNERS[field])


class CollectionsSettings(BaseModel):
    """``[collections]``: receivables on the CRM company and follow-up tasks for overdue invoices.

    Both are off by default: they need more CRM scopes than invoicing does
    (docs/credentials.md). Figures and steps count days in the client's time zone.

    Attributes:
        company_status: write each client's receivables onto its CRM company
            (outstanding and overdue balance, aging buckets, oldest overdue days,
            last payment date, at-risk flag; :mod:`syncd.core.receivables`).
        track_ledger_documents: count invoices and credit notes made by hand at the
            ledger for a known client (found by their contact) in its company figures
            and follow-up tasks; each unknown document seen costs one read.
        at_risk_days_overdue: a company with an invoice this many days overdue is at
            risk (0: days overdue alone never are).
        at_risk_overdue_above: per ISO currency, an overdue balance above this amount
            puts the company at risk (``{ USD = "5000" }``; decimal text or an integer).
        follow_up_tasks: create a CRM task for each overdue invoice: when it passes its
            due date, and again at each of ``follow_up_days``; completed when it is paid
            or voided.
        follow_up_days: the days overdue of the later tasks (the first is at 1 day).
        task_owner_id: the CRM user (HubSpot owner id) a task goes to when neither the
            deal nor the company has an owner; unset: the task is unassigned.
        task_due_days: days after its creation a task is due (0: at once).
        settled_tasks: what happens to a task once its invoice is paid or voided:
            ``complete`` (marked completed, with a note) or ``note`` (a note only).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    company_status: bool = False
    track_ledger_documents: bool = False
    at_risk_days_overdue: int = Field(default=30, ge=0)
    at_risk_overdue_above: dict[str, Decimal] = {}
    follow_up_tasks: bool = False
    follow_up_days: tuple[int, ...] = (7, 30)
    task_owner_id: str | None = None
    task_due_days: int = Field(default=0, ge=0)
    settled_tasks: Literal["complete", "note"] = "complete"

    @field_validator("at_risk_overdue_above", mode="before")
    @classmethod
    def _amounts(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            floats = [key for key, amount in value.items() if isinstance(amount, float)]
            if floats:
                raise ValueError(f'write amounts as decimal text ("5000.00"), not as floats: {", ".join(floats)}')
            for key in value:
                check_currency(str(key))
        return value

    @field_validator("follow_up_days")
    @classmethod
    def _steps(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(day < 1 for day in value):
            raise ValueError("days overdue are 1 or more")
        return tuple(sorted(set(value)))

    def task_steps(self) -> tuple[int, ...]:
        """Days overdue at which a task is created: 1 (the due date has passed), then ``follow_up_days``."""
        return tuple(sorted({1, *self.follow_up_days}))


class AlertSettings(BaseModel):
    """``[alerts]``: posts to a Slack incoming webhook (:mod:`syncd.engine.alerts`).

    Attributes:
        webhook_url: the incoming-webhook URL (a secret: ``env:NAME`` or ``webhook_url_file``);
            unset: no alerts are recorded or sent.
        group_window_s: seconds an alert waits for others to join it; everything pending
            then goes out as one message, grouped by kind.
        min_interval_s: seconds at least between two messages; alerts meanwhile wait and
            go out together (an outage sends a summary, not a flood).
        retry_max_s: the longest wait between two attempts of a failed delivery (the
            wait doubles from 5 s up to it).
        vendor_errors_after_s: seconds a connection's calls must keep failing (no call
            succeeding in between) before it is reported as a sustained vendor error.
        timeout_s: seconds a delivery may take before it counts as failed.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    webhook_url: SecretStr | None = None
    group_window_s: int = Field(default=60, ge=0)
    min_interval_s: int = Field(default=300, ge=0)
    retry_max_s: int = Field(default=900, ge=5)
    vendor_errors_after_s: int = Field(default=300, ge=1)
    timeout_s: float = Field(default=10, gt=0, le=60)

    @field_validator("webhook_url")
    @classmethod
    def _url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            try:
                check_url(value.get_secret_value())
            except ValueError:
                raise ValueError("not an http(s) URL (not shown: the URL is the secret)") from None
        return value


class Settings(BaseSettings):
    """The whole configuration tree (step 1: before connectors validate their tables).

    :func:`load_config` validates the file's tables with the ``SYNCD_*`` environment
    laid over them (this model's ``env_prefix`` and ``env_nested_delimiter``).
    """

    model_config = SettingsConfigDict(
        env_prefix="SYNCD_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        nested_model_default_partial_update=True,
    )

    daemon: DaemonSettings = DaemonSettings()
    connections: dict[str, dict[str, Any]] = {}
    pipelines: tuple[PipelineSettings, ...] = ()
    pilot: PilotSettings = PilotSettings()
    retention: RetentionSettings = RetentionSettings()
    audit: AuditSettings = AuditSettings()
    clients: ClientsSettings = ClientsSettings()
    collections: CollectionsSettings = CollectionsSettings()
    alerts: AlertSettings = AlertSettings()


@dataclass(frozen=True, kw_only=True)
class Connection:
    """A configured connector instance: its name, its connector, its settings."""

    name: str
    spec: ConnectorSpec
    settings: ConnectionSettings


@dataclass(frozen=True, kw_only=True)
class Config:
    """The loaded, fully validated configuration.

    Attributes:
        path: the config file (mapping paths are relative to its folder).
        settings: the step-1 tree.
        connections: each connection with its connector's validated settings.
    """

    path: Path
    settings: Settings
    connections: Mapping[str, Connection]

    @property
    def daemon(self) -> DaemonSettings:
        """The ``[daemon]`` table."""
        return self.settings.daemon

    def mapping_path(self, pipeline: PipelineSettings) -> Path:
        """A pipeline's mapping file, resolved against the config file's folder."""
        return pipeline.mapping if pipeline.mapping.is_absolute() else self.path.parent / pipeline.mapping

    def secrets(self) -> list[str]:
        """Every secret value in the configuration (for log redaction)."""
        values = [conn.settings for conn in self.connections.values()]
        found = [v.get_secret_value() for s in values for v in s.__dict__.values() if isinstance(v, SecretStr)]
        if self.daemon.encryption_key is not None:
            found.append(self.daemon.encryption_key.get_secret_value())
        if self.settings.alerts.webhook_url is not None:
            found.append(self.settings.alerts.webhook_url.get_secret_value())
        found.append(make_url(self.daemon.database_url).password or "")
        return [value for value in found if value]


KeyPath = tuple[str | int, ...]


@dataclass(frozen=True, kw_only=True)
class Inspection:
    """What :func:`inspect_config` found.

    Attributes:
        config: the valid part of the configuration: connections and pipelines with a
            problem are left out, a ``[daemon]`` key with a problem keeps its default.
        problems: every problem, in file order, each ``file:line [table].key: message``.
        where: the config file as named by the caller (the start of each problem).
        lines: the line of each table and key in the file.
    """

    config: Config
    problems: list[str]
    where: str
    lines: Mapping[KeyPath, int]

    def place(self, *loc: str | int) -> str:
        """``config.toml:40 [connections.xero]``: where a table or key is, for a later problem."""
        line = self.lines.get(loc)
        return f"{self.where}:{line} {_loc(loc)}" if line else f"{self.where} {_loc(loc)}"


def check_url(value: str) -> str:
    """Return ``value`` if it is an absolute http(s) URL, else raise ValueError.

    The message shows the URL redacted (:func:`redact_url`): user info and query may
    hold credentials.
    """
    parts = _split_url(value)
    if parts is None or parts.scheme not in {"http", "https"} or not parts.netloc:
        raise ValueError(f"not an http(s) URL: {redact_url(value)!r}")
    return value


def redact_url(value: str) -> str:
    """``value`` fit for a message: its user info, query and fragment replaced by ``***``."""
    parts = _split_url(value)
    if parts is None:
        return "<not a URL>"
    head = f"{parts.scheme}:" if parts.scheme else ""
    if value[len(head) :].startswith("//"):
        head += "//"  # kept as written: sqlite:////abs/path has an empty host
    _user, at, host = parts.netloc.rpartition("@")
    netloc = f"***@{host}" if at else host
    return head + netloc + parts.path + ("?***" if parts.query else "") + ("#***" if parts.fragment else "")


def _split_url(value: str) -> SplitResult | None:
    try:
        return urlsplit(value)
    except ValueError:  # e.g. an unbalanced "[" in the host
        return None


def check_database_url(value: str) -> str:
    """Return ``value`` if it is a SQLite or PostgreSQL SQLAlchemy URL, else raise ValueError."""
    try:
        backend = make_url(value).get_backend_name()
    except ArgumentError:
        raise ValueError(
            f"not a database URL: {redact_url(value)!r}; expected sqlite:///FILE or postgresql+psycopg://USER@HOST/DB"
        ) from None
    if backend not in {"sqlite", "postgresql", "postgres"}:
        raise ValueError(f"unsupported database {backend!r}; use sqlite:///FILE or postgresql+psycopg://USER@HOST/DB")
    return value


def anchor_database_url(value: str, folder: Path) -> str:
    """A SQLite URL with a relative file made absolute against ``folder`` (the config's).

    Other URLs, in-memory SQLite and absolute files are returned as they are.
    """
    url = make_url(value)
    database = url.database
    if url.get_backend_name() != "sqlite" or not database or database == ":memory:" or database.startswith("file:"):
        return value
    if Path(database).is_absolute():
        return value
    return url.set(database=os.path.normpath(folder / database)).render_as_string(hide_password=False)


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, resolve and validate the configuration at ``path``.

    Args:
        path: the TOML file.
        environ: the environment to resolve ``env:NAME`` values from (``os.environ``).

    Raises:
        ConfigError: with ``problems`` listing every problem, each naming file, line and key.
    """
    found = inspect_config(path, environ)
    if found.problems:
        raise ConfigError(f"{len(found.problems)} problem(s) in {path}", problems=found.problems)
    return found.config


def inspect_config(path: Path, environ: Mapping[str, str] | None = None) -> Inspection:
    """Read the configuration at ``path``, keeping what is valid and every problem.

    ``syncd check`` goes on with the valid part (mappings, credentials, drift), so one
    run reports every problem.

    Raises:
        ConfigError: the file cannot be read or is not TOML (nothing else can be checked).
    """
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {where}; copy config.example.toml", place=where) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the config file: {exc}", place=where) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = _TOML_AT.search(str(exc))
        line = f":{found.group(1)}" if found else ""
        raise ConfigError(f"{where}{line}: not valid TOML: {_TOML_AT.sub('', str(exc))}") from None
    env = os.environ if environ is None else environ
    reader = _Reader(where=where, folder=path.absolute().parent, lines=_key_lines(text), env=env)
    settings = reader.settings(_merge(raw, EnvSettingsSource(Settings)()))
    connections: dict[str, Connection] = {}
    for name, table in settings.connections.items():
        connection = reader.connection(name, table)
        if connection is not None:
            connections[name] = connection
    pipelines = reader.pipelines(settings, connections)
    daemon = settings.daemon.model_copy(
        update={"database_url": anchor_database_url(settings.daemon.database_url, reader.folder)}
    )
    settings = settings.model_copy(update={"daemon": daemon, "pipelines": pipelines})
    config = Config(path=path.absolute(), settings=settings, connections=connections)
    return Inspection(config=config, problems=reader.finish(), where=where, lines=reader.lines)


RETIRED_KEYS: Mapping[tuple[str, str], str] = {
    ("daemon", "max_attempts"): "no longer a setting: a failing record is retried until give_up_after_s seconds "
    "(default 172800 = 48 h) have passed since its first attempt; replace max_attempts with give_up_after_s",
}
"""Keys an older syncd read: a config that still has one fails, naming what replaced it."""

_TOML_AT = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_HEADER = re.compile(r"\s*(\[\[?)\s*([^\]#]+?)\s*\]\]?\s*(?:#.*)?$")
_KEY = re.compile(r"\s*([A-Za-z0-9_-]+|\"[^\"]*\")\s*=")


def _key_lines(text: str) -> dict[KeyPath, int]:
    """The line of each table header and key of a config file (tomllib keeps none).

    A line scanner, enough for the config's flat tables: ``[daemon]`` is
    ``("daemon",)``, the second ``[[pipelines]]`` is ``("pipelines", 1)``, its
    ``mapping`` key ``("pipelines", 1, "mapping")``.
    """
    lines: dict[KeyPath, int] = {}
    table: KeyPath = ()
    arrays: dict[KeyPath, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if header := _HEADER.match(line):
            table = tuple(part.strip().strip('"') for part in header.group(2).split("."))
            if header.group(1) == "[[":
                arrays[table] = arrays.get(table, -1) + 1
                table = (*table, arrays[table])
            lines.setdefault(table, number)
        elif key := _KEY.match(line):
            lines.setdefault((*table, key.group(1).strip('"')), number)
    return lines


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` laid on top, tables merged key by key (env over file)."""
    out = dict(base)
    for key, value in over.items():
        current = out.get(key)
        out[key] = _merge(current, value) if isinstance(current, dict) and isinstance(value, dict) else value
    return out


def _loc(loc: KeyPath) -> str:
    """``('connections', 'xero', 'token_url')`` → ``[connections.xero].token_url``."""
    parts = [str(p) for p in loc]
    if len(parts) == 1:
        return parts[0]
    if parts[0] == "pipelines":
        head = f"[[pipelines]] #{int(parts[1]) + 1}"
        return ".".join([head, *parts[2:]])
    table = parts[:2] if parts[0] == "connections" else parts[:1]
    rest = ".".join(parts[len(table) :])
    return f"[{'.'.join(table)}]" + (f".{rest}" if rest else "")


def _msg(err: Mapping[str, Any], fields: Collection[str]) -> str:
    """A pydantic error message, without the offending input (it may be a secret)."""
    if err.get("type") == "extra_forbidden":
        return "unknown key" + did_you_mean(str(err["loc"][-1]), set(fields))
    if err.get("type") == "missing":
        return "missing (required)"
    return str(err["msg"]).removeprefix("Value error, ")


_TABLE_MODELS: Mapping[str, type[BaseModel]] = {
    "daemon": DaemonSettings,
    "pilot": PilotSettings,
    "pipelines": PipelineSettings,
    "retention": RetentionSettings,
    "audit": AuditSettings,
    "clients": ClientsSettings,
    "collections": CollectionsSettings,
    "alerts": AlertSettings,
}
_SECRET_TABLES: Mapping[str, type[BaseModel]] = {"daemon": DaemonSettings, "alerts": AlertSettings}


def _fields_at(loc: KeyPath) -> Collection[str]:
    """The known keys of the table an error at ``loc`` is in."""
    if len(loc) <= 1:
        return Settings.model_fields.keys()
    model = _TABLE_MODELS.get(str(loc[0]))
    return model.model_fields.keys() if model is not None else ()


class _Reader:
    """Collects the problems of one config file while its parts are validated."""

    def __init__(self, *, where: str, folder: Path, lines: Mapping[KeyPath, int], env: Mapping[str, str]) -> None:
        self.where = where
        self.folder = folder
        self.lines = lines
        self.env = env
        self.problems: list[tuple[int, str]] = []
        self.missing: dict[str, list[KeyPath]] = {}
        self.pipeline_index: list[int] = []  # each valid pipeline's place among [[pipelines]]

    def add(self, loc: KeyPath, message: str) -> None:
        """Record a problem at ``loc``, with its line in the file when the key is there."""
        line = self._line(loc)
        place = f"{self.where}:{line}" if line else self.where
        self.problems.append((line, f"{place} {_loc(loc)}: {message}"))

    def _line(self, loc: KeyPath) -> int:
        # A key given as X_file is reported as X; an absent key at its table's header.
        keys = loc
        while keys:
            for candidate in (keys, (*keys[:-1], f"{keys[-1]}_file")):
                if candidate in self.lines:
                    return self.lines[candidate]
            keys = keys[:-1]
        return 0

    def finish(self) -> list[str]:
        """Every problem in file order; an unset environment variable once, with every key naming it."""
        for var, locs in self.missing.items():
            also = f" (also named by {', '.join(_loc(loc) for loc in locs[1:])})" if len(locs) > 1 else ""
            self.add(locs[0], f"environment variable {var} is not set{also}")
        return [text for _, text in sorted(self.problems, key=lambda problem: problem[0])]

    def resolve(
        self, table: Mapping[str, Any], loc: KeyPath, fields: Collection[str]
    ) -> tuple[dict[str, Any], set[str]]:
        """``table`` with ``"env:NAME"`` values and ``X_file`` keys replaced by what they name.

        Returns:
            the resolved table, and the keys whose value could not be resolved (each
            already recorded as a problem, and left out of the table).
        """
        out: dict[str, Any] = {}
        failed: set[str] = set()
        for key, value in table.items():
            target = key.removesuffix("_file")
            if key.endswith("_file") and target in fields and isinstance(value, str):
                secret = self._read_file(value, (*loc, key))
                if secret is None:
                    failed.add(target)
                else:
                    out[target] = secret
            elif isinstance(value, str) and value.startswith("env:"):
                var = value.removeprefix("env:")
                if self.env.get(var):
                    out[key] = self.env[var]
                else:
                    self.missing.setdefault(var, []).append((*loc, key))
                    failed.add(key)
            else:
                out[key] = value
        return out, failed

    def _read_file(self, name: str, loc: KeyPath) -> str | None:
        path = Path(name) if Path(name).is_absolute() else self.folder / name
        try:
            value = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            self.add(loc, f"cannot read {path}: {reason}")
            return None
        if not value:
            self.add(loc, f"{path} is empty")
            return None
        return value

    def errors(self, exc: ValidationError, loc: KeyPath, fields: Collection[str] | None = None) -> None:
        """Record each error of a pydantic validation at ``loc``."""
        for err in exc.errors():
            at = (*loc, *err["loc"])
            self.add(at, _msg({**err, "loc": at}, _fields_at(at) if fields is None else fields))

    def settings(self, data: dict[str, Any]) -> Settings:
        """The step-1 tree; a key with a problem is recorded and left at its default."""
        data = dict(data)
        raw_pipelines = data.pop("pipelines", [])
        for table, model in _SECRET_TABLES.items():
            if isinstance(data.get(table), dict):
                data[table], _ = self.resolve(data[table], (table,), model.model_fields.keys())
        data = self._without_retired(data)
        settings: Settings | None = None
        for attempt in range(3):
            try:
                settings = Settings.model_validate(data)
                break
            except ValidationError as exc:
                if attempt == 0:
                    self.errors(exc, ())
                data = _without(data, [err["loc"] for err in exc.errors()])
        settings = settings or Settings.model_validate({})
        return settings.model_copy(update={"pipelines": self._pipeline_tables(raw_pipelines)})

    def _without_retired(self, data: dict[str, Any]) -> dict[str, Any]:
        """``data`` without the keys syncd no longer reads, each reported with the key that replaced it."""
        for (table, key), message in RETIRED_KEYS.items():
            values = data.get(table)
            if isinstance(values, dict) and key in values:
                self.add((table, key), message)
                data = {**data, table: {k: v for k, v in values.items() if k != key}}
        return data

    def _pipeline_tables(self, raw: Any) -> tuple[PipelineSettings, ...]:
        if not isinstance(raw, list):
            self.add(("pipelines",), "expected [[pipelines]] tables")
            return ()
        found: list[PipelineSettings] = []
        for index, table in enumerate(raw):
            try:
                found.append(PipelineSettings.model_validate(table))
            except ValidationError as exc:
                self.errors(exc, ("pipelines", index))
            else:
                self.pipeline_index.append(index)
        return tuple(found)

    def connection(self, name: str, table: Mapping[str, Any]) -> Connection | None:
        """Step 2 for ``[connections.NAME]``: its connector's model, secrets resolved."""
        loc: KeyPath = ("connections", name)
        if not isinstance(table, Mapping):
            self.add(loc, "expected a table")
            return None
        connector = table.get("connector")
        if not isinstance(connector, str):
            self.add((*loc, "connector"), f"missing; installed connectors: {', '.join(registry.available())}")
            return None
        try:
            spec = registry.load(connector)
        except ConfigError as exc:
            self.add((*loc, "connector"), exc.message + did_you_mean(connector, set(registry.available())))
            return None
        fields = spec.settings_model.model_fields.keys()
        resolved, failed = self.resolve(table, loc, fields)
        bad_url = False
        for key, value in resolved.items():
            if key.endswith(("url", "uri")) and isinstance(value, str):
                try:
                    check_url(value)
                except ValueError as exc:
                    self.add((*loc, key), str(exc))
                    bad_url = True
        try:
            settings = spec.settings_model.model_validate(resolved)
        except ValidationError as exc:
            # A key already reported (unset variable, unreadable file) is not reported again
            # as missing, nor is a whole-table rule that it fails.
            for err in exc.errors():
                at = (*loc, *err["loc"])
                if failed and (not err["loc"] or err["loc"][0] in failed):
                    continue
                self.add(at, _msg({**err, "loc": at}, fields))
            return None
        return None if failed or bad_url else Connection(name=name, spec=spec, settings=settings)

    def pipelines(self, settings: Settings, connections: Mapping[str, Connection]) -> tuple[PipelineSettings, ...]:
        """The pipelines whose connections and mapping file exist; a problem for each other."""
        roles = {"crm": "Crm", "invoicing": "Invoicing", "time_tracking": "TimeTracker"}
        valid: list[PipelineSettings] = []
        for index, pipeline in zip(self.pipeline_index, settings.pipelines, strict=True):
            ok = True
            for field, role in roles.items():
                name = getattr(pipeline, field)
                if name is None:
                    continue
                if name not in settings.connections:
                    defined = ", ".join(sorted(settings.connections)) or "none"
                    self.add(
                        ("pipelines", index, field),
                        f"no connection named {name!r}{did_you_mean(name, set(settings.connections))}; "
                        f"defined: {defined}",
                    )
                    ok = False
                elif name not in connections:
                    ok = False  # its own problems are reported at its table
                elif role not in {r.__name__ for r in connections[name].spec.roles}:
                    self.add(("pipelines", index, field), f"connection {name!r} cannot act as {role}")
                    ok = False
            mapping = pipeline.mapping if pipeline.mapping.is_absolute() else self.folder / pipeline.mapping
            if not mapping.is_file():
                self.add(("pipelines", index, "mapping"), f"file not found: {mapping}")
                ok = False
            if ok:
                valid.append(pipeline)
        return tuple(valid)


def _without(data: Mapping[str, Any], locs: Collection[tuple[int | str, ...]]) -> dict[str, Any]:
    """``data`` without the keys at ``locs`` (so the rest can be validated)."""
    out = {key: dict(value) if isinstance(value, dict) else value for key, value in data.items()}
    for loc in locs:
        table = out.get(str(loc[0]))
        if len(loc) > 1 and isinstance(table, dict):
            table.pop(str(loc[1]), None)
        else:
            out.pop(str(loc[0]), None)
    return out
