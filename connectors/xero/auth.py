"""OAuth 2.0 for Xero: custom connections (client credentials) and the code flow.

One ``httpx.Auth`` flow, :class:`XeroAuth`, puts ``Authorization: Bearer …`` on every API
request; its tokens come from one of two sources:

* :class:`ClientCredentials` for a *custom connection*: the access token comes from
  ``POST token_url`` with HTTP basic auth and ``grant_type=client_credentials``; there is
  no refresh token ("Do I need to manage refresh tokens? No" and "the xero-tenant-id
  header is not required": https://developer.xero.com/faq/custom-integration). Tokens
  live 30 minutes and are cached in memory and in the :class:`~syncd.interfaces.TokenStore`.
* :class:`RefreshingTokens` for the authorization-code flow. Xero refresh tokens are
  single-use and rotate: "When you perform a token refresh, you should replace your
  existing refresh token with the new one returned in the response"
  (https://developer.xero.com/faq/oauth2). A refresh therefore runs only under
  ``TokenStore.locked()``, re-loads the stored set inside the lock (another replica may
  have refreshed already) and saves the new set *before* the new access token is used.

The flow retries a request once after a 401 with a renewed token, and translates
Xero's 400 ``ValidationException`` bodies into :class:`~connectors.xero.models.XeroRejected`
(the shared :class:`~syncd.http.VendorHttp` would otherwise keep only a short excerpt of
the body).

The code flow's first step is the lead's ``syncd auth xero`` CLI: :func:`consent_url`
and :func:`exchange_code` (https://developer.xero.com/documentation/oauth2/auth-flow).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable, Generator, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote, urlencode

import httpx
import structlog

from connectors.xero.models import XeroError, XeroRejected, load_json
from syncd.errors import AuthError, RateLimited, RetriableError
from syncd.http import retry_after_s

if TYPE_CHECKING:
    from connectors.xero.connector import XeroSettings
    from syncd.interfaces import TokenStore

log = structlog.get_logger("connectors.xero.auth")

# Renew an access token this many seconds before Xero's expiry (the official SDK uses
# 60 s too: xero_python/api_client/oauth2.py, OAuth2Token.EXPIRATION_BUFFER_DEFAULT).
EXPIRY_MARGIN_S = 60

Tokens = Mapping[str, Any]


def token_valid(tokens: Tokens | None, now_s: float) -> bool:
    """Whether ``tokens`` holds an access token still valid for ``EXPIRY_MARGIN_S`` seconds."""
    if not tokens or not tokens.get("access_token"):
        return False
    return float(tokens.get("expires_at", 0)) - EXPIRY_MARGIN_S > now_s


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


def raise_for_validation(response: httpx.Response) -> None:
    """Raise :class:`XeroRejected` for a 400 that carries Xero's ``Error`` body; else return.

    Body shape: spec ``components.schemas.Error`` (``ErrorNumber``, ``Type``, ``Message``,
    ``Elements[].ValidationErrors[].Message``).
    """
    if response.status_code != 400:
        return
    try:
        error = XeroError.model_validate(load_json(response.content))
    except ValueError:
        return
    messages = error.messages()
    if not messages:
        return
    where = f"{response.request.method} {response.request.url.path}"
    raise XeroRejected(f"xero rejected {where}: " + "; ".join(messages), messages=messages)


class TokenSource(Protocol):
    """Where :class:`XeroAuth` gets its access tokens."""

    async def access_token(self) -> str:
        """A currently valid access token (fetching or refreshing one if needed)."""
        ...

    async def renew(self, rejected: str) -> str:
        """A new access token after ``rejected`` was answered 401."""
        ...


class XeroAuth(httpx.Auth):
    """Bearer token on each request, one retry after a 401, Xero's 400 bodies translated.

    Args:
        source: the token source (client credentials, refreshing, or a fixed token).
    """

    requires_response_body = True

    def __init__(self, source: TokenSource) -> None:
        self.source = source

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Refused: syncd is async only."""
        raise RuntimeError("the Xero auth flow is async only")

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """Send with the current token; on a 401 renew it once and resend."""
        token = await self.source.access_token()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            log.info("xero_token_rejected", path=request.url.path)
            request.headers["Authorization"] = f"Bearer {await self.source.renew(token)}"
            response = yield request
        raise_for_validation(response)


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


class _StoredTokens:
    """What both token sources hold: settings, the token endpoint's client, the store, a cache."""

    def __init__(
        self, settings: XeroSettings, client: httpx.AsyncClient, tokens: TokenStore, clock: Callable[[], datetime]
    ) -> None:
        self.settings = settings
        self.client = client
        self.tokens = tokens
        self.clock = clock
        self._cached: Tokens = {}
        self._lock = asyncio.Lock()

    def _now(self) -> float:
        return self.clock().timestamp()


class ClientCredentials(_StoredTokens):
    """Access tokens for a Xero custom connection (client credentials grant).

    Custom connections doc: https://developer.xero.com/documentation/guides/oauth2/custom-connections/
    (token request: ``POST https://identity.xero.com/connect/token``, basic auth,
    ``grant_type=client_credentials``; no refresh token).
    """

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
        payload = await request_token(self.settings, self.client, {"grant_type": "client_credentials"})
        tokens = {**token_set(payload, self._now()), "grant": "client_credentials"}
        await self.tokens.save(tokens)
        log.info("xero_token_fetched", grant="client_credentials")
        return tokens


class RefreshingTokens(_StoredTokens):
    """Access tokens of the code flow, refreshed with single-use rotating refresh tokens.

    The token set ``{"access_token", "refresh_token", "expires_at"}`` is read from the
    :class:`~syncd.interfaces.TokenStore` (written there by ``syncd auth xero``).
    """

    async def access_token(self) -> str:
        """The current access token, refreshed first if it has (nearly) expired."""
        current = self._cached or await self.tokens.load()
        if not current:
            raise AuthError("xero: no stored tokens for the code flow; run `syncd auth xero` to connect")
        if token_valid(current, self._now()):
            self._cached = current
            return str(current["access_token"])
        return str((await self._refresh(str(current.get("access_token", ""))))["access_token"])

    async def renew(self, rejected: str) -> str:
        """Refresh after a 401, unless another task or replica already did."""
        return str((await self._refresh(rejected))["access_token"])

    async def _refresh(self, stale: str) -> Tokens:
        async with self._lock, self.tokens.locked():
            current = await self.tokens.load()
            if not current or not current.get("refresh_token"):
                raise AuthError("xero: no stored refresh token; run `syncd auth xero` to connect")
            if current.get("access_token") != stale and token_valid(current, self._now()):
                self._cached = current
                return current
            form = {"grant_type": "refresh_token", "refresh_token": str(current["refresh_token"])}
            payload = await request_token(self.settings, self.client, form)
            fresh = token_set(payload, self._now(), previous=current)
            await self.tokens.save(fresh)
            self._cached = fresh
            log.info("xero_token_refreshed", expires_at=fresh["expires_at"])
            return fresh


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
    """``syncd auth xero``: Xero's authorization-code flow (:class:`~syncd.interfaces.CodeFlow`).

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
        if not settings.tenant_id:
            lines.append("set one of these tenant_id lines in the connection's config section")
        elif settings.tenant_id.lower() not in tenants:
            lines.append(f"warning: the configured tenant_id {settings.tenant_id} is not among these organisations")
        return lines
