"""Configuration: one TOML file plus ``SYNCD_*`` environment overrides.

``config.example.toml`` is the reference for every key. Loading happens in two steps:

1. The file and the environment (``SYNCD_DAEMON__LISTEN``,
   ``SYNCD_CONNECTIONS__HUBSPOT__TOKEN`` ...; nested keys joined with ``__``) are read
   into :class:`Settings` with pydantic-settings.
2. Each ``[connections.NAME]`` table is validated by its connector's own settings
   model, after secrets are resolved: a value ``"env:NAME"`` is read from the
   environment, and a key ``X_file = "/path"`` is read from that file into ``X``.

Every problem of both steps is collected and raised at once as one
:class:`~syncd.errors.ConfigError`, each line naming the file and the key, e.g.
``config.toml [connections.xero].token_url: not an http(s) URL: 'htp:/x'``.
No secret value ever appears in a message.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from syncd import registry
from syncd.errors import ConfigError
from syncd.interfaces import ConnectionSettings, ConnectorSpec
from syncd.money import check_currency


class DaemonSettings(BaseModel):
    """``[daemon]``: the process itself.

    Attributes:
        database_url: ``sqlite:///./syncd.db`` (default) or ``postgresql+psycopg://...``
            for several replicas.
        listen: ``host:port`` uvicorn binds to.
        public_url: the URL vendors call (behind a proxy); signatures are checked
            against it. Defaults to ``http://{listen}``.
        timezone: the company's IANA zone; a client may override it.
        billing_start: never invoice a deal won before this moment; default: when
            the database was created.
        poll_interval_s: seconds between change-feed polls of each connection.
        workers: concurrent event/effect workers in this process.
        lease_s: seconds a claimed row stays claimed before another worker may take it.
        max_attempts: attempts for an effect before it is dead-lettered.
        encryption_key: Fernet key that encrypts OAuth tokens at rest.
        log_level: ``debug``, ``info``, ``warning`` or ``error``.
        default_currency / payment_terms_days: defaults when a mapping yields none.
        drift_check_interval_s: seconds between checks of the mappings against the
            vendors' live schemas (properties, account codes, tax types; 0 = off).
        mapping_watch_interval_s: seconds between looks at the mapping files'
            modification times; a changed file is validated and swapped in (0 = off;
            SIGHUP reloads at once either way).
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
    max_attempts: int = Field(default=8, ge=1)
    encryption_key: SecretStr | None = None
    log_level: str = "info"
    default_currency: str = "USD"
    payment_terms_days: int = Field(default=30, ge=0)
    drift_check_interval_s: int = Field(default=3600, ge=0)
    mapping_watch_interval_s: int = Field(default=5, ge=0)
    shared_rate_budget: bool = True
    webhook_body_timeout_s: float = Field(default=10, gt=0, le=300)
    max_connections: int = Field(default=100, ge=2)
    keep_alive_timeout_s: int = Field(default=5, ge=1)
    request_head_timeout_s: float = Field(default=10, gt=0, le=300)

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


class Settings(BaseSettings):
    """The whole configuration tree (step 1: before connectors validate their tables)."""

    model_config = SettingsConfigDict(
        env_prefix="SYNCD_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        nested_model_default_partial_update=True,
    )
    toml_path: ClassVar[Path | None] = None

    daemon: DaemonSettings = DaemonSettings()
    connections: dict[str, dict[str, Any]] = {}
    pipelines: tuple[PipelineSettings, ...] = ()
    pilot: PilotSettings = PilotSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls.toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls.toml_path))
        return tuple(sources)


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
        return [value for value in found if value]


def check_url(value: str) -> str:
    """Return ``value`` if it is an absolute http(s) URL, else raise ValueError."""
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise ValueError(f"not an http(s) URL: {value!r}")
    return value


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, resolve and validate the configuration at ``path``.

    Args:
        path: the TOML file.
        environ: the environment to resolve ``env:NAME`` secrets from (``os.environ``).

    Raises:
        ConfigError: with ``problems`` listing every problem, each naming file and key.
    """
    env = os.environ if environ is None else environ
    where = str(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {where}", place=where)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from exc
    problems: list[str] = []
    settings: Settings | None = None
    try:
        settings = _read_settings(path, where)
    except ConfigError as exc:
        problems += exc.problems
    # Keep going after a step-1 problem so every problem is reported at once.
    tables = settings.connections if settings is not None else raw.get("connections", {})
    connections: dict[str, Connection] = {}
    for name, table in tables.items() if isinstance(tables, dict) else ():
        connection = _connection(name, table, where, env, problems) if isinstance(table, dict) else None
        if connection is not None:
            connections[name] = connection
    if settings is not None:
        problems += _pipeline_problems(settings, connections, path, where)
    if problems or settings is None:
        raise ConfigError(f"{len(problems)} problem(s) in {where}", problems=problems)
    return Config(path=path, settings=settings, connections=connections)


def _read_settings(path: Path, where: str) -> Settings:
    Settings.toml_path = path
    try:
        return Settings()
    except ValidationError as exc:
        problems = [f"{where} {_loc(err['loc'])}: {_msg(err)}" for err in exc.errors()]
        raise ConfigError(f"{len(problems)} problem(s) in {where}", problems=problems) from None
    finally:
        Settings.toml_path = None


def _loc(loc: tuple[int | str, ...]) -> str:
    """``('connections', 'xero', 'token_url')`` → ``[connections.xero].token_url``."""
    parts = [str(p) for p in loc]
    if len(parts) == 1:
        return parts[0]
    if parts[0] == "pipelines" and len(parts) > 2:
        return f"[[pipelines]] #{int(parts[1]) + 1}.{'.'.join(parts[2:])}"
    table = parts[:2] if parts[0] == "connections" and len(parts) > 2 else parts[:1]
    return f"[{'.'.join(table)}].{'.'.join(parts[len(table) :])}"


def _msg(err: Mapping[str, Any]) -> str:
    """A pydantic error message, without the offending input (it may be a secret)."""
    if err.get("type") == "extra_forbidden":
        return "unknown key"
    return str(err["msg"]).removeprefix("Value error, ")


def _connection(
    name: str, table: Mapping[str, Any], where: str, env: Mapping[str, str], problems: list[str]
) -> Connection | None:
    head = f"{where} [connections.{name}]"
    connector = table.get("connector")
    if not isinstance(connector, str):
        problems.append(f"{head}.connector: missing; installed connectors: {', '.join(registry.available())}")
        return None
    try:
        spec = registry.load(connector)
    except ConfigError as exc:
        problems.append(f"{head}.connector: {exc.message}")
        return None
    resolved = _resolve_secrets(table, head, env, problems)
    for key, value in resolved.items():
        if key.endswith("url") and isinstance(value, str):
            try:
                check_url(value)
            except ValueError as exc:
                problems.append(f"{head}.{key}: {exc}")
    try:
        settings = spec.settings_model.model_validate(resolved)
    except ValidationError as exc:
        problems += [f"{where} {_loc(('connections', name, *err['loc']))}: {_msg(err)}" for err in exc.errors()]
        return None
    return Connection(name=name, spec=spec, settings=settings)


def _resolve_secrets(
    table: Mapping[str, Any], head: str, env: Mapping[str, str], problems: list[str]
) -> dict[str, Any]:
    """Resolve ``"env:NAME"`` values and ``X_file`` keys; record a problem for each that fails."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key.endswith("_file") and isinstance(value, str):
            target = key.removesuffix("_file")
            try:
                out[target] = Path(value).read_text(encoding="utf-8").strip()
            except OSError as exc:
                problems.append(f"{head}.{key}: cannot read {value!r}: {exc.strerror}")
        elif isinstance(value, str) and value.startswith("env:"):
            var = value.removeprefix("env:")
            if env.get(var):
                out[key] = env[var]
            else:
                problems.append(f"{head}.{key}: environment variable {var} is not set")
        else:
            out[key] = value
    return out


def _pipeline_problems(settings: Settings, connections: Mapping[str, Connection], path: Path, where: str) -> list[str]:
    problems: list[str] = []
    roles = {"crm": "Crm", "invoicing": "Invoicing", "time_tracking": "TimeTracker"}
    for index, pipeline in enumerate(settings.pipelines, start=1):
        head = f"{where} [[pipelines]] #{index}"
        for field, role in roles.items():
            name = getattr(pipeline, field)
            if name is None:
                continue
            if name not in settings.connections:
                problems.append(
                    f"{head}.{field}: no connection named {name!r}; defined: {sorted(settings.connections)}"
                )
            elif name in connections and role not in {r.__name__ for r in connections[name].spec.roles}:
                problems.append(f"{head}.{field}: connection {name!r} cannot act as {role}")
        mapping = pipeline.mapping if pipeline.mapping.is_absolute() else path.parent / pipeline.mapping
        if not mapping.is_file():
            problems.append(f"{head}.mapping: file not found: {mapping}")
    return problems
