"""HubSpot authentication as ``httpx.Auth`` flows: private-app token, or OAuth2 refresh.

OAuth facts relied on (https://developers.hubspot.com/docs/api-reference/legacy/authentication/manage-oauth-tokens):

* refresh with a form-encoded ``POST /oauth/v3/token`` carrying ``grant_type=refresh_token``,
  ``client_id``, ``client_secret`` and ``refresh_token`` in the body;
* the answer holds ``access_token``, ``refresh_token`` and ``expires_in`` (seconds;
  access tokens live 30 minutes);
* errors follow RFC 6749 (``{"error": "invalid_grant", ...}``).

HubSpot's refresh tokens are reused, not rotated: "store the refresh token you get when
initiating your OAuth integration and use it to generate a new access token once the
initial one expires" (https://developers.hubspot.com/docs/methods/OAuth2/refresh-access-token).
A refresh therefore never invalidates what another replica holds; still, refreshes are
serialised under the token store's lock and the new set is saved before it is used.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Mapping
from datetime import datetime
from typing import Any

import httpx
from pydantic import ValidationError

from connectors.hubspot.models import TokenResponse
from syncd.errors import AuthError, RetriableError
from syncd.interfaces import TokenStore

# Refresh this long before the access token's stated expiry, so a request never
# leaves with a token that dies in flight.
EXPIRY_MARGIN_S = 60


class BearerToken(httpx.Auth):
    """A static private-app access token sent as ``Authorization: Bearer``."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """Attach the token."""
        request.headers["Authorization"] = f"Bearer {self._token}"
        yield request


class OAuthRefresh(httpx.Auth):
    """OAuth2 access tokens from a refresh token, kept in the connection's token store.

    The access token is cached in memory; it is refreshed when missing, within
    :data:`EXPIRY_MARGIN_S` of expiry, or once after a 401. Refreshes happen under
    ``tokens.locked()`` and re-read the store first, so concurrent tasks (and replicas)
    refresh once; the new set is saved before any request uses it.

    Args:
        client: the shared client, used for the token endpoint.
        token_url: the token endpoint (configurable for emulators and proxies).
        client_id / client_secret: the app's credentials.
        initial_refresh_token: the configured refresh token, used until the store holds one.
        tokens: the connection's durable token store.
        clock: current aware UTC time.
    """

    def __init__(
        self,
        *,
        client: httpx.AsyncClient,
        token_url: str,
        client_id: str,
        client_secret: str,
        initial_refresh_token: str | None,
        tokens: TokenStore,
        clock: Callable[[], datetime],
    ) -> None:
        self._client = client
        self._token_url = token_url
        self._client_id = client_id
        self._client_secret = client_secret
        self._initial_refresh = initial_refresh_token
        self._tokens = tokens
        self._clock = clock
        self._cached: Mapping[str, Any] | None = None

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """Send with a valid access token; on 401 refresh once and resend."""
        token = await self.access_token()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            token = await self.access_token(rejected=token)
            request.headers["Authorization"] = f"Bearer {token}"
            yield request

    async def access_token(self, *, rejected: str | None = None) -> str:
        """A usable access token: cached, stored by another task, or freshly refreshed.

        Args:
            rejected: a token the API just refused; it is never returned again.
        """
        if self._usable(self._cached, rejected):
            return str(self._cached["access_token"])  # type: ignore[index]
        async with self._tokens.locked():
            stored = await self._tokens.load()
            if not self._usable(stored, rejected):
                stored = await self._refresh(stored)
                await self._tokens.save(stored)
            self._cached = stored
        return str(stored["access_token"])  # type: ignore[index]

    def _usable(self, tokens: Mapping[str, Any] | None, rejected: str | None) -> bool:
        if not tokens or not tokens.get("access_token") or tokens.get("access_token") == rejected:
            return False
        expires_at = float(tokens.get("expires_at") or 0)
        return expires_at - EXPIRY_MARGIN_S > self._clock().timestamp()

    async def _refresh(self, stored: Mapping[str, Any] | None) -> dict[str, Any]:
        refresh_token = (stored or {}).get("refresh_token") or self._initial_refresh
        if not refresh_token:
            raise AuthError("hubspot: no OAuth refresh token stored or configured; re-authorise the app")
        form = {
            "grant_type": "refresh_token",
            "client_id": self._client_id,
            "client_secret": self._client_secret,
            "refresh_token": str(refresh_token),
        }
        answer = await self._post_token(form)
        return {
            "access_token": answer.access_token,
            "refresh_token": answer.refresh_token or str(refresh_token),
            "expires_at": self._clock().timestamp() + answer.expires_in,
            "token_type": answer.token_type,
        }

    async def _post_token(self, form: Mapping[str, str]) -> TokenResponse:
        try:
            response = await self._client.post(self._token_url, data=dict(form))
        except httpx.TransportError as exc:
            raise RetriableError(f"hubspot: token endpoint unreachable: {type(exc).__name__}") from exc
        if response.status_code >= 500 or response.status_code == 429:
            raise RetriableError(f"hubspot: token endpoint answered {response.status_code}")
        if response.status_code >= 400:
            raise AuthError(
                f"hubspot: token refresh rejected ({response.status_code} {_oauth_error(response)}); "
                "re-authorise the app and update refresh_token"
            )
        try:
            return TokenResponse.model_validate_json(response.content)
        except ValidationError as exc:
            raise AuthError("hubspot: token endpoint answered without an access_token/expires_in") from exc


def _oauth_error(response: httpx.Response) -> str:
    """The RFC 6749 ``error`` code of a token error (never echoes tokens)."""
    try:
        body = response.json()
    except ValueError:
        return "no error code"
    code = body.get("error") if isinstance(body, dict) else None
    return str(code) if code else "no error code"
