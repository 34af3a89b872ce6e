"""``syncd auth <connection>``: connect an account with the OAuth2 code flow.

syncd prints the consent URL, listens on the connector's localhost redirect URI for
the browser to come back with a code (checking ``state``), exchanges the code, and
stores the tokens encrypted in the database, where the daemon finds them. Refresh
tokens live only there from then on.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import uvicorn
from rich.console import Console
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from syncd.core.errors import ConfigError
from syncd.plumbing.http import make_client
from syncd.plumbing.registry import secret_value
from syncd.plumbing.settings import Config
from syncd.plumbing.tokens import IMPORTED_DIGEST, digest
from syncd.store.db import DbTokenStore, Store

TIMEOUT_S = 600


async def authorize(config: Config, connection: str, console: Console) -> None:
    """Run the code flow for ``connection`` and store its tokens.

    Raises:
        ConfigError: unknown connection, a connector without a code flow, or no
            ``[daemon].encryption_key`` to store tokens with.
    """
    if connection not in config.connections:
        raise ConfigError(f"no connection named {connection!r}; defined: {', '.join(config.connections)}")
    conn = config.connections[connection]
    flow = conn.spec.code_flow
    if flow is None:
        raise ConfigError(f"connector {conn.spec.name!r} has no OAuth2 code flow")
    key = secret_value(config.daemon.encryption_key)
    if not key:
        raise ConfigError("[daemon].encryption_key is not set; run `syncd keygen` and set it first")
    state = secrets.token_urlsafe(24)
    code = await _wait_for_code(
        flow.redirect_uri(conn.settings), flow.consent_url(conn.settings, state), state, console
    )
    store = Store.open(config.daemon.database_url)
    try:
        await store.migrate()
        async with make_client() as client:
            tokens = await flow.exchange_code(conn.settings, client, code)
            await DbTokenStore(store, connection, key).save(_mark_configured_imported(tokens, conn.settings))
            for line in await flow.describe(conn.settings, client, tokens):
                console.print(line, markup=False)
    finally:
        await store.close()
    console.print(f"connected {connection!r}; tokens stored encrypted in the database")


def _mark_configured_imported(tokens: Mapping[str, Any], settings: Any) -> dict[str, Any]:
    """The new set, marked as holding the configured ``refresh_token`` if the settings have one.

    A connection brought in with a ``refresh_token`` setting and then re-connected here
    keeps the fresh tokens: the daemon imports a configured value only when it differs
    from the one the stored set records (:mod:`syncd.plumbing.tokens`).
    """
    configured = secret_value(getattr(settings, "refresh_token", None))
    return {**tokens, IMPORTED_DIGEST: digest(configured)} if configured else dict(tokens)


async def _wait_for_code(redirect_uri: str, consent_url: str, state: str, console: Console) -> str:
    parts = urlsplit(redirect_uri)
    if parts.hostname not in {"localhost", "127.0.0.1"} or parts.port is None:
        raise ConfigError(f"redirect_uri must be http://localhost:PORT/PATH for `syncd auth`, got {redirect_uri!r}")
    code: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def callback(request: Request) -> PlainTextResponse:
        if request.query_params.get("state") != state:
            return PlainTextResponse("state does not match; start `syncd auth` again", status_code=400)
        if "code" not in request.query_params:
            reason = request.query_params.get("error", "no code in the redirect")
            return PlainTextResponse(f"not connected: {reason}", status_code=400)
        if not code.done():
            code.set_result(request.query_params["code"])
        return PlainTextResponse("syncd is connected; you can close this window.")

    app = Starlette(routes=[Route(parts.path or "/", callback)])
    server = uvicorn.Server(uvicorn.Config(app, host=parts.hostname, port=parts.port, log_config=None))
    task = asyncio.create_task(server.serve())
    while not server.started:  # the browser's redirect must find the callback listening
        if task.done():
            task.result()
            raise ConfigError(f"could not listen on {redirect_uri} for the redirect", place="redirect_uri")
        await asyncio.sleep(0.01)
    console.print("Open this URL in a browser and grant access:", markup=False)
    console.print(consent_url, markup=False, soft_wrap=True)
    try:
        return await asyncio.wait_for(code, TIMEOUT_S)
    finally:
        server.should_exit = True
        await task
