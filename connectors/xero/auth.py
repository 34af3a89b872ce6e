"""OAuth 2.0 for Xero: custom connections (client credentials) and the code flow.

One ``httpx.Auth`` flow, :class:`XeroAuth`, puts ``Authorization: Bearer …`` on every API
request; its tokens come from one of two sources:

* :class:`ClientCredentials` for a *custom connection*: the access token comes from
  ``POST token_url`` with HTTP basic auth and ``grant_type=client_credentials``; there is
  no refresh token ("Do I need to manage refresh tokens? No" and "the xero-tenant-id
  header is not required": https://developer.xero.com/faq/custom-integration). Tokens
  live 30 minutes and are cached in memory and in the :class:`~syncd.plumbing.registry.TokenStore`.
* :func:`refreshing_tokens` for the authorization-code flow: the shared
  lock-reload-refresh-save piece (:class:`syncd.plumbing.tokens.RotatingTokens`), because Xero
  refresh tokens are single-use and rotate ("When you perform a token refresh, you
  should replace your existing refresh token with the new one returned in the
  response", https://developer.xero.com/faq/oauth2). An existing connection is brought
  in with the ``refresh_token`` setting, imported once into the token store. Without a
  configured ``tenant_id`` the tenant is discovered (:class:`TenantDiscovery`).

The flow resends a request once after a 401 with a renewed token. It never reads
bodies: :class:`XeroErrors` tells the shared :class:`~syncd.plumbing.http.VendorHttp` how Xero's
error answers read (every ``ValidationException`` message; what to do about a 401/403).

The code flow's first step is the lead's ``syncd auth xero`` CLI: :func:`consent_url`
and :func:`exchange_code` (https://developer.xero.com/documentation/oauth2/auth-flow).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import httpx
import structlog

from connectors.xero.models import XeroError, load_json
from syncd.core.errors import AuthError, ConfigError, RateLimited, RetriableError
from syncd.plumbing.http import retry_after_s
from syncd.plumbing.registry import secret_value
from syncd.plumbing.tokens import EXPIRY_MARGIN_S as EXPIRY_MARGIN_S
from syncd.plumbing.tokens import RotatingTokens, TokenAuth, TokenSource
from syncd.plumbing.tokens import token_valid as token_valid

if TYPE_CHECKING:
    from connectors.xero.settings import XeroSettings
    from syncd.plumbing.registry import TokenStore

log = structlog.get_logger("connectors.xero.auth")

Tokens = Mapping[str, Any]


def token_set(payload: Mapping[str, Any], now_s: float, previous: Tokens | None = None) -> dict[str, Any]:
    """The token set syncd stores, from a token-endpoint answer.

    ``expires_at`` is absolute epoch seconds (``expires_in`` is relative: 1800 for Xero).
    A refresh answer always carries a new refresh token; the previous one is kept only
    if an answer lacks it.
    """
    tokens: dict[str, Any] = {
        "access_token": str(payload["access_token"]),
        "token_type": str(payload.get("token_type", "Bearer")),
        "expires_at": int(now_s + int(payload.get("expires_in", 1800))),
    }
    refresh = payload.get("refresh_token") or (previous or {}).get("refresh_token")
    if refresh:
        tokens["refresh_token"] = str(refresh)
    if payload.get("scope"):
        tokens["scope"] = str(payload["scope"])
    return tokens


async def request_token(settings: XeroSettings, client: httpx.AsyncClient, form: Mapping[str, str]) -> dict[str, Any]:
    """POST ``form`` to the token endpoint with HTTP basic client authentication.

    Raises:
        AuthError: Xero refused the grant (``invalid_client``, ``invalid_grant`` …).
        RateLimited / RetriableError: a 429, a 5xx or a network failure.
    """
    grant = form.get("grant_type", "?")
    try:
        response = await client.post(
            settings.token_url,
            data=dict(form),
            auth=httpx.BasicAuth(settings.client_id, settings.client_secret.get_secret_value()),
            headers={"Accept": "application/json"},
        )
    except httpx.TransportError as exc:
        raise RetriableError(f"xero: token endpoint unreachable ({type(exc).__name__}) for {grant}") from exc
    if response.status_code == 429:
        raise RateLimited("xero: token endpoint answered 429", retry_after_s=retry_after_s(response.headers))
    if response.status_code >= 500:
        raise RetriableError(f"xero: token endpoint answered {response.status_code} for {grant}")
    if response.status_code != 200:
        raise AuthError(f"xero: token endpoint refused {grant} ({_oauth_error(response)}); {_advice(grant)}")
    payload = load_json(response.content)
    if not isinstance(payload, dict) or "access_token" not in payload:
        raise AuthError(f"xero: token endpoint answered 200 without an access_token for {grant}")
    return payload


def _oauth_error(response: httpx.Response) -> str:
    try:
        payload = load_json(response.content)
    except ValueError:
        return f"HTTP {response.status_code}"
    return str(payload.get("error", f"HTTP {response.status_code}")) if isinstance(payload, dict) else "?"


def _advice(grant: str) -> str:
    if grant == "refresh_token":
        return "the refresh token is spent or revoked: run `syncd auth xero` to reconnect"
    if grant == "authorization_code":
        return "the code is single-use and expires after 5 minutes: start `syncd auth xero` again"
    return "check client_id and client_secret of the connection"


class XeroErrors:
    """How Xero's error answers read (:class:`~syncd.plumbing.http.VendorErrors`).

    Args:
        connection: the connection name, for the advice.
        settings: the connection's settings (grant, tenant, scopes).
    """

    def __init__(self, connection: str, settings: XeroSettings) -> None:
        self.connection = connection
        self.settings = settings

    def messages(self, response: httpx.Response) -> list[str]:
        """Every ``Elements[].ValidationErrors[].Message`` of a ``ValidationException``, else ``Message``.

        Body: spec ``components.schemas.Error`` (``ErrorNumber``, ``Type``, ``Message``,
        ``Elements[].ValidationErrors[].Message``); "400 Bad Request: A validation
        exception has occured", with an ``ApiException`` summary of the reason
        (https://developer.xero.com/documentation/api/http-response-codes).
        """
        try:
            return XeroError.model_validate(load_json(response.content)).messages()
        except ValueError:
            return []

    def auth_advice(self, response: httpx.Response) -> str:
        """401: the grant is gone (reconnect); 403: the organisation or a scope is missing."""
        reconnect = f"run `syncd auth xero --connection {self.connection}` to reconnect"
        if self.settings.grant == "client_credentials":
            reconnect = "check client_id and client_secret, and the custom connection's organisation and scopes"
        if response.status_code == 401:
            return f"Xero refused the access token even after renewing it (the app was disconnected?); {reconnect}"
        tenant = self.settings.tenant_id or "the discovered organisation"
        scopes = " ".join(self.settings.scopes)
        return (
            f"Xero refused access ({_detail(response)}): organisation {tenant} is not connected to this app, "
            f"or the token lacks the scope for this call (syncd needs: {scopes}); {reconnect}"
        )


def _detail(response: httpx.Response) -> str:
    """The identity layer's ``Detail`` (``AuthorizationUnsuccessful``), else the status."""
    try:
        body = load_json(response.content)
    except ValueError:
        return f"HTTP {response.status_code}"
    detail = body.get("Detail") if isinstance(body, dict) else None
    return str(detail) if detail else f"HTTP {response.status_code}"


class XeroAuth(TokenAuth):
    """Bearer token on each request, one resend after a 401, and the ``xero-tenant-id`` header.

    Args:
        source: the token source (client credentials, refreshing, or a fixed token).
        tenants: discovers the tenant when ``tenant_id`` is not configured (code flow).
    """

    def __init__(self, source: TokenSource, tenants: TenantDiscovery | None = None) -> None:
        super().__init__(source)
        self.tenants = tenants

    async def prepare(self, request: httpx.Request, token: str) -> None:
        """Add the discovered ``xero-tenant-id`` when the request has none."""
        if self.tenants is not None and "xero-tenant-id" not in request.headers:
            request.headers["Xero-tenant-id"] = await self.tenants.tenant_id(token)


class TenantDiscovery:
    """The one organisation a code-flow token reaches, from ``GET connections_url``.

    Used when ``tenant_id`` is not configured: exactly one connected tenant is taken;
    none or several is a :class:`~syncd.core.errors.ConfigError` listing them
    (https://developer.xero.com/documentation/guides/oauth2/tenants; spec
    ``xero-identity.yaml`` ``GET /connections``).

    Args:
        settings: the connection's settings.
        client: the shared client.
        connection: the connection name, for messages.
    """

    def __init__(self, settings: XeroSettings, client: httpx.AsyncClient, connection: str) -> None:
        self.settings = settings
        self.client = client
        self.connection = connection
        self._tenant: str | None = None
        self._lock = asyncio.Lock()

    async def tenant_id(self, access_token: str) -> str:
        """The tenant id (looked up once per process)."""
        async with self._lock:
            if self._tenant is None:
                self._tenant = self._only(await list_connections(self.settings, self.client, access_token))
                log.info("xero_tenant_discovered", connection=self.connection, tenant_id=self._tenant)
            return self._tenant

    def _only(self, connections: list[dict[str, Any]]) -> str:
        tenants = [item for item in connections if item.get("tenantId")]
        if len(tenants) == 1:
            return str(tenants[0]["tenantId"])
        place = f"[connections.{self.connection}].tenant_id"
        if not tenants:
            raise ConfigError(
                f"no Xero organisation is connected to this app; run `syncd auth xero --connection "
                f"{self.connection}` and pick one",
                place=place,
            )
        listed = ", ".join(f"{item.get('tenantName')!r} ({item['tenantId']})" for item in tenants)
        raise ConfigError(
            f"the token reaches {len(tenants)} Xero organisations: {listed}; set tenant_id to the one to invoice in",
            place=place,
        )


def refresher(
    settings: XeroSettings, client: httpx.AsyncClient, clock: Callable[[], datetime]
) -> Callable[[str], Awaitable[dict[str, Any]]]:
    """The code flow's refresh call for :class:`~syncd.plumbing.tokens.RotatingTokens`.

    ``POST token_url`` with ``grant_type=refresh_token`` and basic client auth
    (https://developer.xero.com/documentation/oauth2/auth-flow, "Refreshing access tokens").
    """

    async def refresh(refresh_token: str) -> dict[str, Any]:
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        payload = await request_token(settings, client, form)
        return {**token_set(payload, clock().timestamp()), "grant": "authorization_code"}

    return refresh


def refreshing_tokens(
    settings: XeroSettings,
    client: httpx.AsyncClient,
    tokens: TokenStore,
    clock: Callable[[], datetime],
    connection: str,
    on_failure: Callable[[], None] | None = None,
) -> RotatingTokens:
    """Access tokens of the code flow: the shared lock-reload-refresh-save piece.

    A configured ``refresh_token`` (an existing connection brought in) is imported once;
    ``on_failure`` is called when a refresh fails (``/metrics`` counts it).
    """
    return RotatingTokens(
        store=tokens,
        refresh=refresher(settings, client, clock),
        clock=clock,
        connection=connection,
        reconnect=f"run `syncd auth xero --connection {connection}` to connect",
        configured_refresh_token=secret_value(settings.refresh_token) or None,
        on_failure=on_failure,
    )


class StaticToken:
    """A fixed access token that is never renewed (``check()`` must not rotate tokens)."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def access_token(self) -> str:
        """The fixed token."""
        return self._token

    async def renew(self, rejected: str) -> str:
        """Refused: a rejected token is reported, not replaced."""
        raise AuthError("xero: the stored access token was rejected (401); the daemon will refresh it")


class ClientCredentials:
    """Access tokens for a Xero custom connection (client credentials grant).

    Custom connections doc: https://developer.xero.com/documentation/guides/oauth2/custom-connections/
    (token request: ``POST https://identity.xero.com/connect/token``, basic auth,
    ``grant_type=client_credentials``; no refresh token). A fetch that fails is reported
    to ``on_failure`` (``/metrics`` counts it as a token refresh failure).
    """

    def __init__(
        self,
        settings: XeroSettings,
        client: httpx.AsyncClient,
        tokens: TokenStore,
        clock: Callable[[], datetime],
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self.on_failure = on_failure
        self.settings = settings
        self.client = client
        self.tokens = tokens
        self.clock = clock
        self._cached: Tokens = {}
        self._lock = asyncio.Lock()

    def _now(self) -> float:
        return self.clock().timestamp()

    async def access_token(self) -> str:
        """The cached token, the stored one, or a freshly fetched one."""
        if not token_valid(self._cached, self._now()):
            async with self._lock:
                if not token_valid(self._cached, self._now()):
                    stored = await self.tokens.load()
                    self._cached = stored if stored is not None and self._usable(stored) else await self._fetch()
        return str(self._cached["access_token"])

    def _usable(self, stored: Tokens) -> bool:
        if stored.get("grant") != "client_credentials":
            return False
        return token_valid(stored, self._now())

    async def renew(self, rejected: str) -> str:
        """Fetch a new token unless another task already replaced ``rejected``."""
        async with self._lock:
            if self._cached.get("access_token") == rejected or not token_valid(self._cached, self._now()):
                self._cached = await self._fetch()
            return str(self._cached["access_token"])

    async def _fetch(self) -> dict[str, Any]:
        try:
            payload = await request_token(self.settings, self.client, {"grant_type": "client_credentials"})
        except (AuthError, RetriableError):
            if self.on_failure is not None:
                self.on_failure()
            raise
        tokens = {**token_set(payload, self._now()), "grant": "client_credentials"}
        await self.tokens.save(tokens)
        log.info("xero_token_fetched", grant="client_credentials")
        return tokens


def consent_url(settings: XeroSettings, state: str) -> str:
    """The Xero consent URL a person opens to connect an organisation (code flow).

    Parameters per https://developer.xero.com/documentation/oauth2/auth-flow
    (``response_type=code``, ``client_id``, ``redirect_uri``, space-separated ``scope``,
    ``state``).
    """
    query = urlencode(
        {
            "response_type": "code",
            "client_id": settings.client_id,
            "redirect_uri": settings.redirect_uri,
            "scope": " ".join(settings.scopes),
            "state": state,
        },
        quote_via=quote,
    )
    return f"{settings.authorize_url}?{query}"


async def exchange_code(
    settings: XeroSettings, client: httpx.AsyncClient, code: str, *, now: Callable[[], float] = time.time
) -> dict[str, Any]:
    """Exchange an authorization code for the first token set (to be saved in the TokenStore).

    ``POST token_url`` with ``grant_type=authorization_code``, ``code`` and the same
    ``redirect_uri`` (https://developer.xero.com/documentation/oauth2/auth-flow).
    """
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": settings.redirect_uri}
    return token_set(await request_token(settings, client, form), now())


async def list_connections(
    settings: XeroSettings, client: httpx.AsyncClient, access_token: str
) -> list[dict[str, Any]]:
    """The tenants connected to a token: ``GET connections_url`` (``xero-identity.yaml``).

    Each entry has ``tenantId``, ``tenantName``, ``tenantType`` …; the CLI uses it to
    pick the connection's ``tenant_id``.

    Raises:
        AuthError: the token was refused.
        RetriableError: a network failure or a 5xx.
    """
    try:
        response = await client.get(
            settings.connections_url, headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"}
        )
    except httpx.TransportError as exc:
        raise RetriableError(f"xero: connections endpoint unreachable ({type(exc).__name__})") from exc
    if response.status_code >= 500:
        raise RetriableError(f"xero: connections endpoint answered {response.status_code}")
    if response.status_code != 200:
        raise AuthError(f"xero: connections endpoint answered {response.status_code}")
    payload = load_json(response.content)
    return [dict(item) for item in payload] if isinstance(payload, list) else []


class XeroCodeFlow:
    """``syncd auth xero``: Xero's authorization-code flow (:class:`~syncd.plumbing.registry.CodeFlow`).

    syncd runs the localhost listener on ``redirect_uri``; this object knows Xero's URLs.
    """

    def consent_url(self, settings: XeroSettings, state: str) -> str:
        """The consent URL (see :func:`consent_url`)."""
        return consent_url(settings, state)

    def redirect_uri(self, settings: XeroSettings) -> str:
        """The connection's ``redirect_uri`` (must be registered with the Xero app)."""
        return settings.redirect_uri

    async def exchange_code(self, settings: XeroSettings, client: httpx.AsyncClient, code: str) -> Mapping[str, Any]:
        """The first token set (see :func:`exchange_code`)."""
        return await exchange_code(settings, client, code)

    async def describe(self, settings: XeroSettings, client: httpx.AsyncClient, tokens: Mapping[str, Any]) -> list[str]:
        """The organisations the token reaches, as ``tenant_id`` lines to put in the config."""
        connections = await list_connections(settings, client, str(tokens["access_token"]))
        if not connections:
            return ["xero: no organisation was connected; run `syncd auth` again and pick one"]
        lines = [
            f'tenant_id = "{item.get("tenantId")}"  # {item.get("tenantName")} ({item.get("tenantType")})'
            for item in connections
        ]
        tenants = {str(item.get("tenantId", "")).lower() for item in connections}
        if not settings.tenant_id and len(connections) == 1:
            lines.append(
                "set one of these tenant_id lines in the connection's config section, or leave tenant_id "
                "unset: with one organisation connected, syncd discovers it"
            )
        elif not settings.tenant_id:
            lines.append("set one of these tenant_id lines in the connection's config section")
        elif settings.tenant_id.lower() not in tenants:
            lines.append(f"warning: the configured tenant_id {settings.tenant_id} is not among these organisations")
        return lines
