"""The connector contract and its lookup through the entry-point group ``syncd.connectors``.

A connector registers a :class:`ConnectorSpec`; the engine hands its factory a
:class:`ConnectorContext`.

Built-in connectors register exactly like third-party ones (see ``pyproject.toml``).
Entry points are loaded lazily, one at a time, and checked to be a
:class:`ConnectorSpec`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict

from syncd.core.errors import ConfigError
from syncd.core.interfaces import WebhookVerifier

if TYPE_CHECKING:
    import httpx
    from pydantic import SecretStr

    from syncd.plumbing.http import VendorHttp

GROUP = "syncd.connectors"


class TokenStore(Protocol):
    """Durable, encrypted storage for one connection's OAuth tokens.

    ``locked`` serialises refreshes across tasks and replicas (a row lock on
    PostgreSQL), so a single-use refresh token is spent exactly once.
    """

    async def load(self) -> Mapping[str, Any] | None:
        """The stored token set, decrypted, or ``None``."""
        ...

    async def save(self, tokens: Mapping[str, Any]) -> None:
        """Persist a token set (encrypted) before it is used."""
        ...

    def locked(self) -> Any:
        """An async context manager holding the refresh lock for this connection."""
        ...


@dataclass(frozen=True, kw_only=True)
class ConnectorContext:
    """What the engine hands a connector factory.

    Attributes:
        connection: the configured connection name.
        http: the shared HTTP plumbing, already bound to this connection's base URL,
            rate limit and retry policy by the factory via :func:`syncd.plumbing.http.vendor_http`.
        client: the shared ``httpx.AsyncClient`` (for token endpoints on other hosts).
        tokens: durable token storage for OAuth connectors.
        clock: returns the current aware UTC time (injected for tests).
        token_refresh_failed: call it when an access token cannot be refreshed or
            fetched (counted in ``/metrics``; :class:`syncd.plumbing.tokens.RotatingTokens` takes it).
    """

    connection: str
    client: httpx.AsyncClient
    tokens: TokenStore
    clock: Callable[[], datetime]
    make_http: Callable[..., VendorHttp]
    token_refresh_failed: Callable[[], None] = field(default=lambda: None)  # a bare context counts nothing


class ConnectionSettings(BaseModel):
    """Base of each connector's settings model (``[connections.NAME]``).

    Subclasses add their own keys; every URL they call must be a setting.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    connector: str
    base_url: str


class CodeFlow(Protocol):
    """A connector's OAuth2 authorization-code flow, for ``syncd auth <connector>``.

    syncd runs the localhost listener for the redirect; the connector knows its URLs.
    """

    def consent_url(self, settings: Any, state: str) -> str:
        """The URL a person opens to grant access."""
        ...

    def redirect_uri(self, settings: Any) -> str:
        """Where the vendor sends the browser back (``http://localhost:PORT/PATH``)."""
        ...

    async def exchange_code(self, settings: Any, client: httpx.AsyncClient, code: str) -> Mapping[str, Any]:
        """The first token set for ``code`` (syncd saves it, encrypted)."""
        ...

    async def describe(self, settings: Any, client: httpx.AsyncClient, tokens: Mapping[str, Any]) -> list[str]:
        """Lines to show after connecting (e.g. the tenants the token reaches)."""
        ...


@dataclass(frozen=True, kw_only=True)
class ConnectorSpec:
    """What a connector registers under the entry-point group ``syncd.connectors``.

    Attributes:
        name: the entry-point name (``hubspot``).
        roles: the role Protocols its instances implement.
        settings_model: its ``[connections.NAME]`` model.
        factory: builds the connector for one connection.
        verifier: builds the webhook verifier for one connection, if it has webhooks.
        secret_fields: settings keys that hold secrets (for ``check`` and redaction).
        code_flow: its OAuth2 code flow, if ``syncd auth`` can connect it.
    """

    name: str
    roles: frozenset[type[Any]]
    settings_model: type[ConnectionSettings]
    factory: Callable[[Any, ConnectorContext], Any]
    verifier: Callable[[Any, Callable[[], datetime]], WebhookVerifier] | None = None
    secret_fields: Sequence[str] = field(default_factory=tuple)
    code_flow: CodeFlow | None = None


def secret_value(secret: SecretStr | None) -> str:
    """The plain value of an optional secret ('' when unset); use at the wire only."""
    return secret.get_secret_value() if secret is not None else ""


def available() -> list[str]:
    """Names of every installed connector."""
    return sorted(ep.name for ep in entry_points(group=GROUP))


@cache
def load(name: str) -> ConnectorSpec:
    """The connector registered as ``name``.

    Raises:
        ConfigError: no such connector (the message lists those installed), or the
            entry point is not a ``ConnectorSpec``.
    """
    found = [ep for ep in entry_points(group=GROUP) if ep.name == name]
    if not found:
        raise ConfigError(f"unknown connector {name!r}; installed: {', '.join(available()) or 'none'}")
    try:
        spec = found[0].load()
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"connector {name!r} failed to load from {found[0].value!r}: {exc}") from exc
    if not isinstance(spec, ConnectorSpec):
        raise ConfigError(f"entry point {found[0].value!r} for connector {name!r} is not a ConnectorSpec")
    return spec
