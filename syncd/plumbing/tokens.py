"""OAuth2 access tokens from a refresh token kept in the connection's token store.

One sequence, used by every connector whose vendor issues refresh tokens (Xero's code
flow, HubSpot's OAuth apps): when the access token is missing, (nearly) expired or was
just refused with a 401,

1. take :meth:`~syncd.plumbing.registry.TokenStore.locked` (one refresh at a time, across
   tasks and, on PostgreSQL, across replicas);
2. re-load the stored set inside the lock: another task or replica may have refreshed
   already, and then its token is used and no refresh is spent;
3. refresh with the stored refresh token (single-use and rotating at Xero: "When you
   perform a token refresh, you should replace your existing refresh token with the new
   one returned in the response", https://developer.xero.com/faq/oauth2);
4. save the new set *before* the new access token is used, so a crash between the
   refresh and the save cannot lose the only valid refresh token.

A refresh that fails (refused, unreachable, no refresh token stored) is reported to
``on_failure`` before the error goes up: the runtime counts it per connection in
``syncd_token_refresh_failures_total`` (:class:`~syncd.interfaces.ConnectorContext`).

Bringing in an existing connection: a connector may hand over a refresh token from its
settings (``refresh_token = "env:…"``). It is consumed once into the store and rotates
there. The stored set keeps the SHA-256 digest of the configured value it was imported
from (:data:`IMPORTED_DIGEST`): a restart with the same configured value never
overwrites a set that has rotated since, and a new configured value replaces the stored
set (logged as ``token_imported``, without the value).

:class:`TokenAuth` is the ``httpx.Auth`` flow on top: ``Authorization: Bearer`` on every
request, and one resend with a renewed token after a 401.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Mapping
from datetime import datetime
from typing import Any, Protocol

import httpx
import structlog

from syncd.core.errors import AuthError, SyncdError
from syncd.plumbing import failpoints
from syncd.plumbing.registry import TokenStore

log = structlog.get_logger("syncd.plumbing.tokens")

# Renew an access token this many seconds before its stated expiry, so a request never
# leaves with a token that dies in flight (Xero's SDK uses 60 s too:
# xero_python/api_client/oauth2.py, OAuth2Token.EXPIRATION_BUFFER_DEFAULT).
EXPIRY_MARGIN_S = 60

# Key of the stored set holding the SHA-256 hex digest of the configured refresh token
# it was imported from.
IMPORTED_DIGEST = "imported_sha256"

Tokens = Mapping[str, Any]
Refresh = Callable[[str], Awaitable[Mapping[str, Any]]]
OnFailure = Callable[[], None]


def token_valid(tokens: Tokens | None, now_s: float) -> bool:
    """Whether ``tokens`` holds an access token still valid for :data:`EXPIRY_MARGIN_S` seconds."""
    if not tokens or not tokens.get("access_token"):
        return False
    return float(tokens.get("expires_at") or 0) - EXPIRY_MARGIN_S > now_s


def digest(value: str) -> str:
    """The SHA-256 hex digest of a configured secret (stored instead of comparing secrets)."""
    return hashlib.sha256(value.encode()).hexdigest()


class TokenSource(Protocol):
    """Where :class:`TokenAuth` gets access tokens.

    Errors: both methods raise :class:`~syncd.core.errors.AuthError` when no token can be
    had (nothing stored, a refused grant) and
    :class:`~syncd.core.errors.RetriableError` when the token endpoint is unreachable.
    """

    async def access_token(self) -> str:
        """A currently valid access token (fetching or refreshing one if needed)."""
        ...

    async def renew(self, rejected: str) -> str:
        """A new access token after ``rejected`` was answered 401."""
        ...


class RotatingTokens:
    """Lock, reload, refresh, save: access tokens from a stored refresh token.

    Args:
        store: the connection's durable, encrypted token store.
        refresh: calls the vendor's token endpoint with a refresh token and returns the
            new set (``access_token``, ``expires_at`` in epoch seconds, and the new
            ``refresh_token`` when the vendor rotates it).
        clock: current aware time.
        connection: the connection name, for messages and logs.
        reconnect: what an admin does when no refresh token works
            (``"run `syncd auth xero` to reconnect"``).
        configured_refresh_token: a refresh token from the settings, imported once.
        on_failure: called when a refresh fails, before the error is raised.
    """

    def __init__(
        self,
        *,
        store: TokenStore,
        refresh: Refresh,
        clock: Callable[[], datetime],
        connection: str,
        reconnect: str,
        configured_refresh_token: str | None = None,
        on_failure: OnFailure | None = None,
    ) -> None:
        self.store = store
        self.on_failure = on_failure
        self.refresh = refresh
        self.clock = clock
        self.connection = connection
        self.reconnect = reconnect
        self.configured = configured_refresh_token or None
        self._cached: Tokens = {}
        self._import_checked = self.configured is None
        self._lock = asyncio.Lock()

    async def access_token(self) -> str:
        """The cached token while valid; at first use a valid stored one (no lock); else a renewed one."""
        if self._import_checked and token_valid(self._cached, self._now()):
            return str(self._cached["access_token"])
        if self._cached:  # expired: renew under the lock, which re-loads what another replica saved
            return await self._renew(rejected=None)
        stored = await self.store.load()
        if self._import_due(stored) or not token_valid(stored, self._now()):
            return await self._renew(rejected=None)
        self._cached = stored or {}
        self._import_checked = True
        return str(self._cached["access_token"])

    async def renew(self, rejected: str) -> str:
        """A token other than ``rejected``: one another task or replica stored, or a refreshed one."""
        return await self._renew(rejected=rejected)

    async def _renew(self, *, rejected: str | None) -> str:
        async with self._lock, self.store.locked():
            stored = await self.store.load()
            importing = self._import_due(stored)
            self._import_checked = True
            current = self._imported() if importing else (stored or {})
            if token_valid(current, self._now()) and current.get("access_token") != rejected:
                self._cached = current
                return str(current["access_token"])
            try:
                fresh = await self._refresh(current)
            except SyncdError:
                log.warning("token_refresh_failed", connection=self.connection)
                if self.on_failure is not None:
                    self.on_failure()
                raise
            failpoints.hit("after_token_refresh")
            await self.store.save(fresh)
            self._cached = fresh
            if importing:
                log.info("token_imported", connection=self.connection, replaced=bool(stored))
            log.info("token_refreshed", connection=self.connection, expires_at=fresh.get("expires_at"))
            return str(fresh["access_token"])

    async def _refresh(self, current: Tokens) -> dict[str, Any]:
        spent = current.get("refresh_token")
        if not spent:
            raise AuthError(f"{self.connection}: no stored OAuth refresh token; {self.reconnect}")
        answer = await self.refresh(str(spent))
        fresh = {**dict(answer), "refresh_token": answer.get("refresh_token") or spent}
        if current.get(IMPORTED_DIGEST):
            fresh[IMPORTED_DIGEST] = current[IMPORTED_DIGEST]
        return fresh

    def _import_due(self, stored: Tokens | None) -> bool:
        """Whether the configured refresh token is one the stored set was not imported from."""
        if self.configured is None:
            return False
        return not stored or stored.get(IMPORTED_DIGEST) != digest(self.configured)

    def _imported(self) -> Tokens:
        """The configured refresh token as a set to refresh from at once.

        It is not saved on its own: the refresh saves the set it yields, digest
        included, so a refused configured token leaves the store as it was.
        """
        configured = self.configured or ""
        return {"refresh_token": configured, IMPORTED_DIGEST: digest(configured)}

    def _now(self) -> float:
        return self.clock().timestamp()


class TokenAuth(httpx.Auth):
    """``Authorization: Bearer`` from a :class:`TokenSource`; one resend after a 401.

    Subclasses may add headers that depend on the token in :meth:`prepare` (Xero's
    tenant id, discovered with the token).

    Args:
        source: where the access tokens come from.
    """

    def __init__(self, source: TokenSource) -> None:
        self.source = source

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Refused: syncd is async only."""
        raise RuntimeError("syncd's OAuth flows are async only")

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """Send with the current token; on a 401 renew it once and resend.

        Only the status is looked at here; the body of the final answer is read by the
        client and translated by :class:`~syncd.plumbing.http.VendorHttp`.
        """
        token = await self.source.access_token()
        await self._authorise(request, token)
        response = yield request
        if response.status_code == 401:
            log.info("token_rejected", path=request.url.path)
            await self._authorise(request, await self.source.renew(token))
            yield request

    async def _authorise(self, request: httpx.Request, token: str) -> None:
        request.headers["Authorization"] = f"Bearer {token}"
        await self.prepare(request, token)

    async def prepare(self, request: httpx.Request, token: str) -> None:
        """Add what else the vendor needs on an authorised request (nothing by default)."""
        return None
