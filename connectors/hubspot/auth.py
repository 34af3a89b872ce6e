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
A refresh therefore never invalidates what another replica holds; still, it goes through
the same lock-reload-refresh-save piece as Xero's (:mod:`syncd.plumbing.tokens`), which also
imports the configured ``refresh_token`` once and keeps any newer one HubSpot answers.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Mapping
from datetime import datetime
from typing import Any

import httpx
from pydantic import ValidationError

from connectors.hubspot.models import ErrorBody, TokenResponse
from syncd.core.errors import AuthError, RetriableError
from syncd.plumbing.registry import TokenStore
from syncd.plumbing.tokens import RotatingTokens


class BearerToken(httpx.Auth):
    """A static private-app access token sent as ``Authorization: Bearer``."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """Attach the token."""
        request.headers["Authorization"] = f"Bearer {self._token}"
        yield request


def oauth_tokens(
    *,
    client: httpx.AsyncClient,
    token_url: str,
    client_id: str,
    client_secret: str,
    configured_refresh_token: str | None,
    tokens: TokenStore,
    clock: Callable[[], datetime],
    connection: str,
    on_failure: Callable[[], None] | None = None,
) -> RotatingTokens:
    """OAuth access tokens for a HubSpot app: the shared lock-reload-refresh-save piece.

    The configured refresh token is imported once into the token store (again only
    when the configured value changes); refreshes are serialised under the store's lock
    and each new set is saved before it is used.

    Args:
        client: the shared client, used for the token endpoint.
        token_url: the token endpoint (configurable for emulators and proxies).
        client_id / client_secret: the app's credentials.
        configured_refresh_token: the ``refresh_token`` setting.
        tokens: the connection's durable token store.
        clock: current aware UTC time.
        connection: the connection name, for messages and logs.
        on_failure: called when a refresh fails (``/metrics`` counts it).
    """

    async def refresh(refresh_token: str) -> dict[str, Any]:
        form = {
            "grant_type": "refresh_token",
            "client_id": client_id,
            "client_secret": client_secret,
            "refresh_token": refresh_token,
        }
        answer = await _post_token(client, token_url, form)
        return {
            "access_token": answer.access_token,
            "refresh_token": answer.refresh_token or refresh_token,
            "expires_at": clock().timestamp() + answer.expires_in,
            "token_type": answer.token_type,
        }

    return RotatingTokens(
        store=tokens,
        refresh=refresh,
        clock=clock,
        connection=connection,
        reconnect="re-authorise the app and set the connection's refresh_token",
        configured_refresh_token=configured_refresh_token,
        on_failure=on_failure,
    )


async def check_credentials(
    *, client: httpx.AsyncClient, token_url: str, client_id: str, client_secret: str, refresh_token: str
) -> None:
    """Ask the token endpoint for a new access token with the configured credentials.

    ``syncd check`` calls it so that a wrong client secret is reported even while a
    stored access token still works. Nothing is stored; HubSpot refresh tokens are
    reused, not spent ("use a previously obtained refresh token to generate a new
    access token": https://developers.hubspot.com/docs/api-reference/legacy/authentication/oauth-tokens/v1/guide).

    Raises:
        AuthError: the endpoint refused the credentials.
        RetriableError: the endpoint could not be reached, or answered 429 or 5xx.
    """
    form = {
        "grant_type": "refresh_token",
        "client_id": client_id,
        "client_secret": client_secret,
        "refresh_token": refresh_token,
    }
    await _post_token(client, token_url, form)


async def _post_token(client: httpx.AsyncClient, token_url: str, form: Mapping[str, str]) -> TokenResponse:
    try:
        response = await client.post(token_url, data=dict(form))
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


class HubSpotErrors:
    """How HubSpot's error answers read (:class:`~syncd.plumbing.http.VendorErrors`).

    Args:
        connection: the connection name, for the advice.
        oauth: whether the connection uses an OAuth app (else a private-app token).
    """

    def __init__(self, connection: str, *, oauth: bool) -> None:
        self.connection = connection
        self.oauth = oauth

    def messages(self, response: httpx.Response) -> list[str]:
        """``message`` and each ``errors[].message`` of the body."""
        return _error_body(response).messages()

    def auth_advice(self, response: httpx.Response) -> str:
        """401: the token is refused; 403: name the missing scopes when HubSpot lists them."""
        body = _error_body(response)
        grant = (
            "re-install the OAuth app with that scope and update refresh_token"
            if self.oauth
            else "add it to the private app's scopes (Settings > Integrations > Private Apps)"
        )
        scopes = body.missing_scopes()
        if scopes:
            return f"the token lacks the scope {', '.join(scopes)} ({body.category}); {grant}"
        if response.status_code == 403:
            return f"HubSpot refused access ({body.category or 'FORBIDDEN'}: {body.message}); check the app's scopes"
        fix = "re-authorise the app and update refresh_token" if self.oauth else "check the connection's token"
        return f"credentials rejected ({body.category or 'UNAUTHORIZED'}); {fix}"


def _error_body(response: httpx.Response) -> ErrorBody:
    try:
        return ErrorBody.model_validate_json(response.content)
    except ValidationError:
        return ErrorBody()


def _oauth_error(response: httpx.Response) -> str:
    """The RFC 6749 ``error`` code of a token error (never echoes tokens)."""
    try:
        body = response.json()
    except ValueError:
        return "no error code"
    code = body.get("error") if isinstance(body, dict) else None
    return str(code) if code else "no error code"
