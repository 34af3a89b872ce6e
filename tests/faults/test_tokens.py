"""Single-use refresh tokens under concurrency and crashes (Xero's code flow, ``syncd/plumbing/tokens.py``).

Xero refresh tokens rotate: each is spent by its refresh (the emulator refuses a spent one
with ``invalid_grant``). Three replicas needing a token at once must spend one refresh per
expiry between them; a replica killed after the vendor rotated the token and before it
saved the new one leaves a spent token behind, which must end in a clear outcome that
asks a person to reconnect, never in a silent loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from cryptography.fernet import Fernet

from connectors.hubspot.emulator import HubSpotEmulator
from connectors.xero.emulator import ACCESS_TOKEN_TTL_S, XeroEmulator
from syncd.plumbing import failpoints
from syncd.plumbing.settings import Config
from syncd.store.db import Store
from syncd.store.outcomes import list_outcomes
from tests.faults.checker import check, emulator_secrets, log_texts, record
from tests.faults.live import live
from tests.faults.rig import Clock, deals, settle, verify, win
from tests.harness import stack

pytestmark = pytest.mark.postgres

DEBUG = 'log_level = "debug"'
SCOPE = "offline_access accounting.transactions accounting.contacts accounting.settings"


async def consented_refresh_token(xero: XeroEmulator) -> str:
    """A refresh token from a consent made elsewhere (what ``refresh_token = ...`` brings in)."""
    code = xero.issue_code(redirect_uri="http://localhost:8765/callback", scope=SCOPE)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=xero.app), base_url="http://xero.test") as client:
        answer = await client.post(
            "/connect/token",
            data={"grant_type": "authorization_code", "code": code, "redirect_uri": "http://localhost:8765/callback"},
            auth=(xero.client_id, xero.client_secret),
        )
    answer.raise_for_status()
    return str(answer.json()["refresh_token"])


def code_flow(refresh_token: str) -> dict[str, str]:
    """The environment that turns the harness's Xero connection into a code-flow one bringing in ``refresh_token``."""
    return {
        "SYNCD_CONNECTIONS__XERO__GRANT": "authorization_code",
        "SYNCD_CONNECTIONS__XERO__REFRESH_TOKEN": refresh_token,
    }


async def test_three_replicas_spend_one_refresh_per_expiry(
    tmp_path: Path,
    postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
    run_logging: Callable[[Config], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Three replicas needing a Xero token at once, three expiries running: one refresh each time, none refused."""
    clock = Clock()
    hub, xero = HubSpotEmulator(rate_limits=False, clock=clock), XeroEmulator(rate_limits=False, clock=clock)
    for name, value in code_flow(await consented_refresh_token(xero)).items():
        monkeypatch.setenv(name, value)
    key = Fernet.generate_key().decode()  # replicas share one key
    async with contextlib.AsyncExitStack() as replicas:
        stacks = []
        for name in ("a", "b", "c"):
            (tmp_path / name).mkdir()
            replica = stack(
                tmp_path / name, postgres_url, clock=clock, hub=hub, xero=xero, daemon_extra=DEBUG, encryption_key=key
            )
            stacks.append(await replicas.enter_async_context(replica))
        run_logging(stacks[0].config)
        won = []
        for expiry in range(3):
            batch = deals(hub, 3)
            for deal in batch:
                await win(stacks[0], deal)
            won += batch
            await asyncio.gather(*(s.drain() for s in stacks))
            assert xero.calls["token:refresh_token"] == expiry + 1, f"expiry {expiry}"
            clock.advance(ACCESS_TOKEN_TTL_S)  # every replica's access token is now expired
        await settle(stacks[0], clock)
        assert xero.calls["token:refresh_token:invalid_grant"] == 0
        report = await verify(
            stacks[0], "refresh-token rotation across 3 replicas", expect_won=won, logs=capsys.readouterr().err
        )
    assert report.invoices == len(won)


@pytest.mark.slow
async def test_a_crash_between_the_refresh_and_its_save_asks_a_person_to_reconnect(
    tmp_path: Path, postgres_url: str
) -> None:
    """SIGKILL after Xero rotated the refresh token, before it was saved: after a restart, an attention outcome says reconnect."""
    xero = XeroEmulator(rate_limits=False)
    refresh = code_flow(await consented_refresh_token(xero))
    async with live(tmp_path, postgres_url, xero=xero) as s:
        (replica,) = s.replicas
        replica.start(env={**refresh, failpoints.ENV: "after_token_refresh:kill"})
        if await replica.ready_or_gone(s.client):  # the start-up drift check may need the token first
            (deal,) = deals(s.hub, 1)
            await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
        assert await replica.exited(60) == -signal.SIGKILL, s.tails()
        assert xero.calls["token:refresh_token"] == 1  # spent at Xero; the new one died with the process
        replica.start(env=refresh)
        await replica.ready(s.client)
        await s.hub.webhooks.retry_failed()
        (deal,) = deals(s.hub, 1)
        await s.hub.set_deal_properties(deal, {"dealstage": "closedwon"})
        store = Store.open(postgres_url)
        try:

            async def refused() -> list[str]:
                rows = await list_outcomes(store, kind="attention")
                return [row.detail for row in rows if row.reason == "auth_refused"]

            for _ in range(300):
                if await refused():
                    break
                await asyncio.sleep(0.1)
            (detail,) = await refused()
        finally:
            await store.close()
        assert await replica.stop() == 0
        assert "invalid_grant" in detail
        assert "run `syncd auth xero" in detail
        assert xero.calls["token:refresh_token:invalid_grant"] >= 1
        assert len(xero.invoices()) == 0
        report = await check(
            postgres_url,
            s.hub,
            s.xero,
            secrets=emulator_secrets(s.hub, s.xero),
            texts=log_texts(replica.log),
            settled=False,  # the invoice waits for a person to reconnect
        )
        record(report, "crash between refresh and save")
        report.assert_ok()
        assert '"event": "reauthorisation_needed"' in replica.log.read_text()
